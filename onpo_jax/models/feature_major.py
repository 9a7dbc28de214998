"""A decoding step whose activations are laid out [features, batch].

One decoding step multiplies a few rows of activations (one token per row)
by every kernel of the model. XLA:CPU's GEMM libraries run such a product
faster with the kernel as its left operand, stored [out, in], and the
activations as its right one, [in, B]: on a 2-core AVX-512 CPU a
SmolLM2-135M-shaped step (30 layers, float32) took 9-17% less time at batch
16 and 64 (benchmarks/README.md, `decode_layout.py`). Transposing the
activations around each product does not get it, since XLA folds such
transposes back into the product, so here the whole residual stream stays
[D, B] from the embedding to the logits; only the attention over the KV cache
(`attention.cache_attention`, its layouts unchanged) reads the queries as
[B, 1, Hkv, G, d].

`decode_weights(model, dtype)` copies a `Decoder`'s kernels transposed, once
(the sampler does so in each call, before its decoding loop: a copy of the
kernels in the compute dtype lives through the loop). `decode_step` is then
one step of `Decoder.__call__` over a KV cache with one token per row: the
same logits and cache up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onpo_jax.models import attention as attention_lib
from onpo_jax.models import layers
from onpo_jax.models import rope as rope_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.partitioning import constrain


class LayerWeights(NamedTuple):
  """One block's parameters, kernels stored [out, in].

  Attributes:
    attn_norm, mlp_norm: [D] RMSNorm scales.
    q: [H, d, D]; k, v: [Hkv, d, D]; o: [D, H, d].
    q_bias: [H, d], k_bias, v_bias: [Hkv, d], or None (no attention_bias).
    gate, up: [F, D]; down: [D, F].
  """
  attn_norm: jax.Array
  q: jax.Array
  k: jax.Array
  v: jax.Array
  o: jax.Array
  q_bias: jax.Array | None
  k_bias: jax.Array | None
  v_bias: jax.Array | None
  mlp_norm: jax.Array
  gate: jax.Array
  up: jax.Array
  down: jax.Array


class DecodeWeights(NamedTuple):
  """A decoder's parameters for `decode_step` (a plain pytree).

  Attributes:
    embed: [V, D] embedding table.
    layers: one LayerWeights per block.
    final_norm: [D].
    unembed: [V, D] output projection (the embedding itself when tied).
  """
  embed: jax.Array
  layers: tuple[LayerWeights, ...]
  final_norm: jax.Array
  unembed: jax.Array


# Logical axes of the transposed kernels (the Decoder's names, reordered), so
# a sharded model's copies keep its heads and MLP split over 'tensor'.
_AXES = {"q": ("heads", "head_dim", "embed"), "k": ("kv_heads", "head_dim", "embed"),
         "v": ("kv_heads", "head_dim", "embed"), "o": ("embed", "heads", "head_dim"),
         "gate": ("mlp", "embed"), "up": ("mlp", "embed"), "down": ("embed", "mlp")}


def decode_weights(model, dtype=None) -> DecodeWeights:
  """The parameters of a `decoder.Decoder` with its kernels transposed to [out, in].

  Args:
    model: a Decoder (or any module with its parameter structure).
    dtype: dtype of the copies (default: the model's compute dtype, which
      its products cast the kernels to anyway). Norm scales and biases are
      read as they are.

  Returns:
    DecodeWeights; the kernels are new arrays (one copy of each), the
    embedding and norms are the model's own.
  """
  c = model.config
  dtype = jnp.dtype(dtype or c.dtype)

  def kernel(name, w, perm):
    return constrain(jnp.transpose(w, perm).astype(dtype), _AXES[name])

  def bias(module, name):
    return getattr(module, name)[...] if c.attention_bias else None

  blocks = []
  for block in model.layers:
    a, m = block.attn, block.mlp
    blocks.append(LayerWeights(
        attn_norm=block.attn_norm.scale[...],
        q=kernel("q", a.q[...], (1, 2, 0)), k=kernel("k", a.k[...], (1, 2, 0)),
        v=kernel("v", a.v[...], (1, 2, 0)), o=kernel("o", a.o[...], (2, 0, 1)),
        q_bias=bias(a, "q_bias"), k_bias=bias(a, "k_bias"), v_bias=bias(a, "v_bias"),
        mlp_norm=block.mlp_norm.scale[...],
        gate=kernel("gate", m.gate[...], (1, 0)), up=kernel("up", m.up[...], (1, 0)),
        down=kernel("down", m.down[...], (1, 0))))
  embed = model.embed[...]
  if c.tie_word_embeddings:
    unembed = embed
  else:
    unembed = constrain(model.lm_head[...].T.astype(dtype), ("vocab", "embed"))
  return DecodeWeights(embed=embed, layers=tuple(blocks),
                       final_norm=model.final_norm.scale[...], unembed=unembed)


def decode_step(weights: DecodeWeights, config: DecoderConfig, tokens, positions, cache):
  """One decoding step: each row's next-token logits, and the cache with its token.

  The same as `Decoder.__call__(tokens[:, None], positions[:, None], ones, cache)`
  (logits [B, 1, V] there), computed with the activations [D, B].

  Args:
    weights: `decode_weights(model)`.
    config: the model's DecoderConfig.
    tokens: [B] int, one token per row (a real token: its mask is True).
    positions: [B] int32 RoPE positions.
    cache: the model's `decoder.KVCache`; the token is written at slot
      cache.index (the caller keeps it below the cache's slots).

  Returns:
    (logits [B, V] float32 (float64 for a float64 model), KVCache with index + 1).
  """
  c = config
  b = tokens.shape[0]
  if tokens.ndim != 1 or positions.shape != (b,) or cache.mask.shape[0] != b:
    raise ValueError(
        f"tokens / positions / cache: expected [B], [B] and a cache of B rows, got "
        f"{tokens.shape}, {positions.shape}, {cache.mask.shape}")
  if len(weights.layers) != len(cache.k):
    raise ValueError(
        f"cache: expected one key array per layer ({len(weights.layers)}), got {len(cache.k)}")
  dt = c.jnp_dtype
  inv_freq = jnp.asarray(rope_lib.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
  index = jnp.asarray(cache.index, jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  key_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((b, 1), bool), (zero, index))
  mask = layers.AttentionMask(index[None], key_mask)
  table = constrain(weights.embed, ("vocab", None))
  x = constrain(jnp.take(table, tokens, axis=0).astype(dt).T, (None, "batch"))
  groups = c.num_heads // c.num_kv_heads
  new_k, new_v = [], []
  for w, cache_k, cache_v in zip(weights.layers, cache.k, cache.v):
    h = layers.rms_norm(x, w.attn_norm, c.rms_norm_eps, axis=0)
    q, k, v = (layers.dense("db,hkd->hkb", h, kernel) for kernel in (w.q, w.k, w.v))
    if c.attention_bias:
      q, k, v = (y + bias.astype(dt)[..., None]
                 for y, bias in ((q, w.q_bias), (k, w.k_bias), (v, w.v_bias)))
    q = rope_lib.apply_rope_features_major(q, positions, inv_freq)
    k = rope_lib.apply_rope_features_major(k, positions, inv_freq)
    # As [B, 1, Hkv, d], the token-major layout the cache writer takes.
    cache_k, cache_v = layers.write_cache(
        cache_k, cache_v, jnp.transpose(k, (2, 0, 1))[:, None],
        jnp.transpose(v, (2, 0, 1))[:, None], index)
    q = jnp.transpose(q.reshape(c.num_kv_heads, groups, c.head_dim, b), (3, 0, 1, 2))
    out = attention_lib.cache_attention(
        q[:, None], cache_k.astype(dt), cache_v.astype(dt), mask,
        sliding_window=c.sliding_window, scale=c.head_dim ** -0.5)
    out = jnp.transpose(out.reshape(b, c.num_heads, c.head_dim), (1, 2, 0))
    x = constrain(x + layers.dense("hkb,dhk->db", out, w.o), (None, "batch"))
    h = layers.rms_norm(x, w.mlp_norm, c.rms_norm_eps, axis=0)
    gate = layers.dense("db,fd->fb", h, w.gate)
    up = layers.dense("db,fd->fb", h, w.up)
    h = constrain(jax.nn.silu(gate) * up, ("mlp", "batch"))
    x = constrain(x + layers.dense("fb,df->db", h, w.down), (None, "batch"))
    new_k.append(cache_k)
    new_v.append(cache_v)
  h = layers.rms_norm(x, weights.final_norm, c.rms_norm_eps, axis=0)
  logits = layers.dense("db,vd->vb", h, weights.unembed,
                        out_dtype=jnp.promote_types(dt, jnp.float32))
  # Without the barrier XLA folds the transpose below into the unembedding,
  # which then runs as the slower [B, D] x [D, V] product.
  logits = jax.lax.optimization_barrier(logits).T
  new_cache = cache._replace(k=tuple(new_k), v=tuple(new_v), mask=key_mask, index=index + 1)
  return constrain(logits, ("batch", "vocab")), new_cache
