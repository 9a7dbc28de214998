"""Host-side preparation of a prompt batch for the samplers (numpy, before any jit).

A batch is left-padded to a bucket length (`pad_prompts_to_bucket`), so a new
batch of the same size within a bucket reuses the compiled sampler; and the rows
that hold the same prompt are found (`distinct_prompt_rows`), so its prefill
runs once (`SamplingConfig.share_prefill`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket ≥ length; raises if the prompt fits no bucket."""
  for b in buckets:
    if length <= b:
      return int(b)
  raise ValueError(
      f"prompt length {length} exceeds the largest prompt bucket {max(buckets)}; "
      "add a larger entry to SamplingConfig.prompt_buckets")


def pad_prompts_to_bucket(prompt_tokens, prompt_mask, buckets: Sequence[int], pad_id: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads a left-padded prompt batch (host side) to its bucket length.

  Leading all-pad columns are dropped first, so the bucket depends on the
  longest real prompt, not on how the caller padded.

  Args:
    prompt_tokens: [B, P] int token ids, left-padded.
    prompt_mask: [B, P] bool, False on padding; every row needs one real token
      and the padding must all be on the left.
    buckets: increasing prompt lengths.
    pad_id: id written on the new padding.

  Returns:
    (tokens [B, bucket] int32, mask [B, bucket] bool) as numpy arrays.

  Raises:
    ValueError: on shape mismatch, an empty row, right padding or no bucket.
  """
  tokens = np.asarray(prompt_tokens)
  mask = np.asarray(prompt_mask)
  if tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must have shape [B, P], got {tokens.shape}")
  if mask.shape != tokens.shape:
    raise ValueError(
        f"prompt_mask shape {mask.shape} must equal prompt_tokens shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be integer, got dtype {tokens.dtype}")
  mask = mask.astype(bool)
  if not mask.any(axis=1).all():
    raise ValueError(
        f"prompt_mask rows {np.flatnonzero(~mask.any(axis=1)).tolist()} have no real token")
  if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
    raise ValueError("prompts must be left-padded: prompt_mask must be False...False True...True "
                     "in every row")
  length = int(mask.sum(axis=1).max())
  tokens, mask = tokens[:, -length:], mask[:, -length:]
  bucket = bucket_length(length, buckets)
  pad = bucket - length
  tokens = np.pad(tokens.astype(np.int32), ((0, 0), (pad, 0)), constant_values=pad_id)
  mask = np.pad(mask, ((0, 0), (pad, 0)), constant_values=False)
  return tokens, mask


def distinct_prompt_rows(tokens: np.ndarray, mask: np.ndarray, multiple: int = 1
                         ) -> tuple[np.ndarray, np.ndarray] | None:
  """Rows to prefill so that each distinct prompt runs once (host side).

  Two rows hold the same prompt when their masks and their real tokens agree
  (what a pad slot holds is never read). The distinct prompts' count U is
  rounded up to a power of two, then to a multiple of `multiple` (the batch
  axis's shards), so that a few prefill shapes serve every batch; the extra
  rows repeat the first distinct prompt.

  Args:
    tokens: [B, P] int prompt tokens.
    mask: [B, P] bool, False on padding.
    multiple: the number of rows to prefill is a multiple of it.

  Returns:
    (first [U'] int, of_row [B] int): prefill rows `first`, then row b's
    cache is row `of_row[b]` of theirs, so `first[of_row[b]]` holds b's
    prompt. None when U' is not below B (nothing to save).
  """
  batch = tokens.shape[0]
  key = np.concatenate([np.where(mask, tokens, -1), mask], axis=1)
  _, first, of_row = np.unique(key, axis=0, return_index=True, return_inverse=True)
  count = 1 << (first.size - 1).bit_length()
  count = -(-count // multiple) * multiple
  if count >= batch:
    return None
  first = np.concatenate([first, np.full(count - first.size, first[0])])
  return first, of_row.reshape(-1)
