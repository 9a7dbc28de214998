"""Tests for onpo_jax.data: file readers, TFDS array_record builder, HF dirs, plan."""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onpo_jax.data import prompts
from onpo_jax.data import sources
from onpo_jax.data import tfds_builder

WORDS = "hello world what is two plus three a b c sky blue".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _make_tokenizer(path):
  """A word-level tokenizer with a chat template, built offline."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
  fast.chat_template = TEMPLATE
  fast.save_pretrained(path)
  return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return _make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _expected_ids(messages):
  """Independent rendering of TEMPLATE + word-level lookup."""
  out = [VOCAB["<s>"]]
  for role, content in messages:
    out += [VOCAB[f"<|{role}|>"]] + [VOCAB[w] for w in content.split()] + [VOCAB["</s>"]]
  return out + [VOCAB["<|assistant|>"]]


def _write_jsonl(path, rows, raw_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in raw_lines:
      f.write(line + "\n")
  return str(path)


PLAIN = [{"id": f"q{i}", "prompt": " ".join(WORDS[i % 5:i % 5 + 1 + i % 3])} for i in range(6)]
CHAT = [{"context_messages": [{"role": "system", "content": "a b"},
                              {"role": "user", "content": "what is two plus three"},
                              {"role": "assistant", "content": "c"}]},
        {"context_messages": [{"role": "user", "content": "sky blue"}]}]


# ------------------------------------------------------------------- readers


def test_read_jsonl_plain_and_chat(tmp_path):
  recs = prompts.read_prompt_file(_write_jsonl(tmp_path / "p.jsonl", PLAIN))
  assert [r.id for r in recs] == [r["id"] for r in PLAIN]
  assert [r.messages for r in recs] == [(("user", r["prompt"]),) for r in PLAIN]
  assert not any(r.is_chat for r in recs)
  chat = prompts.read_prompt_file(_write_jsonl(tmp_path / "c.jsonl", CHAT))
  # The trailing assistant turn is the reference answer, not part of the prompt.
  assert chat[0].messages == (("system", "a b"), ("user", "what is two plus three"))
  assert chat[1].messages == (("user", "sky blue"),) and chat[1].is_chat
  assert [r.id for r in chat] == ["c.jsonl:1", "c.jsonl:2"]


def test_read_parquet_matches_jsonl(tmp_path):
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.Table.from_pylist(PLAIN), path)
  assert prompts.read_prompt_file(path)[3].messages == (("user", PLAIN[3]["prompt"]),)
  assert [r.id for r in prompts.read_prompt_file(path)] == [r["id"] for r in PLAIN]


@pytest.mark.parametrize("rows,raw,match", [
    (PLAIN[:2], ['{"id": "x", "prompt": "a'], r"bad\.jsonl:3 \(line 3\): invalid JSON"),
    (PLAIN[:2] + [{"id": "z", "text": "a"}], (), r"bad\.jsonl:3 \(line 3\): missing prompt column 'prompt'"),
    ([], (), r"bad\.jsonl: file is empty"),
    ([{"x": 1}], (), r"bad\.jsonl:1 \(line 1\): none of the prompt columns"),
    (PLAIN[:1] + [{"prompt": "  "}], (), r"bad\.jsonl:2 \(line 2\): prompt column 'prompt' is empty"),
    ([{"messages": [{"role": "user"}]}], (), r"bad\.jsonl:1 \(line 1\): column 'messages' message 0"),
    (PLAIN[:1], ["[1, 2]"], r"bad\.jsonl:2 \(line 2\): expected a JSON object"),
    (PLAIN[:2] + [PLAIN[0]], (), r"bad\.jsonl:3 \(line 3\): prompt id 'q0' already used at .*bad\.jsonl:1"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, rows, raw, match):
  path = _write_jsonl(tmp_path / "bad.jsonl", rows, raw)
  with pytest.raises(ValueError, match=match):
    prompts.read_prompt_files([path])


def test_bad_parquet_names_file_and_row(tmp_path):
  path = str(tmp_path / "bad.parquet")
  pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), path)
  with pytest.raises(ValueError, match=r"bad\.parquet:2 \(row 2\)"):
    prompts.read_prompt_file(path)


# ------------------------------------------------------------------ TFDS


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_tfds_builder_roundtrip_without_tensorflow(tmp_path, fmt):
  if fmt == "jsonl":
    train = _write_jsonl(tmp_path / "train.jsonl", PLAIN)
  else:
    train = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(PLAIN), train)
  test = _write_jsonl(tmp_path / "test.jsonl", CHAT)
  files = {"train": [train], "test": [test]}
  sources = tfds_builder.build_prompt_data_source(files, str(tmp_path / "tfds"))
  assert "tensorflow" not in sys.modules
  assert len(sources["train"]) == len(PLAIN) and len(sources["test"]) == len(CHAT)
  got = tfds_builder.records_from_data_source(sources["train"])
  assert got == prompts.read_prompt_file(train)  # same order, ids, text, sources
  assert tfds_builder.records_from_data_source(sources["test"]) == prompts.read_prompt_file(test)
  shards = [f for _, _, fs in os.walk(tmp_path / "tfds") for f in fs if ".array_record-" in f]
  assert len(shards) == 2, shards


def test_tfds_builder_reuses_and_fingerprints(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", PLAIN)
  b1 = tfds_builder.make_prompt_builder([path], str(tmp_path / "d"))
  b1.download_and_prepare()
  assert tfds_builder.make_prompt_builder([path], str(tmp_path / "d")).data_path == b1.data_path
  _write_jsonl(tmp_path / "p.jsonl", PLAIN[:3])  # content changed -> new dataset dir
  b2 = tfds_builder.make_prompt_builder([path], str(tmp_path / "d"))
  assert b2.data_path != b1.data_path
  b2.download_and_prepare()
  assert len(b2.as_data_source()["train"]) == 3


def test_tfds_builder_bad_file_names_file_and_line(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", PLAIN[:4], ["{not json"])
  with pytest.raises(ValueError, match=r"bad\.jsonl:5 \(line 5\): invalid JSON"):
    tfds_builder.build_prompt_data_source([path], str(tmp_path / "d"))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    tfds_builder.make_prompt_builder([str(tmp_path / "nope.jsonl")], str(tmp_path / "d"))


# --------------------------------------------------------------- HF dirs


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top  (test-only; the library reads with pyarrow)
  ds = datasets.Dataset.from_list(PLAIN)
  ds.save_to_disk(str(tmp_path / "single"))
  recs = prompts.load_hf_dataset_dir(str(tmp_path / "single"))
  assert [r.id for r in recs] == [r["id"] for r in PLAIN]
  dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(CHAT)})
  dd.save_to_disk(str(tmp_path / "dict"))
  test = prompts.load_hf_dataset_dir(str(tmp_path / "dict"), "test")
  assert test[1].messages == (("user", "sky blue"),)
  with pytest.raises(ValueError, match="split 'validation' not found"):
    prompts.load_hf_dataset_dir(str(tmp_path / "dict"), "validation")


def test_hf_parquet_and_jsonl_dir(tmp_path):
  os.makedirs(tmp_path / "data")
  pq.write_table(pa.Table.from_pylist(PLAIN[:4]), str(tmp_path / "data/train-00000-of-00002.parquet"))
  pq.write_table(pa.Table.from_pylist(PLAIN[4:]), str(tmp_path / "data/train-00001-of-00002.parquet"))
  _write_jsonl(tmp_path / "data/test-00000-of-00001.jsonl", CHAT)
  assert [r.id for r in prompts.load_hf_dataset_dir(str(tmp_path))] == [r["id"] for r in PLAIN]
  assert len(prompts.load_hf_dataset_dir(str(tmp_path), "test")) == 2
  with pytest.raises(ValueError, match="no .parquet/.jsonl/.arrow files for split 'dev'"):
    prompts.load_hf_dataset_dir(str(tmp_path), "dev")
  # Unnamed shards are all train; a named test shard never leaks into train.
  os.makedirs(tmp_path / "only_test")
  _write_jsonl(tmp_path / "only_test/test.jsonl", CHAT)
  with pytest.raises(ValueError, match="for split 'train'"):
    prompts.load_hf_dataset_dir(str(tmp_path / "only_test"))
  os.makedirs(tmp_path / "unnamed")
  _write_jsonl(tmp_path / "unnamed/part-0.jsonl", PLAIN)
  assert len(prompts.load_hf_dataset_dir(str(tmp_path / "unnamed"))) == len(PLAIN)


def test_load_prompt_records_sources_agree(tmp_path):
  path = _write_jsonl(tmp_path / "train.jsonl", PLAIN)
  files = sources.load_prompt_records("files", path)
  hf = sources.load_prompt_records("hf_dir", str(tmp_path))
  tf = sources.load_prompt_records("tfds", [path], data_dir=str(tmp_path / "tfds"))
  assert files == hf == tf and len(files) == len(PLAIN)
  with pytest.raises(ValueError, match="source must be one of"):
    sources.load_prompt_records("s3", path)
  with pytest.raises(ValueError, match="source='tfds' needs data_dir"):
    sources.load_prompt_records("tfds", path)


# ------------------------------------------------------- template, lengths


def test_chat_template_tokens(tokenizer):
  recs = [prompts.PromptRecord("a", (("user", "hello world"),), False, "x:1"),
          prompts.PromptRecord("b", (("system", "a b"), ("user", "what is c")), True, "x:2")]
  toks, ids, stats = prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=64)
  assert ids == ["a", "b"] and stats.num_dropped == stats.num_truncated == 0
  for t, r in zip(toks, recs):
    assert t.dtype == np.int32 and t.tolist() == _expected_ids(r.messages)
  plain, _, _ = prompts.tokenize_prompts(recs[:1], tokenizer, max_prompt_length=8,
                                         use_chat_template=False)
  assert plain[0].tolist() == [VOCAB["hello"], VOCAB["world"]]
  with pytest.raises(ValueError, match="chat-format prompt needs use_chat_template"):
    prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=8, use_chat_template=False)


def test_length_limit_drop_and_truncate_counts(tokenizer):
  # Templated lengths are content words + 4 (<s>, <|user|>, </s>, <|assistant|>).
  words = [WORDS[:k] for k in (1, 2, 3, 4, 5, 6)]
  recs = [prompts.PromptRecord(str(i), (("user", " ".join(w)),), False, f"x:{i}")
          for i, w in enumerate(words)]
  limit = 7  # keeps k <= 3
  toks, ids, stats = prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=limit)
  assert ids == ["0", "1", "2"]
  assert stats == prompts.LengthStats(6, 3, 3, 0, 10)
  toks, ids, stats = prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=limit,
                                              overlong="truncate")
  assert stats == prompts.LengthStats(6, 6, 0, 3, 10) and len(ids) == 6
  full = _expected_ids((("user", " ".join(words[5])),))
  # BOS kept, then the last limit-1 tokens, so the assistant header survives.
  assert toks[5].tolist() == full[:1] + full[-(limit - 1):]
  with pytest.raises(ValueError, match="overlong must be one of"):
    prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=4, overlong="cut")
  with pytest.raises(ValueError, match="all 6 prompts exceed max_prompt_length=4"):
    prompts.tokenize_prompts(recs, tokenizer, max_prompt_length=4)


def test_truncate_tokens_reference():
  t = np.arange(10, dtype=np.int32)
  np.testing.assert_array_equal(prompts.truncate_tokens(t, 4), [6, 7, 8, 9])
  np.testing.assert_array_equal(prompts.truncate_tokens(t, 4, keep_first=1), [0, 7, 8, 9])
  np.testing.assert_array_equal(prompts.truncate_tokens(t, 12, keep_first=1), t)


# ------------------------------------------------- shuffle, rounds, hosts


def test_shuffle_is_deterministic_permutation():
  a, b = prompts.shuffled_order(50, seed=3), prompts.shuffled_order(50, seed=3)
  np.testing.assert_array_equal(a, b)
  assert sorted(a.tolist()) == list(range(50))
  assert not np.array_equal(a, prompts.shuffled_order(50, seed=4))
  assert not np.array_equal(a, np.arange(50))


def test_rounds_disjoint_and_hosts_disjoint_covering():
  order = prompts.shuffled_order(40, seed=0)
  rounds = [prompts.round_indices(order, t, 12) for t in range(3)]
  assert all(len(r) == 12 for r in rounds)
  flat = np.concatenate(rounds)
  assert len(set(flat.tolist())) == 36  # pairwise disjoint
  for r in rounds:
    for count in (1, 3, 5):
      shards = [prompts.host_shard(r, p, count) for p in range(count)]
      union = np.concatenate(shards)
      assert len(union) == len(r) and set(union.tolist()) == set(r.tolist())
  with pytest.raises(ValueError, match="at most 3 rounds fit"):
    prompts.round_indices(order, 3, 12)
  with pytest.raises(ValueError, match="process_index=2 must be in"):
    prompts.host_shard(order, 2, 2)


def test_left_pad_reference():
  lists = [np.array([5, 6, 7], np.int32), np.array([9], np.int32)]
  tokens, mask = prompts.left_pad(lists, 4, pad_id=0)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (2, 4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
  np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, False, True]])
  with pytest.raises(ValueError, match="prompt 0 has shape"):
    prompts.left_pad(lists, 2, pad_id=0)


def test_prompt_set_round_batches(tokenizer):
  recs = [prompts.PromptRecord(f"p{i}", (("user", " ".join(WORDS[:1 + i % 4])),), False, f"x:{i}")
          for i in range(30)]
  ps = prompts.PromptSet.from_records(recs, tokenizer, max_prompt_length=9)
  by_id = dict(zip(ps.ids, ps.tokens))
  seen = set()
  for t in range(ps.num_rounds(8)):
    round_ids = []
    for p in range(2):
      batches = list(ps.round_batches(t, batch_size=2, prompts_per_round=8, seed=1,
                                      process_index=p, process_count=2))
      assert len(batches) == 2
      for b in batches:
        assert b.prompt_tokens.shape == (2, 9) and b.prompt_tokens.dtype == np.int32
        assert b.prompt_mask.dtype == bool
        for row, mrow, pid in zip(b.prompt_tokens, b.prompt_mask, b.ids):
          np.testing.assert_array_equal(row[mrow], by_id[pid])
          assert not mrow[:mrow.argmax()].any() and mrow[mrow.argmax():].all()  # left padded
          assert (row[~mrow] == tokenizer.pad_token_id).all()
        round_ids += list(b.ids)
    assert len(set(round_ids)) == 8 and not seen & set(round_ids)
    seen |= set(round_ids)
  assert len(seen) == 24
  # Same seed, same plan; resuming at batch 1 gives batch 1.
  again = list(ps.round_batches(1, batch_size=2, prompts_per_round=8, seed=1, process_count=2))
  resumed = list(ps.round_batches(1, batch_size=2, prompts_per_round=8, seed=1, process_count=2,
                                  start_batch=1))
  assert resumed[0].ids == again[1].ids
  with pytest.raises(ValueError, match="prompts_per_round=8 must be divisible by process_count=3"):
    next(ps.round_batches(0, batch_size=2, prompts_per_round=8, seed=1, process_count=3))
