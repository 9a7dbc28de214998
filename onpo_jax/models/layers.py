"""Decoder building blocks: RMSNorm, GQA attention, SwiGLU MLP, block.

Parameter layouts keep heads as their own axis so that tensor parallelism can
shard them by logical name; hf_io.py reshapes to/from HF's fused [out, in]
matrices.

References:
  Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467,
  eq. (4).
  Ainslie et al., "GQA", arXiv 2305.13245 (grouped key/value heads).
  Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202, eq. (6)
  (SwiGLU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from onpo_jax.models import attention as attention_lib
from onpo_jax.models import rope as rope_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.partitioning import constrain

_INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape, names, dtype, init: str = "normal"
          ) -> nnx.Param:
  """A Param carrying logical axis names (sharded later, not eagerly)."""
  if len(shape) != len(names):
    raise ValueError(f"names {names} do not match shape {shape}")
  if init == "normal":
    value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  else:
    raise ValueError(f"init: unknown initialiser {init!r}")
  return nnx.Param(value.astype(dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float, axis: int = -1) -> jnp.ndarray:
  """RMSNorm (Zhang & Sennrich eq. 4): x / sqrt(mean(x²) + eps) · scale.

  The statistic is computed in float32 (float64 for float64 inputs) and the
  result cast back to x.dtype before scaling, as HF Llama does. `axis` is
  the features' axis: the last for [..., D] activations, 0 for the [D, B]
  ones of `feature_major.decode_step`.
  """
  axis = axis % x.ndim
  if scale.shape != (x.shape[axis],):
    raise ValueError(f"scale: expected shape {(x.shape[axis],)}, got {scale.shape}")
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  var = jnp.mean(x32 * x32, axis=axis, keepdims=True)
  normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
  return jnp.expand_dims(scale, tuple(range(1, x.ndim - axis))).astype(x.dtype) * normed


def dense(spec: str, x: jnp.ndarray, w: jnp.ndarray, out_dtype=None) -> jnp.ndarray:
  """The einsum `spec` of x and the kernel w (cast to x.dtype).

  Below float32 (bfloat16, float16) each product, forward and backward, is
  accumulated and returned in float32 and rounded once: what GPUs and TPUs do
  inside a bfloat16 matmul anyway, and on XLA:CPU the form its GEMM library
  runs with native bfloat16 instructions (a bfloat16-output dot there takes a
  path 1.5-3x slower than float32). The backward products take the cotangent
  in x.dtype and the operands as they are (`_low_precision_dense`'s VJP), so
  none becomes a mixed float32 × bfloat16 product. Being a custom VJP, a
  product below float32 has no forward-mode derivative (`jax.jvp` raises);
  float32 and float64 are the plain einsum, differentiable either way, with
  x's leading token axes ([B, L] of a [B, L, D] activation) merged into one.

  Args:
    spec: an einsum of two operands, e.g. "...d,df->...f", in which every
      index appears in exactly two of x, w and the output (contracted, batch
      or free), each once.
    x: the activations; their dtype is the compute dtype.
    w: the kernel.
    out_dtype: dtype of the result, x.dtype by default. The logits ask for
      float32 from bfloat16 hidden states; below float32 their cotangent is
      then rounded to x.dtype before the backward products, as it would be
      for logits in x.dtype.

  Raises:
    ValueError: `spec` has an index that is summed within one operand,
      repeated, or missing from the other two terms.
  """
  _backward_specs(spec)  # checks the spec at every dtype
  w = w.astype(x.dtype)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  if jnp.promote_types(x.dtype, jnp.float32) != x.dtype:
    return _low_precision_dense(spec, out_dtype, x, w)
  merged, token_spec = _tokens_merged(spec, x.ndim)
  if not merged:
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
  # One token axis instead of [B, L, ...]: the kernel's gradient then
  # contracts a single axis. XLA:CPU runs a product that contracts two (B and
  # L) only after transposing both operands, a copy of every activation in
  # the backward pass (a tenth to a third of a float32 train step's time,
  # benchmarks/README.md). Below float32 the merged form's kernel gradient
  # has no XLA:CPU kernel (bfloat16 x bfloat16 -> float32 with a transposed
  # operand), so those products keep [B, L, ...].
  y = jnp.einsum(token_spec, x.reshape((-1,) + x.shape[merged:]), w,
                 preferred_element_type=out_dtype)
  return y.reshape(x.shape[:merged] + y.shape[1:])


@functools.lru_cache(maxsize=None)
def _backward_specs(spec: str) -> tuple[str, str]:
  """The einsums of the two cotangents: (out,w -> x) and (x,out -> w)."""
  try:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
  except ValueError:
    raise ValueError(f"dense spec {spec!r}: expected 'x,w->out'") from None
  terms = [t.replace("...", ".") for t in (a, b, out)]
  for i, t in enumerate(terms):
    others = "".join(terms[:i] + terms[i + 1:])
    if len(set(t)) != len(t) or any(others.count(c) != 1 for c in t):
      raise ValueError(f"dense spec {spec!r}: every index must appear once in exactly two "
                       f"of x, w and the output")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.lru_cache(maxsize=None)
def _tokens_merged(spec: str, ndim: int) -> tuple[int, str]:
  """(n, spec'): x's n >= 2 leading axes, free of w and leading the output
  in the same order, merged into one axis of spec'; (0, spec) if n < 2."""
  ins, out = spec.replace(" ", "").split("->")
  a, b = ins.split(",")
  unused = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                if c not in spec)
  if "..." in a:
    ellipsis = "".join(next(unused) for _ in range(ndim - len(a) + 3))
    a, out = a.replace("...", ellipsis), out.replace("...", ellipsis)
  n = 0
  while n < len(a) and a[n] not in b and out[n:n + 1] == a[n]:
    n += 1
  if n < 2:
    return 0, spec
  token = next(unused)
  return n, f"{token}{a[n:]},{b}->{token}{out[n:]}"


def _f32_product(spec, p, q, dtype):
  return jnp.einsum(spec, p, q, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_dense(spec, out_dtype, x, w):
  return _f32_product(spec, x, w, out_dtype)


def _low_precision_dense_fwd(spec, out_dtype, x, w):
  # Keep only what a perturbed operand's cotangent needs: dx reads w, dw
  # reads x; a kernel outside the differentiated parameters stores no x.
  out = _f32_product(spec, x.value, w.value, out_dtype)
  return out, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _low_precision_dense_bwd(spec, out_dtype, residuals, g):
  del out_dtype
  x, w = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero) or (x is None and w is None):
    return None, None
  dtype = (w if x is None else x).dtype
  g = g.astype(dtype)
  spec_x, spec_w = _backward_specs(spec)
  return (None if w is None else _f32_product(spec_x, g, w, dtype),
          None if x is None else _f32_product(spec_w, x, g, dtype))


_low_precision_dense.defvjp(_low_precision_dense_fwd, _low_precision_dense_bwd,
                            symbolic_zeros=True)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-channel scale."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = param(None, (dim,), ("norm",), param_dtype, init="ones")
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


# Re-exported: the decoder and its tests name the mask through this module.
attention_weights_mask = attention_lib.attention_weights_mask
AttentionMask = attention_lib.AttentionMask


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    pd = c.jnp_param_dtype
    self.config = c
    self.q = param(rngs, (c.hidden_size, c.num_heads, c.head_dim),
                   ("embed", "heads", "head_dim"), pd)
    self.k = param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim),
                   ("embed", "kv_heads", "head_dim"), pd)
    self.v = param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim),
                   ("embed", "kv_heads", "head_dim"), pd)
    self.o = param(rngs, (c.num_heads, c.head_dim, c.hidden_size),
                   ("heads", "head_dim", "embed"), pd)
    if c.attention_bias:
      self.q_bias = param(rngs, (c.num_heads, c.head_dim),
                          ("heads", "head_dim"), pd, init="zeros")
      self.k_bias = param(rngs, (c.num_kv_heads, c.head_dim),
                          ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = param(rngs, (c.num_kv_heads, c.head_dim),
                          ("kv_heads", "head_dim"), pd, init="zeros")

  def project_kv(self, x, positions, inv_freq):
    """Rotated keys and values of x: two [B, L, Hkv, d] arrays."""
    dt = x.dtype
    k = dense("bld,dhk->blhk", x, self.k[...])
    v = dense("bld,dhk->blhk", x, self.v[...])
    if self.config.attention_bias:
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    k = rope_lib.apply_rope(k, positions, inv_freq)
    names = ("batch", "length", "kv_heads", "head_dim")
    return constrain(k, names), constrain(v, names)

  def __call__(self, x, positions, inv_freq, keys, values,
               mask: AttentionMask, *, cached: bool = False):
    """Attends the queries of x to keys/values.

    Args:
      x: [B, L, D] normalised inputs (compute dtype).
      positions: [B, L] RoPE positions.
      inv_freq: [d/2] RoPE inverse frequencies.
      keys, values: [B, S, Hkv, d] (S = L without a cache), or this layer's
        KV cache when `cached`: keys [B, Hkv, d, S], values [B, Hkv, S, d].
      mask: AttentionMask, query slots [L] and valid keys [B, S]; the kernel
        (config.attention_impl) adds the causal order and the window.
      cached: keys and values are the layer's cache (decoder.KVCache).

    Returns:
      [B, L, D].
    """
    c = self.config
    dt = x.dtype
    b, l, _ = x.shape
    q = dense("bld,dhk->blhk", x, self.q[...])
    if c.attention_bias:
      q = q + self.q_bias[...].astype(dt)
    q = rope_lib.apply_rope(q, positions, inv_freq)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    groups = c.num_heads // c.num_kv_heads
    # Query head h uses kv head h // groups (HF repeat_kv order).
    q = q.reshape(b, l, c.num_kv_heads, groups, c.head_dim)
    attend = attention_lib.attend_cache if cached else attention_lib.attend
    out = attend(
        c.attention_impl, q, keys.astype(dt), values.astype(dt), mask,
        sliding_window=c.sliding_window, scale=c.head_dim ** -0.5,
        chunk_size=c.attention_chunk_size)
    out = out.reshape(b, l, c.num_heads, c.head_dim)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return dense("blhk,hkd->bld", out, self.o[...])


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate x) ⊙ up x) (Shazeer eq. 6)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    pd = c.jnp_param_dtype
    self.gate = param(rngs, (c.hidden_size, c.intermediate_size),
                      ("embed", "mlp"), pd)
    self.up = param(rngs, (c.hidden_size, c.intermediate_size),
                    ("embed", "mlp"), pd)
    self.down = param(rngs, (c.intermediate_size, c.hidden_size),
                      ("mlp", "embed"), pd)

  def __call__(self, x):
    g = dense("...d,df->...f", x, self.gate[...])
    u = dense("...d,df->...f", x, self.up[...])
    h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    return dense("...f,fd->...d", h, self.down[...])


def cache_layout(k, v):
  """[B, L, Hkv, d] keys and values in the KV cache's layouts (`decoder.KVCache`):
  keys [B, Hkv, d, L], values [B, Hkv, L, d]."""
  return jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)


def write_cache(cache_k, cache_v, k, v, index):
  """One layer's cache with [B, L, Hkv, d] keys and values written at slots [index, index + L)."""
  k, v = cache_layout(k, v)
  zero = jnp.zeros((), jnp.int32)
  return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (zero, zero, zero, index)),
          jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (zero, zero, index, zero)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm x), then x + mlp(norm x)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    pd = config.jnp_param_dtype
    self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, inv_freq, mask, cache_k, cache_v, index):
    """One block, reading and writing its KV cache's slots.

    Args:
      x: [B, L, D].
      positions: [B, L].
      inv_freq: [d/2].
      mask: AttentionMask of the L queries over the S keys.
      cache_k, cache_v: this layer's caches, [B, Hkv, d, S] and
        [B, Hkv, S, d], or None (then the keys are this call's own tokens,
        S = L).
      index: int32 scalar, first slot to write.

    Returns:
      (x [B, L, D], cache_k, cache_v) with this layer's slots written; without
      a cache, this call's rotated keys and values ([B, L, Hkv, d] each, for a
      prefill to store) in their place.
    """
    h = self.attn_norm(x)
    k, v = self.attn.project_kv(h, positions, inv_freq)
    if cache_k is None:
      x = x + self.attn(h, positions, inv_freq, k, v, mask)
      cache_k, cache_v = k, v
    else:
      cache_k, cache_v = write_cache(cache_k, cache_v, k, v, index)
      x = x + self.attn(h, positions, inv_freq, cache_k, cache_v, mask,
                        cached=True)
    x = constrain(x, ("batch", "length", None))
    x = x + self.mlp(self.mlp_norm(x))
    x = constrain(x, ("batch", "length", None))
    return x, cache_k, cache_v
