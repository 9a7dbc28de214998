"""Rotary position embeddings (RoPE), with Llama-3.1 and linear scaling.

References:
  Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
  arXiv 2104.09864, eq. (34) (the "rotate half" layout used by HF Llama).
  Llama 3 herd of models, arXiv 2407.21783, sec. 3.3.3 / the released
  `apply_scaling` (frequency-dependent interpolation of the inverse
  frequencies, 'llama3' rope_type).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: tuple[tuple[str, Any], ...] | None = None
                  ) -> np.ndarray:
  """Inverse frequencies θ^(-2i/d), i < d/2, optionally rescaled.

  Args:
    head_dim: per-head width d (even).
    theta: base wavelength.
    scaling: None, or items of a HF rope-scaling dict with rope_type 'llama3'
      (factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings) or 'linear' (factor).

  Returns:
    float32 numpy array [head_dim // 2]. Computed in float64 on the host
    because it is a constant of the model.

  Raises:
    ValueError: odd head_dim or an unsupported rope_type.
  """
  if head_dim % 2:
    raise ValueError(f"head_dim: expected an even value, got {head_dim}")
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                              / head_dim))
  if scaling is None:
    return inv_freq.astype(np.float32)
  params = dict(scaling)
  rope_type = params.get("rope_type")
  if rope_type == "linear":
    return (inv_freq / params["factor"]).astype(np.float32)
  if rope_type != "llama3":
    raise ValueError(f"rope_scaling: unsupported rope_type {rope_type!r}")
  factor = params["factor"]
  low, high = params["low_freq_factor"], params["high_freq_factor"]
  old_len = params["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = old_len / low
  high_freq_wavelen = old_len / high
  # Long wavelengths (low frequencies) are interpolated by `factor`, short ones
  # kept, and the band between them blended linearly in old_len / wavelen.
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray,
               inv_freq: jnp.ndarray) -> jnp.ndarray:
  """Rotates query/key vectors by their positions (rotate-half layout).

  out = x·cos(pθ) + rotate_half(x)·sin(pθ), with the first and second halves
  of the last axis forming the rotated pairs (RoFormer eq. 34 as laid out in
  HF Llama checkpoints).

  Args:
    x: [B, L, H, d] queries or keys.
    positions: [B, L] integer positions.
    inv_freq: [d // 2] float32 inverse frequencies.

  Returns:
    [B, L, H, d] array of x.dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"x: expected [B, L, H, d], got shape {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(
        f"positions: expected shape {x.shape[:2]}, got {positions.shape}")
  if inv_freq.shape != (x.shape[-1] // 2,):
    raise ValueError(
        f"inv_freq: expected shape {(x.shape[-1] // 2,)}, got {inv_freq.shape}")
  # float32 angles as in HF (float64 for float64 inputs).
  ft = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions.astype(ft)[..., None] * inv_freq.astype(ft)  # [B, L, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos = jnp.cos(angles).astype(x.dtype)
  sin = jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def apply_rope_features_major(x: jnp.ndarray, positions: jnp.ndarray,
                              inv_freq: jnp.ndarray) -> jnp.ndarray:
  """`apply_rope` for one token per row laid out [..., d, B] (head_dim, then batch).

  The layout of `feature_major.decode_step`'s queries and keys ([H, d, B]);
  the same rotation (RoFormer eq. 34) of each column b by positions[b]. A
  function of its own rather than a second layout inside `apply_rope`, so the
  training path compiles as before: a rewritten `apply_rope` fused
  differently, and the float64 Gauss-Newton solves of
  tests/test_lora_testbed.py, which stop at an excess loss of 1e-12, moved.

  Args:
    x: [..., d, B] queries or keys.
    positions: [B] integer positions.
    inv_freq: [d // 2] float32 inverse frequencies.

  Returns:
    [..., d, B] array of x.dtype.
  """
  if x.ndim < 2 or positions.shape != x.shape[-1:]:
    raise ValueError(
        f"x / positions: expected [..., d, B] and [B], got {x.shape}, {positions.shape}")
  if inv_freq.shape != (x.shape[-2] // 2,):
    raise ValueError(
        f"inv_freq: expected shape {(x.shape[-2] // 2,)}, got {inv_freq.shape}")
  ft = jnp.promote_types(x.dtype, jnp.float32)
  angles = inv_freq.astype(ft)[:, None] * positions.astype(ft)  # [d/2, B]
  angles = jnp.concatenate([angles, angles], axis=0)
  cos = jnp.cos(angles).astype(x.dtype)
  sin = jnp.sin(angles).astype(x.dtype)
  half = x.shape[-2] // 2
  rotated = jnp.concatenate([-x[..., half:, :], x[..., :half, :]], axis=-2)
  return x * cos + rotated * sin
