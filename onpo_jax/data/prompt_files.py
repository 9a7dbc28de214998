"""Prompt files: JSONL / JSON / parquet / arrow files and HF datasets dirs -> PromptRecords.

Every row becomes a `PromptRecord` (a plain string, or chat messages of
`{"role", "content"}`), named `<path>:<line or row>` so that later errors can
point at it. `onpo_jax.data.prompts` tokenises and batches the records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from onpo_jax.infra import checks


# Columns tried in order when the caller does not name one; the first present in
# a file's first record is used for the whole file.
DEFAULT_PROMPT_COLUMNS = ("prompt", "messages", "context_messages", "context")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt before tokenisation.

  Attributes:
    id: stable identifier (the id column, or `<file name>:<line>` without one).
    messages: ((role, content), ...); a plain prompt is one user message.
    is_chat: False for a plain-text prompt.
    source: `<path>:<line or row>`, quoted in later error messages.
  """
  id: str
  messages: tuple[tuple[str, str], ...]
  is_chat: bool
  source: str


def _parse_messages(value: Any, where: str, column: str) -> tuple[tuple[str, str], ...]:
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{where}: column {column!r} must be a non-empty string or a "
                     f"non-empty list of {{'role', 'content'}} messages, got {value!r:.80}")
  messages = []
  for i, m in enumerate(value):
    if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise ValueError(f"{where}: column {column!r} message {i} must be a dict with "
                       f"string 'role' and 'content', got {m!r:.80}")
    messages.append((m["role"], m["content"]))
  # Prompt sets that store whole conversations end with the reference answer;
  # the policy must generate that turn itself.
  while messages and messages[-1][0] == "assistant":
    messages.pop()
  if not messages:
    raise ValueError(f"{where}: column {column!r} has only assistant messages; "
                     "expected at least one user turn")
  return tuple(messages)


def parse_prompt_row(row: Any, where: str, column: str, id_column: str | None,
                     default_id: str) -> PromptRecord:
  """Validates one raw row (a dict) and returns its `PromptRecord`.

  Raises:
    ValueError: naming `where` (file and line) when the row is not an object,
      lacks `column`, holds an empty / malformed prompt, or an id that is
      neither a non-empty string nor an int.
  """
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
  if column not in row:
    raise ValueError(f"{where}: missing prompt column {column!r} "
                     f"(columns present: {sorted(row)})")
  value = row[column]
  if isinstance(value, str):
    if not value.strip():
      raise ValueError(f"{where}: prompt column {column!r} is empty")
    messages, is_chat = (("user", value),), False
  else:
    messages, is_chat = _parse_messages(value, where, column), True
  rid = row.get(id_column) if id_column else None
  if rid is None:
    rid = default_id
  elif checks.is_int(rid) or (
      isinstance(rid, str) and rid.strip()):
    rid = str(rid)
  else:
    # An empty id, or a list / float / bool one, is a broken id column; str() of
    # it would make ids that look valid and collide later.
    raise ValueError(f"{where}: id column {id_column!r} must be a non-empty string or an "
                     f"int, got {rid!r:.80}")
  return PromptRecord(id=rid, messages=messages, is_chat=is_chat, source=where)


def _pick_column(first_row: Any, where: str, prompt_columns: Sequence[str]) -> str:
  if isinstance(first_row, dict):
    for c in prompt_columns:
      if c in first_row:
        return c
    raise ValueError(f"{where}: none of the prompt columns {list(prompt_columns)} is "
                     f"present (columns: {sorted(first_row)})")
  raise ValueError(f"{where}: expected a JSON object per line, got {type(first_row).__name__}")


def _records_from_rows(rows: Iterator[tuple[int, Any]], path: str, unit: str,
                       prompt_columns: Sequence[str], id_column: str | None
                       ) -> list[PromptRecord]:
  records, column = [], None
  for n, row in rows:
    where = f"{path}:{n} ({unit} {n})"
    if column is None:
      column = _pick_column(row, where, prompt_columns)
    records.append(parse_prompt_row(row, where, column, id_column,
                                    f"{os.path.basename(path)}:{n}"))
  if not records:
    raise ValueError(f"{path}: file is empty (no prompts; {unit} 1 missing)")
  return records


def _loads(text: str, where: str) -> Any:
  """json.loads, with every way it fails named by `where` (file and line)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from e
  except (ValueError, RecursionError) as e:
    # Python's own limits, not JSON syntax: an integer of more than 4300 digits,
    # arrays or objects nested deeper than the interpreter's stack.
    raise ValueError(f"{where}: invalid JSON: {type(e).__name__}: {str(e)[:200]}") from e


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
  # Bytes, decoded line by line, so that invalid UTF-8 is reported with its line.
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      where = f"{path}:{n} (line {n})"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from e
      if not line.strip():
        continue  # a trailing newline is not a malformed record
      yield n, _loads(line, where)


def read_json_rows(path: str) -> list:
  """The records of a JSON file (a list, or one object) or of a JSONL file, in order.

  Raises:
    ValueError: naming the file and line of invalid UTF-8 or invalid JSONL.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{line}: invalid UTF-8 at byte {e.start} of the file") from e
  try:
    rows = json.loads(text)
    return rows if isinstance(rows, list) else [rows]
  except (ValueError, RecursionError):  # not one JSON document; read it as JSONL
    pass
  rows = []
  # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085, ...,
  # which JSON strings may hold unescaped.
  for n, line in enumerate(text.split("\n"), start=1):
    if line.strip():
      rows.append(_loads(line, f"{path}:{n}"))
  return rows


def _table_rows(table, path: str) -> Iterator[dict]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  for batch in table.to_batches(max_chunksize=4096):
    try:
      rows = batch.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError) as e:  # e.g. a damaged string column
      raise ValueError(f"{path}: a record batch cannot be read (corrupt file): "
                       f"{type(e).__name__}: {e}") from e
    yield from rows


def read_prompt_file(path: str, *, prompt_columns: Sequence[str] = DEFAULT_PROMPT_COLUMNS,
                     id_column: str | None = "id") -> list[PromptRecord]:
  """Reads a `.jsonl`/`.json` (one object per line), `.parquet` or `.arrow` file.

  Args:
    path: local file.
    prompt_columns: candidate prompt columns, first match (in the first record) wins.
    id_column: column holding the prompt id; missing ids become `<file>:<line>`.

  Returns:
    The records in file order.

  Raises:
    ValueError: naming the file and line (JSONL) or row (parquet/arrow, 1-based)
      for an empty file, invalid UTF-8 or JSON, a missing column, a malformed
      prompt or id, or an unreadable parquet/arrow file.
    FileNotFoundError / TypeError: no such file, or `path` is not a path.
  """
  if isinstance(prompt_columns, str):
    prompt_columns = (prompt_columns,)
  if not isinstance(path, (str, os.PathLike)):
    # An int would pass os.path.isfile as a file descriptor.
    raise TypeError(f"prompt file must be a path (str), got {path!r:.80}")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path!r} does not exist")
  if path.endswith((".jsonl", ".json")):
    return _records_from_rows(_jsonl_rows(path), path, "line", prompt_columns, id_column)
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  try:
    if path.endswith(".parquet"):
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      table = pq.read_table(path)
    elif path.endswith(".arrow"):
      table = _read_arrow(path)
    else:
      raise ValueError(f"prompt file {path!r}: unknown extension; expected .jsonl, .json, "
                       ".parquet or .arrow")
  except (pa.ArrowException, OSError) as e:  # most of pyarrow's messages name no file
    raise ValueError(f"{path}: not a readable {os.path.splitext(path)[1]} file (truncated "
                     f"or corrupt): {e}") from e
  rows = enumerate(_table_rows(table, path), start=1)
  return _records_from_rows(rows, path, "row", prompt_columns, id_column)


def _read_arrow(path: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  # `datasets.save_to_disk` writes the IPC stream format; others write files.
  with pa.memory_map(path) as source:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      source.seek(0)
      return pa.ipc.open_file(source).read_all()


def check_unique_ids(records: Sequence[PromptRecord]) -> None:
  """Raises ValueError naming both locations of the first duplicated id."""
  seen: dict[str, str] = {}
  for r in records:
    if r.id in seen:
      raise ValueError(f"{r.source}: prompt id {r.id!r} already used at {seen[r.id]}")
    seen[r.id] = r.source


def read_prompt_files(paths: Sequence[str], **kwargs) -> list[PromptRecord]:
  """Reads several prompt files (see `read_prompt_file`); ids must be unique."""
  if isinstance(paths, str) or not paths:
    raise ValueError(f"paths must be a non-empty list of files, got {paths!r}")
  records = [r for p in paths for r in read_prompt_file(p, **kwargs)]
  check_unique_ids(records)
  return records


_DATA_EXTS = (".parquet", ".jsonl", ".json", ".arrow")
_METADATA_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


def _names_split(rel_parts: Sequence[str], split: str) -> bool:
  base = rel_parts[-1]
  return split in rel_parts[:-1] or base.startswith((f"{split}-", f"{split}.", f"{split}_"))


def _split_files(root: str, split: str) -> list[str]:
  """Data files of `split` under `root`, Hub layout (`data/<split>-0000x-of-0000y.parquet`)."""
  files = sorted(
      os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
      if f.endswith(_DATA_EXTS) and not f.startswith(".") and f not in _METADATA_FILES)
  parts = {p: os.path.relpath(p, root).split(os.sep) for p in files}
  chosen = [p for p in files if _names_split(parts[p], split)]
  if not chosen and split == "train" and not any(
      _names_split(parts[p], s) for p in files for s in _SPLIT_NAMES):
    chosen = files  # shards with no split names are all train, as in `datasets`
  return chosen


def load_hf_dataset_dir(path: str, split: str = "train", **kwargs) -> list[PromptRecord]:
  """Loads prompts from a local Hugging Face datasets directory.

  Accepts `Dataset.save_to_disk` output (`state.json` + `.arrow` shards),
  `DatasetDict.save_to_disk` output (`dataset_dict.json` + one folder per split),
  or a plain folder of parquet / JSONL files (split taken from the file or folder
  name; a folder with no split names is all `train`). Read with pyarrow, so the
  `datasets` package is not needed at run time.

  Args:
    path: the directory.
    split: which split to load.
    **kwargs: `prompt_columns`, `id_column` as in `read_prompt_file`.

  Raises:
    ValueError / FileNotFoundError: naming the directory and split.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF dataset directory {path!r} does not exist")
  dict_json = os.path.join(path, "dataset_dict.json")
  if os.path.isfile(dict_json):
    with open(dict_json, encoding="utf-8") as f:
      splits = json.load(f).get("splits", [])
    if split not in splits:
      raise ValueError(f"{dict_json}: split {split!r} not found; available: {splits}")
    return load_hf_dataset_dir(os.path.join(path, split), split, **kwargs)
  state_json = os.path.join(path, "state.json")
  if os.path.isfile(state_json):
    with open(state_json, encoding="utf-8") as f:
      shards = [d["filename"] for d in json.load(f).get("_data_files", [])]
    if not shards:
      raise ValueError(f"{state_json}: lists no `_data_files`")
    files = [os.path.join(path, s) for s in shards]
  else:
    files = _split_files(path, split)
  if not files:
    raise ValueError(f"{path}: no .parquet/.jsonl/.arrow files for split {split!r}")
  return read_prompt_files(files, **kwargs)
