"""Prompt collections: reading, chat templating, length limits, splits and batches.

The self-play loop (ONPO arXiv 2502.16852, Algorithm 1, step a) samples responses
from π_t "for a batch of prompts"; this module turns a prompt collection into
those batches. Pipeline, every step deterministic:

  records (JSONL / parquet / HF datasets dir: `prompt_files`; TFDS array_record)
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
from typing import Iterator, Sequence

from absl import logging
import numpy as np

# Re-exported: reading files was part of this module's API.
from onpo_jax.data.prompt_files import (DEFAULT_PROMPT_COLUMNS, PromptRecord, check_unique_ids,
                                        load_hf_dataset_dir, parse_prompt_row, read_json_rows,
                                        read_prompt_file, read_prompt_files)

__all__ = [
    "check_unique_ids",
    "DEFAULT_PROMPT_COLUMNS",
    "host_shard",
    "left_pad",
    "LengthStats",
    "load_hf_dataset_dir",
    "OVERLONG_POLICIES",
    "parse_prompt_row",
    "PromptBatch",
    "PromptRecord",
    "PromptSet",
    "read_json_rows",
    "read_prompt_file",
    "read_prompt_files",
    "render_prompt",
    "round_indices",
    "shuffled_order",
    "tokenize_prompts",
    "truncate_tokens",
]

OVERLONG_POLICIES = ("drop", "truncate")


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
