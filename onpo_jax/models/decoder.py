"""Decoder-only transformer (Llama / Mistral / Qwen2) in Flax NNX.

Public API (shared with the sampler, testbed and judge code):
  Decoder(config, rngs=...)(tokens, positions, attention_mask, cache)
      -> (logits [B, L, V] float32, new_cache | None)
  Decoder.hidden_states / prefill / logits_from_hidden / token_logprobs
  KVCache, init_cache, grow_cache, positions_from_mask, chunked_token_logprobs.

Left padding: pads have attention_mask False and positions come from the mask,
so the first real token has position 0 whatever the padding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from onpo_jax.infra import checks
from onpo_jax.models import layers
from onpo_jax.models import rope as rope_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.partitioning import constrain


# Logical axes of one layer's cached keys and values (KVCache below), for the
# sharding rules: batch over the data axes, kv heads over 'tensor'.
KEY_CACHE_AXES = ("batch", "kv_heads", "head_dim", "length")
VALUE_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
  """Key/value cache, a plain pytree (donatable under jit).

  Attributes:
    k: one [B, num_kv_heads, head_dim, S] array per layer (a tuple), compute
      dtype: the keys transposed, so a decoding step's scores run along
      contiguous slots (see `attention.cache_attention`).
    v: one [B, num_kv_heads, S, head_dim] array per layer. Each layer's keys
      and values are their own buffers, read in place.
    mask: [B, S] bool, slot holds a real token.
    index: int32 scalar, next slot to write.
  """
  k: jnp.ndarray
  v: jnp.ndarray
  mask: jnp.ndarray
  index: jnp.ndarray


def init_cache(config: DecoderConfig, batch_size: int, max_length: int,
               dtype=None) -> KVCache:
  """An empty cache with `max_length` slots (dtype defaults to config.dtype)."""
  if batch_size <= 0 or max_length <= 0:
    raise ValueError(
        f"batch_size and max_length: expected positive ints, got "
        f"{batch_size}, {max_length}")
  dtype = jnp.dtype(dtype or config.dtype)
  b, h, d = batch_size, config.num_kv_heads, config.head_dim
  # Distinct buffers for every layer, keys and values: the sampler donates
  # the cache, and a buffer cannot be donated twice.
  empty = lambda shape: tuple(jnp.zeros(shape, dtype)
                              for _ in range(config.num_layers))
  return KVCache(
      k=empty((b, h, d, max_length)), v=empty((b, h, max_length, d)),
      mask=jnp.zeros((batch_size, max_length), bool),
      index=jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, max_length: int) -> KVCache:
  """The same cache with `max_length` slots: the new ones empty (zeros, mask False).

  One copy of every layer's keys and values; the slots already there keep
  their contents and the index is unchanged.
  """
  s = cache.mask.shape[1]
  if max_length < s:
    raise ValueError(f"max_length: expected at least the cache's {s} slots, got {max_length}")
  pad = max_length - s
  return KVCache(
      k=tuple(constrain(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))), KEY_CACHE_AXES)
              for x in cache.k),
      v=tuple(constrain(jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))), VALUE_CACHE_AXES)
              for x in cache.v),
      mask=jnp.pad(cache.mask, ((0, 0), (0, pad))), index=cache.index)


def select_rows(cache: KVCache, rows: jnp.ndarray) -> KVCache:
  """The cache whose row b is `cache`'s row `rows[b]` (a gather on the batch axis).

  Lets rows that share a prompt share its prefill: the prompt is run once and
  its keys, values and mask are copied to every row that holds it. The index
  is unchanged.

  Args:
    cache: a KVCache of B rows.
    rows: [B'] int indices into those rows (repeats allowed).
  """
  return KVCache(
      k=tuple(constrain(jnp.take(x, rows, axis=0), KEY_CACHE_AXES) for x in cache.k),
      v=tuple(constrain(jnp.take(x, rows, axis=0), VALUE_CACHE_AXES) for x in cache.v),
      mask=jnp.take(cache.mask, rows, axis=0), index=cache.index)


def positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
  """Positions counted over real tokens: clip(cumsum(mask) - 1, 0), int32.

  The first real token of a left-padded row gets position 0; pads get 0.
  """
  return jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _target_logprobs(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """log softmax(z)[t] = z_t - logsumexp(z) over the last axis of z.

  The [..., V] log-softmax is never built: z_t is read as Σ_v [v = t] z_v, a
  masked sum that fuses with the pass over z and whose backward, the
  indicator [v = t], fuses into the softmax gradient [v = t] - softmax(z)_v
  (one elementwise pass, no scatter as a gather's transpose would need).
  Ids outside [0, V) give NaN. Float32 at least (float64 stays float64 for
  reference tests).
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  vocab = logits.shape[-1]
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == (
      targets[..., None])
  picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  out = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.where((targets >= 0) & (targets < vocab), out, jnp.nan)


def chunked_token_logprobs(h: jnp.ndarray, tokens: jnp.ndarray,
                           attention_mask: jnp.ndarray, unembed,
                           chunk_size: int | None = None,
                           first_target: int = 1) -> jnp.ndarray:
  """Aligned next-token log-probs without materialising [B, L, V] logits.

  out[b, t] = log softmax(unembed(h[b, t-1]))[tokens[b, t]] for t ≥ 1, i.e.
  log p(tokens[b, t] | tokens[b, <t]); out[b, 0] = 0. Positions whose token
  or predecessor is masked out (pads, and the first real token of a
  left-padded row, which has no real context) are 0 as well.

  The sequence is cut into chunks of `chunk_size` predictions; each chunk's
  logits ([B, chunk, V] float32) are built, normalised and gathered inside
  a rematerialised scan step, so neither the forward nor the backward pass
  keeps more than one chunk of logits. With a single chunk (chunk_size None
  or ≥ L - first_target) there is nothing to save: the logits are computed once,
  without the scan and without recomputation in the backward pass.

  Only targets t ≥ `first_target` are predicted: a loss that scores the
  response of [prompt | response] rows (the sampler's layout, prompt bucket
  P) passes first_target = P and skips the unembedding and log-softmax of
  the P - 1 prompt positions, whose log-probs it would mask out anyway.

  Args:
    h: [B, L, D] final hidden states.
    tokens: [B, L] int token ids.
    attention_mask: [B, L] bool.
    unembed: function [B, C, D] -> [B, C, V] float32 logits.
    chunk_size: predictions per chunk; None means one chunk of
      L - first_target.
    first_target: first position t whose log-prob is computed, 1 ≤
      first_target ≤ L (L: none); out[:, :first_target] is 0.

  Returns:
    [B, L], float32 (float64 if the logits are float64).
  """
  if h.ndim != 3 or tokens.shape != h.shape[:2]:
    raise ValueError(
        f"h / tokens: expected [B, L, D] and [B, L], got {h.shape}, "
        f"{tokens.shape}")
  if attention_mask.shape != tokens.shape:
    raise ValueError(
        f"attention_mask: expected shape {tokens.shape}, "
        f"got {attention_mask.shape}")
  b, l, d = h.shape
  s = first_target
  if not checks.is_int(s, 1, max(l, 1)):
    raise ValueError(
        f"first_target: expected an int in [1, {max(l, 1)}] (the sequence length), "
        f"got {s!r}")
  n = l - s
  if n <= 0:
    return jnp.zeros((b, l), jnp.promote_types(h.dtype, jnp.float32))
  if chunk_size is None:
    chunk_size = n
  if chunk_size <= 0:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
  chunk_size = min(chunk_size, n)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  # Position t is predicted from the hidden state at t - 1.
  h_prev, targets = h[:, s - 1:-1], tokens[:, s:]
  if num_chunks == 1:
    out = _target_logprobs(unembed(h_prev), targets)
  else:
    h_prev = jnp.pad(h_prev, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h_prev = h_prev.reshape(b, num_chunks, chunk_size, d).swapaxes(0, 1)
    targets = targets.reshape(b, num_chunks, chunk_size).swapaxes(0, 1)
    one_chunk = jax.checkpoint(lambda hc, tc: _target_logprobs(unembed(hc), tc))

    def step(carry, xs):
      return carry, one_chunk(*xs)

    _, out = jax.lax.scan(step, None, (h_prev, targets))
    out = out.swapaxes(0, 1).reshape(b, num_chunks * chunk_size)[:, :n]
  valid = attention_mask[:, s:] & attention_mask[:, s - 1:-1]
  out = jnp.where(valid, out, 0.0)
  return jnp.concatenate([jnp.zeros((b, s), out.dtype), out], axis=1)


class Decoder(nnx.Module):
  """Decoder-only transformer configured by a DecoderConfig."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    pd = c.jnp_param_dtype
    self.config = c
    self.embed = layers.param(rngs, (c.vocab_size, c.hidden_size),
                              ("vocab", "embed"), pd)
    self.layers = nnx.List(
        [layers.Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, pd)
    if not c.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (c.hidden_size, c.vocab_size),
                                  ("embed", "vocab"), pd)

  def _check_inputs(self, tokens, positions, attention_mask):
    if tokens.ndim != 2:
      raise ValueError(f"tokens: expected [B, L], got shape {tokens.shape}")
    if positions.shape != tokens.shape:
      raise ValueError(
          f"positions: expected shape {tokens.shape}, got {positions.shape}")
    if attention_mask.shape != tokens.shape:
      raise ValueError(
          f"attention_mask: expected shape {tokens.shape}, "
          f"got {attention_mask.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")

  def hidden_states(self, tokens, positions, attention_mask,
                    cache: KVCache | None = None):
    """Final-norm hidden states (as HF's last_hidden_state).

    Args:
      tokens: [B, L] int32.
      positions: [B, L] int32 RoPE positions (use positions_from_mask).
      attention_mask: [B, L] bool, False on pads.
      cache: None, or a KVCache; the L tokens are written at slots
        [index, index + L) (the caller keeps index + L ≤ S) and each query at
        slot s attends to the valid slots s' ≤ s (and s - s' < sliding_window).

    Returns:
      (h [B, L, D] in the compute dtype, new cache with index + L, or None).
    """
    h, inv_freq, attention_mask = self._embed(tokens, positions, attention_mask)
    c = self.config
    b, l = tokens.shape
    if cache is None:
      # The kernels build visibility (causal, valid keys, window) from the
      # query slots and the key mask, block by block where they avoid the
      # score matrix.
      mask = layers.AttentionMask(jnp.arange(l, dtype=jnp.int32), attention_mask)
      zero = jnp.zeros((), jnp.int32)
      for block in self.layers:
        # Only the hidden states leave a remat'd block: it is recomputed in
        # the backward pass, so keys and values need not be kept.
        if c.remat:
          h = nnx.remat(lambda blk, *args: blk(*args)[0])(
              block, h, positions, inv_freq, mask, None, None, zero)
        else:
          h, _, _ = block(h, positions, inv_freq, mask, None, None, zero)
      return self.final_norm(h), None

    if cache.mask.shape[0] != b:
      raise ValueError(
          f"cache: batch size {cache.mask.shape[0]} != tokens batch {b}")
    s = cache.mask.shape[1]
    hkv, d = c.num_kv_heads, c.head_dim
    for name, arrays, expected in (("k", cache.k, (b, hkv, d, s)),
                                   ("v", cache.v, (b, hkv, s, d))):
      shapes = [tuple(x.shape) for x in arrays]
      if len(shapes) != c.num_layers or any(x != expected for x in shapes):
        raise ValueError(
            f"cache.{name}: expected {c.num_layers} arrays of shape "
            f"{expected} (one per layer, from init_cache), got {shapes}")
    # dynamic_update_slice would silently clamp an overflowing write; check
    # whenever the index is concrete (outside jit).
    if (not isinstance(cache.index, jax.core.Tracer)
        and int(cache.index) + l > s):
      raise ValueError(
          f"cache: writing {l} tokens at slot {int(cache.index)} overflows "
          f"max_length {s}")
    index = jnp.asarray(cache.index, jnp.int32)
    key_mask = jax.lax.dynamic_update_slice(
        cache.mask, attention_mask, (jnp.zeros((), jnp.int32), index))
    mask = layers.AttentionMask(index + jnp.arange(l, dtype=jnp.int32),
                                key_mask)
    # Remat only pays off in a backward pass; cached decoding (the sampler's
    # loop) has none, and nnx.remat cannot be traced inside that loop.
    new_k, new_v = [], []
    for block, layer_k, layer_v in zip(self.layers, cache.k, cache.v):
      h, layer_k, layer_v = block(h, positions, inv_freq, mask, layer_k,
                                  layer_v, index)
      new_k.append(layer_k)
      new_v.append(layer_v)
    return self.final_norm(h), KVCache(k=tuple(new_k), v=tuple(new_v),
                                       mask=key_mask, index=index + l)

  def prefill(self, tokens, positions, attention_mask, max_length: int,
              cache_dtype=None):
    """Hidden states of a prompt, and a new KV cache that holds it.

    The same hidden states and cache entries on real tokens as
    `hidden_states(tokens, positions, attention_mask, init_cache(config, B,
    max_length, cache_dtype))`, up to float rounding (a pad query sees no
    key either way, and what a kernel returns for it is never read), but
    cheaper: the prompt's queries attend only to the prompt's own L keys, with
    `config.attention_impl`'s self-attention kernel, instead of to all
    `max_length` slots of an empty cache (of which only the first L can be
    valid); the cache is then written once.

    Args:
      tokens, positions, attention_mask: the prompt, [B, L] (as hidden_states).
      max_length: the cache's slots S ≥ L (prompt and generated tokens).
      cache_dtype: the cache's dtype (default: config.dtype).

    Returns:
      (h [B, L, D] in the compute dtype, KVCache with slots [0, L) written
      and index L).
    """
    l = tokens.shape[-1]
    if max_length < l:
      raise ValueError(
          f"max_length: expected at least the prompt's length {l}, got {max_length}")
    h, inv_freq, attention_mask = self._embed(tokens, positions, attention_mask)
    c = self.config
    dtype = jnp.dtype(cache_dtype or c.dtype)
    mask = layers.AttentionMask(jnp.arange(l, dtype=jnp.int32), attention_mask)
    zero = jnp.zeros((), jnp.int32)
    cache_k, cache_v = [], []
    for block in self.layers:
      h, k, v = block(h, positions, inv_freq, mask, None, None, zero)
      k, v = layers.cache_layout(k, v)
      cache_k.append(k.astype(dtype))
      cache_v.append(v.astype(dtype))
    prompt_cache = KVCache(k=tuple(cache_k), v=tuple(cache_v), mask=attention_mask,
                           index=jnp.asarray(l, jnp.int32))
    return self.final_norm(h), grow_cache(prompt_cache, max_length)

  def _embed(self, tokens, positions, attention_mask):
    """Checks the inputs; returns (embedded tokens, RoPE inv_freq, bool mask)."""
    self._check_inputs(tokens, positions, attention_mask)
    c = self.config
    # FSDP gathers the embed dimension before use; gathering rows straight
    # from an fsdp-sharded table makes XLA replicate the whole lookup.
    table = constrain(self.embed[...], ("vocab", None))
    h = jnp.take(table, tokens, axis=0).astype(c.jnp_dtype)
    h = constrain(h, ("batch", "length", None))
    # A constant of the config; kept off the module so it is not nnx state.
    inv_freq = jnp.asarray(_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
    return h, inv_freq, attention_mask.astype(bool)

  def _unembedding(self):
    """[D, V] output projection (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits_from_hidden(self, h):
    """[..., D] hidden states -> [..., V] float32 logits."""
    return _unembed(h, self._unembedding())

  def __call__(self, tokens, positions, attention_mask,
               cache: KVCache | None = None):
    """Returns (logits [B, L, V] float32, new cache or None)."""
    h, new_cache = self.hidden_states(tokens, positions, attention_mask,
                                      cache)
    logits = constrain(self.logits_from_hidden(h),
                       ("batch", "length", "vocab"))
    return logits, new_cache

  def token_logprobs(self, tokens, positions, attention_mask, *,
                     chunk_size: int | None = None, first_target: int = 1):
    """Aligned log p(tokens[b, t] | tokens[b, <t]), [B, L] float32.

    See chunked_token_logprobs for the convention (out[:, 0] = 0, masked
    positions 0), the chunking and `first_target` (positions before it are
    0 and cost no unembedding).
    """
    h, _ = self.hidden_states(tokens, positions, attention_mask)
    w = self._unembedding()
    return chunked_token_logprobs(
        h, tokens, attention_mask.astype(bool),
        lambda hc: _unembed(hc, w), chunk_size, first_target)


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim, theta, scaling):
  return rope_lib.rope_inv_freq(head_dim, theta, scaling)


def _unembed(h, w):
  return layers.dense("...d,dv->...v", h, w, out_dtype=jnp.promote_types(h.dtype, jnp.float32))
