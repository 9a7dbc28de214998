"""Grouped-query attention kernels: dense, chunked, jax.nn, Pallas splash.

Every kernel computes, for batch row b, query i (at cache slot q_i) and the
key slots s = 0 .. S-1,

  out[b, i] = Σ_s softmax_s(q_i · k_s · scale + M[b, i, s]) v_s,

where M is 0 where key s is visible to query i and the large negative
MASK_VALUE elsewhere (`attention_mask.py`: visibility, and why a query that
sees no key gets the uniform average of all S values).

Shapes: queries [B, Lq, Hkv, G, d] (query head h = kv head h // G, the HF
repeat_kv order), keys / values [B, S, Hkv, d], output like the queries.
Scores are float32 at least (float64 inputs stay float64).

* `dense_attention` builds the [B, Hkv, G, Lq, S] score matrix.
* `chunked_attention` never does: FlashAttention's online softmax over key
  blocks with a custom VJP, in pure JAX (`flash_attention.py`).
* `sdpa_attention` calls `jax.nn.dot_product_attention`: cuDNN's fused kernel
  on GPU for bfloat16/float16 inputs, XLA's reference path (which
  materialises the scores) everywhere else.
* `splash_attention` runs Pallas's block-sparse FlashAttention kernel for TPU
  (the glue is in `splash_attention.py`; interpreted off TPU). `attend`
  sends it self-attention over a whole sequence, and cached decoding steps
  to `chunked_attention`.
* `cache_attention` is the dense kernel over the decoder's KV cache (keys
  [B, Hkv, d, S], values [B, Hkv, S, d]); `attend_cache` sends decoding steps
  to it whatever the configured kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# AttentionMask, attention_weights_mask, has_visible_key and check_shapes are
# part of this module's interface (the decoder layers and tests use them here).
from onpo_jax.models.attention_mask import (
    MASK_VALUE, AttentionMask, accum_dtype, attention_weights_mask,
    check_shapes, fill_unseen, has_visible_key)
from onpo_jax.models.flash_attention import chunked_attention

IMPLEMENTATIONS = ("dense", "chunked", "dot_product_attention", "splash")


# ------------------------------------------------------------------- dense


def _score_probs(scores, mask: AttentionMask, sliding_window, scale: float,
                 visible_axes: tuple[int, ...]):
  """softmax over the last axis of scale · scores + M (M: the module docstring).

  `visible_axes` are the axes of `scores` besides batch, queries and keys,
  where the [B, Lq, S] visibility is broadcast.
  """
  visible = attention_weights_mask(
      mask.q_slots, jnp.arange(scores.shape[-1], dtype=jnp.int32),
      mask.key_mask, sliding_window)
  visible = jnp.expand_dims(visible, visible_axes)
  return jax.nn.softmax(jnp.where(visible, scores * scale, MASK_VALUE),
                        axis=-1)


def dense_attention(q, k, v, mask: AttentionMask, *, sliding_window,
                    scale: float):
  """Softmax attention through the full [B, Hkv, G, Lq, S] score matrix.

  Args:
    q: [B, Lq, Hkv, G, d] queries (compute dtype).
    k, v: [B, S, Hkv, d] keys and values (same dtype).
    mask: the AttentionMask.
    sliding_window: None or the window w.
    scale: the score scale, 1/√d for Llama-family models.

  Returns:
    [B, Lq, Hkv, G, d] in the compute dtype.
  """
  check_shapes(q, k, v, mask)
  dt = q.dtype
  scores = jnp.einsum("blkgd,bskd->bkgls", q, k,
                      preferred_element_type=accum_dtype(dt))
  probs = _score_probs(scores, mask, sliding_window, scale, (1, 2)).astype(dt)
  return jnp.einsum("bkgls,bskd->blkgd", probs, v)


# ----------------------------------------------------------------- KV cache


def cache_attention(q, k, v, mask: AttentionMask, *, sliding_window,
                    scale: float):
  """Dense attention of a few queries over the decoder's KV cache, in place.

  The same value as `dense_attention` with the keys given as [B, Hkv, d, S]
  and the values as [B, Hkv, S, d], the layouts of `decoder.KVCache`. A
  decoding step reads the whole cache for a few flops per element, so what
  its two products cost is how XLA:CPU reads the cache. With one query per
  row both are multiply-and-reduce loops: the scores Σ_d q_d k_ds run along
  the contiguous slots of the transposed keys, the output Σ_s p_s v_sd along
  head_dim, and XLA:CPU hands both to its vectorising library fusions (the
  second fused with the output projection). As dots they were batched
  products of B·Hkv tiny matrices outside its GEMM libraries: on a 2-core
  CPU the score dot took about 4x the time of the fusion that replaced it
  (benchmarks/README.md, `decode_profile.py`).

  Args:
    q: [B, Lq, Hkv, G, d] queries (compute dtype).
    k: [B, Hkv, d, S] cached keys (same dtype).
    v: [B, Hkv, S, d] cached values (same dtype).
    mask: the AttentionMask of the Lq queries over the S slots.
    sliding_window: None or the window w.
    scale: the score scale.

  Returns:
    [B, Lq, Hkv, G, d] in the compute dtype.
  """
  # The shapes of k and v as [B, S, Hkv, d], without transposing the cache
  # (outside jit a transpose would copy it).
  b, hkv, d, s = k.shape
  vb, vhkv, vs, *vd = v.shape
  check_shapes(q, jax.ShapeDtypeStruct((b, s, hkv, d), k.dtype),
               jax.ShapeDtypeStruct((vb, vs, vhkv, *vd), v.dtype), mask)
  dt = q.dtype
  acc = accum_dtype(dt)
  if q.shape[1] > 1:
    scores = jnp.einsum("blkgd,bkds->bklgs", q, k, preferred_element_type=acc)
    probs = _score_probs(scores, mask, sliding_window, scale, (1, 3))
    return jnp.einsum("bklgs,bksd->blkgd", probs.astype(dt), v)
  if q.shape[3] == 1:
    # One query head per kv head (multi-head attention). The same sums
    # without the size-1 group axis: left in the broadcasts, it made XLA:CPU's
    # fusions of both sums about 25x slower (benchmarks/README.md).
    scores = jnp.sum(q[:, 0, :, 0, :, None].astype(acc) * k.astype(acc),
                     axis=-2)
    probs = _score_probs(scores[:, :, None], mask, sliding_window, scale, (1,))
    out = jnp.sum(probs[:, :, 0, :, None] * v.astype(probs.dtype), axis=-2)
    return out[:, None, :, None].astype(dt)
  # [B, Hkv, G, d, 1] * [B, Hkv, 1, d, S], summed over d: [B, Hkv, G, S].
  scores = jnp.sum(q[:, 0, ..., None].astype(acc) * k[:, :, None].astype(acc),
                   axis=-2)
  probs = _score_probs(scores[:, :, None], mask, sliding_window, scale, (1, 3))
  out = jnp.sum(probs[..., None] * v[:, :, None, None].astype(probs.dtype),
                axis=-2)
  return jnp.swapaxes(out, 1, 2).astype(dt)


# --------------------------------------------------------------- jax.nn sdpa


def _sdpa_implementation(dtype) -> str | None:
  """cuDNN's fused kernel where it applies (GPU, 16-bit floats), else XLA."""
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "cudnn"
  return None


def sdpa_attention(q, k, v, mask: AttentionMask, *, sliding_window,
                   scale: float):
  """Attention through `jax.nn.dot_product_attention` (same math as dense).

  The visibility goes in as a boolean [B, 1, Lq, S] mask, which expresses
  left padding and cache offsets that `is_causal` / sequence lengths cannot.
  jax masks with -0.7 · max(float32), as `dense_attention` does, so a query
  with no visible key also gets the uniform average. When cuDNN rejects a
  shape or dtype at trace time, XLA's implementation is used instead. jax
  takes this softmax in float32 whatever the input dtype, so float64 inputs
  go to `dense_attention` instead.

  Args: as `dense_attention`.

  Returns:
    [B, Lq, Hkv, G, d] in the compute dtype.
  """
  check_shapes(q, k, v, mask)
  if jnp.dtype(q.dtype) == jnp.dtype(jnp.float64):
    # jax.nn.dot_product_attention takes its softmax in float32 whatever the
    # input; float64 (exact-mode reference) models keep float64 throughout.
    return dense_attention(q, k, v, mask, sliding_window=sliding_window,
                           scale=scale)
  b, lq, hkv, g, d = q.shape
  visible = attention_weights_mask(
      mask.q_slots, jnp.arange(k.shape[1], dtype=jnp.int32), mask.key_mask,
      sliding_window)[:, None]
  args = (q.reshape(b, lq, hkv * g, d), k, v)
  kwargs = dict(mask=visible, scale=float(scale))
  impl = _sdpa_implementation(q.dtype)
  try:
    out = jax.nn.dot_product_attention(*args, **kwargs, implementation=impl)
  except (ValueError, NotImplementedError, RuntimeError):
    if impl is None:
      raise
    out = jax.nn.dot_product_attention(*args, **kwargs, implementation=None)
  return out.reshape(b, lq, hkv, g, d)


# -------------------------------------------------------------- Pallas splash


def splash_attention(q, k, v, mask: AttentionMask, *, sliding_window,
                     scale: float, chunk_size: int,
                     interpret: bool | None = None):
  """Self-attention through Pallas's splash kernel (`splash_attention.py`).

  Same value as `dense_attention` up to rounding, for keys and queries over
  the same L slots; memory per head O(block² + L·d), in the backward pass too.

  Args:
    q: [B, L, Hkv, G, d] queries (compute dtype, float32 or bfloat16).
    k, v: [B, L, Hkv, d] keys and values.
    mask: the AttentionMask; its query slots must be 0 .. L - 1, which holds
      whenever keys and queries have the same length (a cache write starts at
      slot index with index + L ≤ S).
    sliding_window: None or the window w.
    scale: the score scale.
    chunk_size: queries and keys per block, rounded up to a multiple of 128.
    interpret: run the kernel in Pallas's interpreter; None means "unless
      the default backend is TPU".

  Returns:
    [B, L, Hkv, G, d] in the compute dtype.

  Raises:
    ValueError: keys and queries of different lengths (cached decoding, which
      `attend` sends to the chunked kernel instead), or a bad chunk_size.
  """
  check_shapes(q, k, v, mask)
  if k.shape[1] != q.shape[1]:
    raise ValueError(
        f"splash attention: expected as many key slots as queries "
        f"(self-attention without a cache), got {k.shape[1]} keys for "
        f"{q.shape[1]} queries")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
  # Imported here: Pallas's TPU kernels load only for models that choose them.
  from onpo_jax.models import splash_attention as splash_lib  # pylint: disable=g-import-not-at-top
  seen = has_visible_key(mask, sliding_window)
  out = splash_lib.self_attention(
      q, k, v, mask.key_mask, seen, sliding_window=sliding_window,
      scale=scale, chunk_size=chunk_size, interpret=interpret)
  return fill_unseen(out, v, seen)


def attend(impl: str, q, k, v, mask: AttentionMask, *, sliding_window,
           scale: float, chunk_size: int):
  """Dispatches to the kernel named by `impl` (see IMPLEMENTATIONS)."""
  if impl == "dense":
    return dense_attention(q, k, v, mask, sliding_window=sliding_window,
                           scale=scale)
  if impl == "chunked":
    return chunked_attention(q, k, v, mask, sliding_window=sliding_window,
                             scale=scale, chunk_size=chunk_size)
  if impl == "dot_product_attention":
    return sdpa_attention(q, k, v, mask, sliding_window=sliding_window,
                          scale=scale)
  if impl == "splash":
    if q.shape[1] != k.shape[1]:
      # Cached decoding: a few queries against a longer cache, which the
      # splash kernel (self-attention over one sequence) does not cover.
      return chunked_attention(q, k, v, mask, sliding_window=sliding_window,
                               scale=scale, chunk_size=chunk_size)
    if jnp.dtype(q.dtype) == jnp.dtype(jnp.float64):
      # TPUs have no float64; exact-mode reference models stay dense.
      return dense_attention(q, k, v, mask, sliding_window=sliding_window,
                             scale=scale)
    return splash_attention(q, k, v, mask, sliding_window=sliding_window,
                            scale=scale, chunk_size=chunk_size)
  raise ValueError(f"attention_impl: expected one of {IMPLEMENTATIONS}, "
                   f"got {impl!r}")


def attend_cache(impl: str, q, k, v, mask: AttentionMask, *, sliding_window,
                 scale: float, chunk_size: int):
  """Attention over the decoder's KV cache.

  Keys come as [B, Hkv, d, S] and values as [B, Hkv, S, d]. Decoding steps
  (one query per row) and the dense kernel read the cache in place
  (`cache_attention`); a single query's scores are no larger than its
  output, so no kernel saves memory there. A longer block of queries with
  another kernel (a prefill) gets keys and values as [B, S, Hkv, d] and
  `attend`.
  """
  if impl == "dense" or q.shape[1] == 1:
    return cache_attention(q, k, v, mask, sliding_window=sliding_window,
                           scale=scale)
  return attend(impl, q, jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2),
                mask, sliding_window=sliding_window, scale=scale,
                chunk_size=chunk_size)
