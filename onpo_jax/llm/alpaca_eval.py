"""AlpacaEval-format outputs and oracle win rates with a confidence interval.

AlpacaEval 2.0 (the paper's main benchmark, ONPO arXiv 2502.16852 §5) reads a
JSON list of objects {"instruction", "output", "generator"} (plus an optional
"dataset"); `write_outputs` writes exactly that after `validate_outputs` has
checked it, so the file can be handed to `alpaca_eval --model_outputs`.

During training the judge of the run (the same general-preference oracle the
policy is aligned with) compares the policy's outputs with the SFT policy's
(or with a reference-outputs file) on each evaluation prompt:

  p_i = P(y_policy,i ≻ y_ref,i | x_i)          (ties count ½, docs/baselines.md §7)
  win rate  ŵ = (1/n) Σ_i p_i
  std. error s = sd(p) / √n                    (sample sd, ddof = 1)
  CI        [ŵ − z s, ŵ + z s] ∩ [0, 1],       z = Φ⁻¹((1 + level)/2)

a normal-approximation interval over prompts (the oracle's own probability is
used per prompt, not a Bernoulli draw, so the only randomness is the prompt
sample and the policies' outputs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Sequence

import numpy as np

REQUIRED_FIELDS = ("instruction", "output", "generator")
OPTIONAL_FIELDS = ("dataset",)


def validate_outputs(records: Any) -> None:
  """Checks AlpacaEval's model-outputs schema.

  Args:
    records: the decoded JSON value.

  Raises:
    ValueError: naming the record index and field when `records` is not a
      non-empty list of objects whose `instruction` and `generator` are
      non-empty strings, `output` a string and `dataset` (optional) a string,
      with no other keys.
  """
  if not isinstance(records, list) or not records:
    raise ValueError(f"AlpacaEval outputs must be a non-empty JSON list, got {type(records).__name__}")
  for i, r in enumerate(records):
    if not isinstance(r, dict):
      raise ValueError(f"AlpacaEval record {i}: expected an object, got {type(r).__name__}")
    for field in REQUIRED_FIELDS:
      if field not in r:
        raise ValueError(f"AlpacaEval record {i}: missing field {field!r}")
      if not isinstance(r[field], str):
        raise ValueError(f"AlpacaEval record {i}: field {field!r} must be a string, got "
                         f"{type(r[field]).__name__}")
    for field in ("instruction", "generator"):
      if not r[field].strip():
        raise ValueError(f"AlpacaEval record {i}: field {field!r} must be non-empty")
    if "dataset" in r and not isinstance(r["dataset"], str):
      raise ValueError(f"AlpacaEval record {i}: field 'dataset' must be a string")
    extra = set(r) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if extra:
      raise ValueError(f"AlpacaEval record {i}: unexpected fields {sorted(extra)}; allowed "
                       f"{list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")


def make_records(instructions: Sequence[str], outputs: Sequence[str], generator: str,
                 datasets: Sequence[str | None] | None = None) -> list[dict]:
  """AlpacaEval records, one per instruction (validated)."""
  if len(instructions) != len(outputs):
    raise ValueError(f"instructions ({len(instructions)}) and outputs ({len(outputs)}) must "
                     "have the same length")
  if datasets is not None and len(datasets) != len(instructions):
    raise ValueError(f"datasets ({len(datasets)}) must match instructions ({len(instructions)})")
  records = []
  for i, (ins, out) in enumerate(zip(instructions, outputs)):
    r = {"instruction": ins, "output": out, "generator": generator}
    if datasets is not None and datasets[i] is not None:
      r["dataset"] = datasets[i]
    records.append(r)
  validate_outputs(records)
  return records


def write_outputs(path: str, records: list[dict]) -> str:
  """Validates and writes `records` as AlpacaEval JSON (atomic rename)."""
  validate_outputs(records)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)
  return path


def read_outputs(path: str) -> list[dict]:
  """Reads and validates an AlpacaEval outputs JSON file."""
  with open(path, encoding="utf-8") as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e.msg} at line {e.lineno}") from e
  try:
    validate_outputs(records)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return records


def read_instructions(path: str) -> tuple[list[str], list[str | None]]:
  """(instructions, datasets) from an evaluation prompt file.

  Accepts AlpacaEval's evaluation set layout: a JSON list, or JSONL, of objects
  with an "instruction" (other fields, e.g. a reference "output", are ignored);
  a prompt file's "prompt" stands for the instruction when there is none.
  """
  from onpo_jax.data import prompts  # pylint: disable=g-import-not-at-top
  rows = prompts.read_json_rows(path)
  if not rows:
    raise ValueError(f"{path}: expected a non-empty JSON list (or JSONL) of objects")
  instructions, datasets = [], []
  for i, r in enumerate(rows):
    text = r.get("instruction", r.get("prompt")) if isinstance(r, dict) else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{path}: record {i} needs a non-empty string 'instruction' (or "
                       "'prompt')")
    instructions.append(text)
    datasets.append(r.get("dataset") if isinstance(r.get("dataset"), str) else None)
  return instructions, datasets


@dataclasses.dataclass(frozen=True)
class WinRate:
  """Win rate of a policy against a reference, with a normal-approximation CI."""
  win_rate: float
  stderr: float
  ci_low: float
  ci_high: float
  confidence: float
  num_prompts: int

  def as_dict(self, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def win_rate(prefs, confidence: float = 0.95) -> WinRate:
  """Mean of per-prompt preference probabilities and its CI (module docstring).

  Args:
    prefs: [n] P(policy ≻ reference | x_i) in [0, 1]; a tie is ½.
    confidence: CI level in (0, 1).

  Returns:
    WinRate; with n = 1 the standard error is undefined and the CI is [0, 1].

  Raises:
    ValueError: empty or non-1-D `prefs`, values outside [0, 1] or non-finite,
      or `confidence` outside (0, 1).
  """
  p = np.asarray(prefs, np.float64)
  if p.ndim != 1 or p.size == 0:
    raise ValueError(f"prefs must be a non-empty 1-D array, got shape {p.shape}")
  if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
    raise ValueError(f"prefs must lie in [0, 1]; got min {p.min()}, max {p.max()}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  n = p.size
  mean = float(p.mean())
  if n == 1:
    return WinRate(mean, math.nan, 0.0, 1.0, confidence, 1)
  se = float(p.std(ddof=1) / math.sqrt(n))
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  return WinRate(mean, se, max(0.0, mean - z * se), min(1.0, mean + z * se), confidence, n)


def right_pad(seqs: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists: (tokens [n, R] int32, mask [n, R] bool).

  `length` defaults to the longest list (at least 1); longer lists are cut.
  """
  length = max([1] + [len(s) for s in seqs]) if length is None else int(length)
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = list(s)[:length]
    tokens[i, :len(s)] = s
    mask[i, :len(s)] = True
  return tokens, mask


def encode_outputs(tokenizer, texts: Sequence[str], max_length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Response texts (e.g. a reference-outputs file) as right-padded policy tokens."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return right_pad(ids, max_length, pad)


def same_responses(a_tokens, a_mask, b_tokens, b_mask) -> np.ndarray:
  """[n] bool: rows whose two responses have the same real tokens (pads ignored)."""
  width = max(np.shape(a_tokens)[1], np.shape(b_tokens)[1])

  def real(tokens, mask):
    t = np.where(np.asarray(mask, bool), np.asarray(tokens), -1)
    return np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=-1)

  return (real(a_tokens, a_mask) == real(b_tokens, b_mask)).all(axis=1)


def oracle_preferences(oracle, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask,
                       micro_batch_size: int = 8) -> np.ndarray:
  """[n] P(a_i ≻ b_i | x_i) from any `onpo_jax.oracles.Oracle`, in micro-batches.

  Rows whose two responses are the same get P = ½ without a query: every oracle
  has P(a ≻ a) = ½ (`onpo_jax.oracles.base`), and a judge model's forward pass
  is the evaluation's largest cost when a policy's greedy answers mostly match
  the reference's. The last micro-batch is padded by repeating its first row
  so every oracle call has the same shape (no recompilation); padded rows are
  dropped.
  """
  arrays = [np.asarray(x) for x in (prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens,
                                    b_mask)]
  n = arrays[0].shape[0]
  for name, x in zip(("prompt_mask", "a_tokens", "a_mask", "b_tokens", "b_mask"), arrays[1:]):
    if x.ndim != 2 or x.shape[0] != n:
      raise ValueError(f"{name} must be [n={n}, ...], got shape {x.shape}")
  if n == 0 or micro_batch_size < 1:
    raise ValueError(f"need n >= 1 rows and micro_batch_size >= 1, got {n}, {micro_batch_size}")
  probs = np.full(n, 0.5)
  rows = np.flatnonzero(~same_responses(*arrays[2:]))
  if rows.size:
    pad = -rows.size % micro_batch_size
    asked = [np.concatenate([x[rows], np.repeat(x[rows[:1]], pad, 0)]) for x in arrays]
    out = [np.asarray(oracle.preference_prob(*[x[i:i + micro_batch_size] for x in asked]),
                      np.float64)
           for i in range(0, rows.size + pad, micro_batch_size)]
    probs[rows] = np.concatenate(out)[:rows.size]
  return probs
