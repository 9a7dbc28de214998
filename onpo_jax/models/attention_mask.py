"""The attention mask and what every attention kernel shares.

Visibility (`attention_weights_mask`) is causal by slot, restricted to valid
keys and, with a sliding window w, to q_i - s < w. A masked score is the
finite MASK_VALUE, not -inf: a query that sees no key at all (a left pad) gets
the softmax of S equal scores, the uniform average of all S values, so pads
stay finite and never poison gradients. Kernels that skip masked blocks
instead of scoring them restore that value with `fill_unseen`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# Finite, so a query with no visible key (a left pad) gets a uniform softmax
# instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class AttentionMask(NamedTuple):
  """What each query may see, without building the [B, Lq, S] matrix.

  Key slots are 0 .. S-1 (the positions of a KV cache, or of the sequence
  itself without one).

  Attributes:
    q_slots: [Lq] int32, nondecreasing slot of each query.
    key_mask: [B, S] bool, key slot holds a real token.
  """
  q_slots: jnp.ndarray
  key_mask: jnp.ndarray


def attention_weights_mask(q_slots: jnp.ndarray, k_slots: jnp.ndarray,
                           key_mask: jnp.ndarray,
                           sliding_window: int | None) -> jnp.ndarray:
  """Which keys each query may see: causal by slot, valid keys, window.

  Args:
    q_slots: [Lq] slot index of each query.
    k_slots: [S] slot index of each key.
    key_mask: [B, S] bool, key slot holds a real token.
    sliding_window: None, or keep only keys with q_slot - k_slot < window.

  Returns:
    [B, Lq, S] bool.
  """
  visible = k_slots[None, :] <= q_slots[:, None]
  if sliding_window is not None:
    visible &= k_slots[None, :] > q_slots[:, None] - sliding_window
  return visible[None] & key_mask[:, None, :]


def accum_dtype(dtype):
  """float32 for bf16/f16/f32 inputs, float64 for float64 (exact-mode worlds)."""
  return jnp.promote_types(dtype, jnp.float32)


def check_shapes(q, k, v, mask: AttentionMask):
  """Raises ValueError unless q, k, v and mask have the shapes kernels take."""
  if q.ndim != 5 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(
        f"q / k / v: expected [B, Lq, Hkv, G, d] and two [B, S, Hkv, d], got "
        f"{q.shape}, {k.shape}, {v.shape}")
  b, lq, hkv, _, d = q.shape
  if k.shape[0] != b or k.shape[2:] != (hkv, d):
    raise ValueError(f"k: shape {k.shape} does not match q {q.shape}")
  if mask.q_slots.shape != (lq,) or mask.key_mask.shape != (b, k.shape[1]):
    raise ValueError(
        f"mask: expected q_slots [{lq}] and key_mask [{b}, {k.shape[1]}], got "
        f"{mask.q_slots.shape}, {mask.key_mask.shape}")


def has_visible_key(mask: AttentionMask, sliding_window) -> jnp.ndarray:
  """[B, Lq] bool: query i sees at least one valid key.

  Counts the valid keys in [q_i - w + 1, q_i] (or [0, q_i]) from a prefix sum
  of the key mask, c[t] = #valid keys in slots [0, t): O(B·(S + Lq)).
  """
  key_mask = mask.key_mask
  b, s_len = key_mask.shape
  c = jnp.concatenate(
      [jnp.zeros((b, 1), jnp.int32),
       jnp.cumsum(key_mask.astype(jnp.int32), axis=1)], axis=1)
  q = mask.q_slots.astype(jnp.int32)
  hi = jnp.clip(q + 1, 0, s_len)
  lo = (jnp.zeros_like(q) if sliding_window is None
        else jnp.clip(q - sliding_window + 1, 0, s_len))
  return (c[:, hi] - c[:, lo]) > 0


def fill_unseen(out, v, seen):
  """out where the query sees a key, else the uniform average of all values.

  That average is what the softmax over S equal masked scores gives a query
  with no visible key (a left pad) in `dense_attention`; kernels that skip
  masked blocks leave such queries at an arbitrary finite value instead.

  Args:
    out: [B, Lq, Hkv, G, d] kernel output.
    v: [B, S, Hkv, d] values.
    seen: [B, Lq] bool, from `has_visible_key`.
  """
  mean_v = jnp.mean(v.astype(accum_dtype(v.dtype)), axis=1).astype(v.dtype)
  return jnp.where(seen[:, :, None, None, None], out, mean_v[:, None, :, None])
