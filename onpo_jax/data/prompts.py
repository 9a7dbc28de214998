"""Prompt collections: reading, chat templating, length limits, splits and batches.

The self-play loop (ONPO arXiv 2502.16852, Algorithm 1, step a) samples responses
from π_t "for a batch of prompts"; this module turns a prompt collection into
those batches. Pipeline, every step deterministic:

  records (JSONL / parquet / HF datasets dir / TFDS array_record)
    -> chat template with the policy tokenizer (add_generation_prompt=True)
    -> length limit: drop or truncate, counts logged and returned
    -> one global shuffle from a seed
    -> round t gets its own disjoint slice of `prompts_per_round` prompts
    -> host p of P gets every P-th prompt of that slice (disjoint, covering)
    -> left-padded `prompt_tokens [B, P] int32`, `prompt_mask [B, P] bool`.

Every host computes the same global order, so no communication is needed to
agree on the split. Prompts may be plain strings or chat-format lists of
`{"role", "content"}` messages (RLHFlow/prompt-collection-v0.1 stores its
prompts as `context_messages`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np

# Columns tried in order when the caller does not name one; the first present in
# a file's first record is used for the whole file.
DEFAULT_PROMPT_COLUMNS = ("prompt", "messages", "context_messages", "context")
OVERLONG_POLICIES = ("drop", "truncate")


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
  elif (isinstance(rid, int) and not isinstance(rid, bool)) or (
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


# ---------------------------------------------------------------- tokenisation


@dataclasses.dataclass(frozen=True)
class LengthStats:
  """What the length limit did (logged, and returned so callers can record it).

  Attributes:
    num_prompts: prompts seen.
    num_kept: prompts kept (truncated ones included).
    num_dropped: prompts longer than the limit that were dropped.
    num_truncated: prompts longer than the limit that were truncated.
    max_length_seen: longest templated prompt before the limit, in tokens.
  """
  num_prompts: int
  num_kept: int
  num_dropped: int
  num_truncated: int
  max_length_seen: int


def render_prompt(tokenizer, record: PromptRecord, use_chat_template: bool = True) -> str:
  """The text the policy is conditioned on.

  With `use_chat_template`, the tokenizer's chat template with
  `add_generation_prompt=True`, so the prompt ends with the assistant header and
  the policy's first sampled token starts its answer.

  Raises:
    ValueError: the tokenizer has no chat template, or a chat-format prompt is
      given without one.
  """
  if use_chat_template:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("use_chat_template=True but the tokenizer has no chat_template; "
                       "set use_chat_template=False for a base model")
    msgs = [{"role": r, "content": c} for r, c in record.messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  if record.is_chat:
    raise ValueError(f"{record.source}: chat-format prompt needs use_chat_template=True")
  return record.messages[0][1]


def truncate_tokens(tokens: np.ndarray, max_length: int, keep_first: int = 0) -> np.ndarray:
  """Keeps the first `keep_first` and the last `max_length - keep_first` tokens.

  The end of a templated prompt (the assistant header) must survive, so the cut
  is taken from the left; `keep_first=1` keeps a leading BOS.
  """
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
  if not 0 <= keep_first < max_length:
    raise ValueError(f"keep_first={keep_first} must be in [0, max_length={max_length})")
  if tokens.shape[0] <= max_length:
    return tokens
  return np.concatenate([tokens[:keep_first], tokens[tokens.shape[0] - (max_length - keep_first):]])


def tokenize_prompts(records: Sequence[PromptRecord], tokenizer, *, max_prompt_length: int,
                     overlong: str = "drop", use_chat_template: bool = True
                     ) -> tuple[list[np.ndarray], list[str], LengthStats]:
  """Templates and tokenises prompts and applies the length limit.

  Args:
    records: the prompts.
    tokenizer: the policy's transformers tokenizer.
    max_prompt_length: P, the longest prompt kept, in tokens.
    overlong: 'drop' removes longer prompts; 'truncate' keeps their last tokens
      (and a leading BOS, if the template starts with one).
    use_chat_template: see `render_prompt`.

  Returns:
    (token arrays int32, ids, LengthStats), kept prompts in input order.
  """
  if max_prompt_length < 1:
    raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
  if overlong not in OVERLONG_POLICIES:
    raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
  tokens_out, ids, dropped, truncated, longest = [], [], 0, 0, 0
  bos = getattr(tokenizer, "bos_token_id", None)
  texts = [render_prompt(tokenizer, r, use_chat_template) for r in records]
  # The template already wrote any BOS; adding special tokens would double it.
  encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
  for r, ids_r in zip(records, encoded):
    toks = np.asarray(ids_r, np.int32)
    if toks.size == 0:
      raise ValueError(f"{r.source}: prompt tokenises to zero tokens")
    longest = max(longest, int(toks.size))
    if toks.size > max_prompt_length:
      if overlong == "drop":
        dropped += 1
        continue
      keep_first = int(bos is not None and toks[0] == bos and max_prompt_length > 1)
      toks = truncate_tokens(toks, max_prompt_length, keep_first)
      truncated += 1
    tokens_out.append(toks)
    ids.append(r.id)
  stats = LengthStats(len(records), len(tokens_out), dropped, truncated, longest)
  logging.info("prompts: %d read, %d kept, %d dropped and %d truncated at "
               "max_prompt_length=%d (longest %d tokens)", stats.num_prompts,
               stats.num_kept, dropped, truncated, max_prompt_length, longest)
  if not tokens_out:
    raise ValueError(f"all {len(records)} prompts exceed max_prompt_length="
                     f"{max_prompt_length} and overlong='drop'")
  return tokens_out, ids, stats


# ------------------------------------------------- order, rounds, hosts, batches


def shuffled_order(num_prompts: int, seed: int) -> np.ndarray:
  """A permutation of range(num_prompts) fixed by `seed` (same on every host)."""
  if num_prompts < 0:
    raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
  return np.random.default_rng(np.random.SeedSequence(seed)).permutation(num_prompts)


def round_indices(order: np.ndarray, round_index: int, prompts_per_round: int) -> np.ndarray:
  """Round t's own slice order[t·n : (t+1)·n]; rounds never share a prompt.

  Raises:
    ValueError: naming `prompts_per_round` when round t would run past the end.
  """
  if prompts_per_round < 1:
    raise ValueError(f"prompts_per_round must be >= 1, got {prompts_per_round}")
  if round_index < 0:
    raise ValueError(f"round_index must be >= 0, got {round_index}")
  end = (round_index + 1) * prompts_per_round
  if end > order.shape[0]:
    raise ValueError(
        f"round_index={round_index} with prompts_per_round={prompts_per_round} needs "
        f"{end} prompts but only {order.shape[0]} remain after the length limit; "
        f"at most {order.shape[0] // prompts_per_round} rounds fit")
  return order[end - prompts_per_round:end]


def host_shard(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Every `process_count`-th element from `process_index`: disjoint and covering."""
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count})")
  return indices[process_index::process_count]


def left_pad(token_lists: Sequence[np.ndarray], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads to `prompt_tokens [B, length] int32`, `prompt_mask [B, length] bool`.

  Left padding puts every prompt's last token in the last column, where the
  sampler starts generating; positions are later derived from the mask.
  """
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), bool)
  for i, t in enumerate(token_lists):
    if t.ndim != 1 or not 0 < t.shape[0] <= length:
      raise ValueError(f"prompt {i} has shape {t.shape}; expected 1-D with 1..{length} tokens")
    tokens[i, length - t.shape[0]:] = t
    mask[i, length - t.shape[0]:] = True
  return tokens, mask


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """One host batch: `prompt_tokens [B,P] int32`, `prompt_mask [B,P] bool`, B ids."""
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  ids: tuple[str, ...]


@dataclasses.dataclass
class PromptSet:
  """Tokenised prompts plus the deterministic round / host / batch plan.

  Build with `PromptSet.from_records`; iterate with `round_batches`.
  """
  tokens: list[np.ndarray]
  ids: list[str]
  stats: LengthStats
  max_prompt_length: int
  pad_id: int

  @classmethod
  def from_records(cls, records: Sequence[PromptRecord], tokenizer, *,
                   max_prompt_length: int, overlong: str = "drop",
                   use_chat_template: bool = True) -> "PromptSet":
    """Tokenises `records` (see `tokenize_prompts`); pad id from the tokenizer."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
      pad_id = tokenizer.eos_token_id  # masked out anyway; any valid id works
    if pad_id is None:
      raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
    tokens, ids, stats = tokenize_prompts(records, tokenizer, max_prompt_length=max_prompt_length,
                                          overlong=overlong, use_chat_template=use_chat_template)
    return cls(tokens, ids, stats, max_prompt_length, int(pad_id))

  def __len__(self) -> int:
    return len(self.tokens)

  def num_rounds(self, prompts_per_round: int) -> int:
    """How many disjoint rounds of `prompts_per_round` prompts fit."""
    return len(self) // prompts_per_round

  def host_round_indices(self, round_index: int, *, prompts_per_round: int, seed: int,
                         process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices into `tokens` that this host uses in round `round_index`."""
    if prompts_per_round % process_count:
      # Hosts must run the same number of steps, or collectives deadlock.
      raise ValueError(f"prompts_per_round={prompts_per_round} must be divisible by "
                       f"process_count={process_count}")
    order = shuffled_order(len(self), seed)
    return host_shard(round_indices(order, round_index, prompts_per_round),
                      process_index, process_count)

  def round_batches(self, round_index: int, *, batch_size: int, prompts_per_round: int,
                    seed: int, process_index: int = 0, process_count: int = 1,
                    drop_remainder: bool = True, start_batch: int = 0
                    ) -> Iterator[PromptBatch]:
    """Yields this host's batches of round `round_index`.

    Args:
      round_index: t (0-based); each round has its own prompts.
      batch_size: B, per host.
      prompts_per_round: global prompts per round (all hosts together).
      seed: the shuffle seed.
      process_index: this host (`jax.process_index()`).
      process_count: hosts (`jax.process_count()`).
      drop_remainder: drop a last batch smaller than B (keeps shapes static).
      start_batch: skip this many batches (resume from a data cursor).
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = self.host_round_indices(round_index, prompts_per_round=prompts_per_round, seed=seed,
                                  process_index=process_index, process_count=process_count)
    n_full = idx.shape[0] // batch_size
    if drop_remainder and idx.shape[0] % batch_size:
      logging.info("round %d: dropping %d prompts that do not fill a batch of %d",
                   round_index, idx.shape[0] % batch_size, batch_size)
    n_batches = n_full if drop_remainder else -(-idx.shape[0] // batch_size)
    for b in range(start_batch, n_batches):
      sel = idx[b * batch_size:(b + 1) * batch_size]
      tokens, mask = left_pad([self.tokens[i] for i in sel], self.max_prompt_length, self.pad_id)
      yield PromptBatch(prompt_tokens=tokens, prompt_mask=mask,
                        ids=tuple(self.ids[i] for i in sel))
