"""Fuzzed prompt files: every bad file gets a named error, every good one loads.

Property-based (hypothesis) tests of `onpo_jax.data.sources.load_prompt_records`
(source 'files', the entry point configs name) and of `prompts.read_json_rows`
(evaluation and constraint files). A bad file is a valid one with one line
damaged in a known way (invalid UTF-8, a non-object line, a wrong type for the
id or the prompt, an empty or duplicated id, a missing column, invalid JSON,
nesting or a number beyond Python's limits), or plain random bytes. The
property: the loader raises ValueError itself (not a UnicodeDecodeError,
JSONDecodeError, RecursionError, KeyError, ...) with the file and, where there
is one, the line in its message; a valid file, huge lines included, loads with
its ids in order and then tokenises (`PromptSet.from_records`).

Deterministic: the settings profile below derandomizes hypothesis and keeps no
example database, so CI runs the same cases every time;
`pytest --hypothesis-show-statistics` counts them.
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, given, strategies as st

from onpo_jax.data import prompts
from onpo_jax.data import sources
from fuzzing import fuzz
from test_data import WORDS, _make_tokenizer

# Huge lines: a single prompt of up to this many characters (several MB).
HUGE = 4_000_000


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return _make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """One folder for the generated files (each example overwrites its own file)."""
  return tmp_path_factory.mktemp("fuzz_prompts")


# ------------------------------------------------------------------ strategies

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_prompt_text = _text.filter(lambda s: s.strip())
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                  "content": _text})
_messages = st.lists(_message, min_size=1, max_size=3).map(
    lambda ms: ms + [{"role": "user", "content": "what is two plus three"}])


@st.composite
def valid_rows(draw, min_size=1, max_size=8):
  """Rows of one valid file: plain prompts or chat messages (one column for the file)
  and unique ids (strings or ints, or none at all)."""
  n = draw(st.integers(min_size, max_size))
  column = draw(st.sampled_from(["prompt", "messages", "context_messages"]))
  id_kind = draw(st.sampled_from(["str", "int", "none"]))
  ids = draw(st.lists(_prompt_text if id_kind == "str" else st.integers(-2**62, 2**62),
                      min_size=n, max_size=n, unique_by=str))
  rows = []
  for i in range(n):
    value = draw(_prompt_text if column == "prompt" else _messages)
    row = {column: value}
    if id_kind != "none":
      row["id"] = ids[i]
    rows.append(row)
  return rows


def _line(row) -> bytes:
  return json.dumps(row, ensure_ascii=False).encode("utf-8")


# What a damaged line holds, by kind of damage. Each value is the line's bytes.
_NOT_OBJECT = st.sampled_from([b"[1, 2]", b"3", b'"a prompt"', b"null", b"true", b"[]",
                               b'[{"prompt": "hello"}]'])
_BAD_PROMPT = st.sampled_from([3, 2.5, True, None, "", "   ", [], ["hello"], [3], {},
                               {"role": "user", "content": "hi"}, [{"role": "user"}],
                               [{"role": 1, "content": "hi"}], [{"content": "x"}],
                               [{"role": "assistant", "content": "only the answer"}],
                               [{"role": "user", "content": None}]])
_BAD_ID = st.sampled_from(["", " ", "\t\n", 2.5, float("nan"), True, False, [1], ["a"], {},
                           {"id": 1}])
_BAD_JSON = st.one_of(
    st.sampled_from([b'{"id": "x", "prompt": "a', b"{'prompt': 'single quotes'}", b"{,}",
                     b'{"prompt": "a"} trailing', b'{"prompt": NaN', b"\xef\xbb\xbf{}"]),
    # Random bytes on one line; a line that is only whitespace is skipped as blank.
    st.binary(min_size=1, max_size=60).filter(
        lambda b: b"\n" not in b and b.decode("utf-8", "replace").strip()))
_BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
                             b"\xed\xa0\x80", b"\xc0\xaf"])


@st.composite
def damaged_files(draw):
  """(lines of a file, the 1-based line that is damaged, kind of damage)."""
  rows = draw(valid_rows(min_size=2))
  lines = [_line(r) for r in rows]
  k = draw(st.integers(1, len(lines)))
  kind = draw(st.sampled_from(["utf8", "not_object", "prompt_type", "id_type", "duplicate_id",
                               "missing_column", "json", "deep", "big_int", "huge_bad"]))
  column = next(c for c in rows[0] if c != "id")
  row = dict(rows[k - 1])
  if kind == "utf8":
    bad = draw(_BAD_UTF8)
    at = draw(st.integers(0, len(lines[k - 1])))
    lines[k - 1] = lines[k - 1][:at] + bad + lines[k - 1][at:]
  elif kind == "not_object":
    lines[k - 1] = draw(_NOT_OBJECT)
  elif kind == "prompt_type":
    row[column] = draw(_BAD_PROMPT)
    lines[k - 1] = _line(row)
  elif kind == "id_type":
    row["id"] = draw(_BAD_ID)
    lines[k - 1] = _line(row)
  elif kind == "duplicate_id":
    # Line k reuses the id of another line (default ids `<file>:<n>` count too).
    j = draw(st.integers(1, len(lines) - 1))
    j += j >= k
    row["id"] = rows[j - 1].get("id", f"{{name}}:{j}")
    lines[k - 1] = _line(row)
  elif kind == "missing_column":
    row.pop(column)
    row["text"] = "the prompt under another name"
    lines[k - 1] = _line(row)
  elif kind == "json":
    lines[k - 1] = draw(_BAD_JSON)
  elif kind == "deep":
    depth = draw(st.integers(5_000, 200_000))
    lines[k - 1] = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
  elif kind == "big_int":  # more digits than Python converts (json.loads raises ValueError)
    row.pop("id", None)
    digits = b"9" * draw(st.integers(4_301, 20_000))
    lines[k - 1] = _line(row)[:-1] + b', "id": ' + digits + b"}"
  else:  # a huge line that is not JSON
    lines[k - 1] = b'{"prompt": "' + b"x" * draw(st.integers(HUGE // 4, HUGE)) + b"'}"
  return lines, k, kind


def _write(folder, name, lines, trailing=b"\n"):
  path = os.path.join(folder, name)
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + trailing)
  return path


def _load(path):
  return sources.load_prompt_records("files", [path])


def _assert_named(err, path, line=None):
  """The loader's own error: exactly ValueError, naming the file (and line)."""
  # UnicodeDecodeError and JSONDecodeError are ValueError subclasses; the type
  # must be the loader's, not one that escaped from the codec or json.
  assert type(err) is ValueError, f"{type(err).__name__} escaped: {err}"
  msg = str(err)
  assert path in msg, msg[:300]
  if line is not None:
    assert f"{path}:{line}" in msg, msg[:300]
  assert len(msg) < 2000, "the message quotes a whole huge line"


# -------------------------------------------------------------------- properties


@fuzz(150)
@given(rows=valid_rows(), ext=st.sampled_from([".jsonl", ".json"]),
       trailing=st.sampled_from([b"", b"\n", b"\n\n", b"\r\n"]))
def test_valid_files_load_with_their_ids(folder, rows, ext, trailing):
  path = _write(folder, "valid" + ext, [_line(r) for r in rows], trailing)
  records = _load(path)
  assert len(records) == len(rows)
  want = [str(r["id"]) if "id" in r else f"valid{ext}:{i}" for i, r in enumerate(rows, 1)]
  assert [r.id for r in records] == want
  assert all(r.source.startswith(f"{path}:") for r in records)


@fuzz(6)
@given(size=st.integers(HUGE // 2, HUGE), at=st.integers(0, 2))
def test_huge_lines_load(folder, size, at):
  rows = [{"id": f"q{i}", "prompt": "hello world"} for i in range(3)]
  rows[at]["prompt"] = ("sky blue " * (size // 9 + 1))[:size]
  records = _load(_write(folder, "huge.jsonl", [_line(r) for r in rows]))
  assert len(records[at].messages[0][1]) == size


@fuzz(400)
@given(damaged=damaged_files(), ext=st.sampled_from([".jsonl", ".json"]))
def test_damaged_lines_are_named_with_file_and_line(folder, damaged, ext):
  lines, k, kind = damaged
  event(f"damage: {kind}")
  name = f"bad{ext}"
  lines = [ln.replace(b"{name}", name.encode()) for ln in lines]
  path = _write(folder, name, lines)
  with pytest.raises(Exception) as info:
    _load(path)
  _assert_named(info.value, path, k)
  if kind == "duplicate_id":
    assert "already used at" in str(info.value)


@fuzz(200)
@given(data=st.binary(max_size=400), ext=st.sampled_from([".jsonl", ".json"]))
def test_random_bytes_load_or_are_named(folder, data, ext):
  path = os.path.join(folder, "random" + ext)
  with open(path, "wb") as f:
    f.write(data)
  try:
    records = _load(path)
  except Exception as e:  # noqa: BLE001 - the property is about which exception
    _assert_named(e, path)
  else:
    assert records  # an empty file is an error, so something was read


@fuzz(15)
@given(blank=st.sampled_from([b"", b"\n", b"\n\n\n", b"   \n\t\n", b"\r\n"]))
def test_empty_files_are_named(folder, blank):
  path = os.path.join(folder, "empty.jsonl")
  with open(path, "wb") as f:
    f.write(blank)
  with pytest.raises(ValueError, match="file is empty") as info:
    _load(path)
  _assert_named(info.value, path)


@fuzz(60)
@given(paths=st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
                       st.lists(st.integers(), min_size=1, max_size=2),
                       st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                       st.just([]), st.just(""), st.just(["a.jsonl", 3])),
       source=st.sampled_from(["files", "hf_dir"]))
def test_paths_of_the_wrong_type_are_named(paths, source):
  with pytest.raises((TypeError, ValueError, FileNotFoundError)) as info:
    sources.load_prompt_records(source, paths)
  assert type(info.value) in (TypeError, ValueError, FileNotFoundError)
  assert any(w in str(info.value) for w in ("path", "file", "directory")), info.value


@fuzz(100)
@given(rows=st.one_of(valid_rows(), st.lists(st.dictionaries(
    st.sampled_from(["instruction", "prompt", "constraints", "x"]),
    st.one_of(st.none(), st.integers(), _text)), max_size=4)),
       damage=st.one_of(st.none(), _BAD_UTF8, _BAD_JSON), as_list=st.booleans())
def test_json_rows_read_or_are_named(folder, rows, damage, as_list):
  """`read_json_rows` (evaluation and constraint files: a JSON list or JSONL)."""
  path = os.path.join(folder, "eval.json")
  body = json.dumps(rows).encode() if as_list else b"\n".join(_line(r) for r in rows)
  if damage is not None:
    body = body[:len(body) // 2] + damage + body[len(body) // 2:]
  with open(path, "wb") as f:
    f.write(body)
  try:
    got = prompts.read_json_rows(path)
  except Exception as e:  # noqa: BLE001
    assert damage is not None, f"a valid file was refused: {e}"
    _assert_named(e, path)
  else:
    if damage is None:
      assert got == rows


@fuzz(50)
@given(cut=st.floats(0.0, 0.99), flip=st.booleans(), ext=st.sampled_from([".parquet", ".arrow"]))
def test_truncated_parquet_and_arrow_are_named(folder, cut, flip, ext):
  path = os.path.join(folder, "table" + ext)
  table = pa.Table.from_pylist([{"id": f"q{i}", "prompt": "hello world"} for i in range(20)])
  if ext == ".parquet":
    pq.write_table(table, path)
  else:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  at = int(cut * len(data))
  if flip:  # a damaged byte instead of a short file
    data[at] ^= 0xFF
  else:
    data = data[:at]
  with open(path, "wb") as f:
    f.write(data)
  try:
    records = _load(path)
  except Exception as e:  # noqa: BLE001
    _assert_named(e, path)
  else:
    assert flip and len(records) == 20  # a flipped value byte still reads


@fuzz(40)
@given(rows=valid_rows(max_size=6), max_len=st.integers(1, 64),
       overlong=st.sampled_from(prompts.OVERLONG_POLICIES))
def test_valid_records_tokenise(folder, tokenizer, rows, max_len, overlong):
  """What loads also templates and tokenises (or is named: every prompt too long)."""
  for r in rows:  # words of the tokenizer's vocabulary, so lengths vary
    if "prompt" in r:
      r["prompt"] = " ".join(WORDS[:1 + len(r["prompt"]) % len(WORDS)])
  records = _load(_write(folder, "tok.jsonl", [_line(r) for r in rows]))
  try:
    ps = prompts.PromptSet.from_records(records, tokenizer, max_prompt_length=max_len,
                                        overlong=overlong)
  except ValueError as e:
    assert overlong == "drop" and "exceed max_prompt_length" in str(e)
  else:
    assert len(ps) == len(records) if overlong == "truncate" else 1 <= len(ps) <= len(records)
    assert all(1 <= t.shape[0] <= max_len for t in ps.tokens)


def test_constraints_file_with_invalid_utf8_is_named(tmp_path):
  # The verifiable judge reads constraints through read_json_rows too.
  from onpo_jax.oracles import verifiable  # pylint: disable=g-import-not-at-top
  path = tmp_path / "c.jsonl"
  path.write_bytes(b'{"prompt": "a", "constraints": []}\n{"prompt": "\xff"}\n')
  with pytest.raises(ValueError, match=rf"{path}:2: invalid UTF-8"):
    verifiable.constraints_from_files([str(path)])

