"""Pure functions on one next-token distribution: filtering, mixing, sampling.

Everything here acts on the last axis of [..., V] logits and is jit-friendly
(static hyper-parameters, no host round trips); `onpo_jax.sampler` applies
them once per decoding step and re-exports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sortable_int(x: jax.Array) -> jax.Array:
  """Bit pattern of an IEEE-754 float as a signed int with the same order.

  The classic radix-sort key (Herf 2001, "Radix Tricks"): a non-negative float's
  bits already order like a signed int; a negative float's non-sign bits are
  flipped so larger magnitudes give smaller ints. The map is its own inverse on
  ints (see `_float_from_sortable`); -0.0 maps just below +0.0.

  Args:
    x: float32 or float64 array (no NaN).

  Returns:
    int32 / int64 array of x's shape, monotone in x.
  """
  itype = jnp.int32 if x.dtype == jnp.float32 else jnp.int64
  bits = jax.lax.bitcast_convert_type(x, itype)
  return jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)


def _float_from_sortable(key: jax.Array, dtype) -> jax.Array:
  """Inverse of `_sortable_int`: the float whose sortable key is `key`."""
  bits = jnp.where(key < 0, key ^ jnp.iinfo(key.dtype).max, key)
  return jax.lax.bitcast_convert_type(bits, dtype)


def _bisect_threshold(x: jax.Array, weights: jax.Array, bound: float | int) -> jax.Array:
  """Smallest float t with Σ_j weights_j · [x_j > t] < bound, by bisection (no sort).

  With non-negative weights, W(t) = Σ_j weights_j · [x_j > t] is non-increasing
  in t, so {i : W(x_i) < bound} = {i : x_i ≥ t*} for the t* returned here.
  Top-k (weights 1, bound k: t* is the k-th largest logit) and top-p (weights
  softmax(x), bound p: nucleus sampling, Holtzman et al. 2020, arXiv
  1904.09751) are both of this form. t* is found exactly by bisection over the
  order-preserving integer keys of the floats (`_sortable_int`): each step is
  one masked sum over the vocabulary (O(V), vectorised), and 32 (float32) or
  64 (float64) steps shrink any key interval to adjacent floats, so the search
  has a static length and needs no sort, gather or scatter. Invariant: W(lo) ≥
  bound (lo starts just below -inf, a key never evaluated) and W(hi) < bound (hi
  starts at max x, where W = 0 < bound). The masked sum's order is fixed, so the
  computed W is monotone too and the bisection is consistent.

  Args:
    x: [..., V] float32 or float64 logits, -inf allowed (a row of only -inf
      gets t* = -inf and stays unchanged).
    weights: non-negative weights broadcastable to x (a scalar for counts).
    bound: > 0.

  Returns:
    [..., 1] threshold t* of x's dtype; x_i ≥ t* iff W(x_i) < bound.
  """
  nbits = jnp.finfo(x.dtype).bits
  hi = _sortable_int(jnp.max(x, axis=-1, keepdims=True))
  lo = jnp.full_like(hi, _sortable_int(jnp.array(-jnp.inf, x.dtype))) - 1

  def step(_, interval):
    lo, hi = interval
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    t = _float_from_sortable(mid, x.dtype)
    below = jnp.sum(jnp.where(x > t, weights, 0), axis=-1, keepdims=True) < bound
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  # hi - lo < 2**nbits, and every step maps it to at most its ceil-half: nbits
  # steps end at hi = lo + 1 (further steps would leave it unchanged).
  _, hi = jax.lax.fori_loop(0, nbits, step, (lo, hi))
  return _float_from_sortable(hi, x.dtype)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) filtering of logits.

  Removed tokens get -inf, so `softmax` of the result is the sampling
  distribution. Order and tie rules follow transformers' logits warpers
  (temperature → top-k → top-p); nucleus sampling is Holtzman et al. 2020
  (arXiv 1904.09751): keep the smallest set of most likely tokens whose
  mass is ≥ top_p, i.e. token i survives iff the mass strictly above it is < p.
  Neither filter sorts the vocabulary: both find their logit threshold by an
  exact bisection (`_bisect_threshold`, one O(V) masked sum per step, 32 steps
  in float32, 64 in float64) on the count (top-k) or the probability mass
  (top-p) strictly above it; XLA's CPU `lax.top_k` was ~15x slower than this at
  k = 50, V = 49152. Both threshold on the logit value, so ties with the k-th /
  the last kept token are kept.

  Args:
    logits: [..., V] unnormalised log-probabilities (log-probs also work: the
      result is shift invariant).
    temperature: > 0, static.
    top_k: 0 (off) or number of tokens kept, static.
    top_p: in (0, 1]; 1.0 is off, static.

  Returns:
    [..., V] float32 filtered logits (float64 for float64 input).

  Raises:
    ValueError: on a bad hyper-parameter or a scalar `logits`.
  """
  if logits.ndim < 1:
    raise ValueError(f"logits must have shape [..., V], got shape {logits.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  x = logits.astype(jnp.float32) if logits.dtype != jnp.float64 else logits
  if temperature != 1.0:
    x = x / temperature
  neg_inf = jnp.array(-jnp.inf, x.dtype)
  vocab = x.shape[-1]
  if top_k == 1:
    x = jnp.where(x < jnp.max(x, axis=-1, keepdims=True), neg_inf, x)
  elif 0 < top_k < vocab:
    x = jnp.where(x < _bisect_threshold(x, jnp.int32(1), top_k), neg_inf, x)
  if top_p < 1.0:
    x = jnp.where(x < _bisect_threshold(x, jax.nn.softmax(x, axis=-1), top_p), neg_inf, x)
  return x


def geometric_mixture_logprobs(logits_policy: jax.Array, logits_ref: jax.Array,
                               alpha: jax.Array | float) -> jax.Array:
  """Per-token geometric mixture log π_α ∝ (1−α)·log π_θ + α·log π_ref.

  Nash-MD (Munos et al. 2023, arXiv 2312.00886, the regularised policy
  π^α_θ(y) ∝ π_θ(y)^{1−α} π_ref(y)^{α}), applied token by token so sampling needs
  only both models' next-token logits. Mixing logits or log-probs gives the same
  distribution (each differs by a per-row constant); log-probs are mixed here so
  the intermediate values stay bounded.

  Args:
    logits_policy: [..., V] next-token logits of π_θ.
    logits_ref: [..., V] next-token logits of π_ref, same shape.
    alpha: scalar in [0, 1]; 0 gives π_θ, 1 gives π_ref.

  Returns:
    [..., V] normalised log-probabilities of the mixture.

  Raises:
    ValueError: if the shapes differ or alpha is not a scalar.
  """
  if logits_policy.shape != logits_ref.shape:
    raise ValueError(
        f"logits_policy {logits_policy.shape} and logits_ref {logits_ref.shape} "
        "must have the same shape")
  if logits_policy.ndim < 1:
    raise ValueError(f"logits must have shape [..., V], got {logits_policy.shape}")
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 0:
    raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
  dtype = jnp.result_type(logits_policy.dtype, jnp.float32)
  logp_policy = jax.nn.log_softmax(logits_policy.astype(dtype), axis=-1)
  logp_ref = jax.nn.log_softmax(logits_ref.astype(dtype), axis=-1)
  alpha = alpha.astype(dtype)
  # Select instead of multiplying at the ends so that α=0 (α=1) ignores -inf
  # entries of the other model (0·(-inf) would be NaN).
  mixed = jnp.where(alpha == 0, logp_policy,
                    jnp.where(alpha == 1, logp_ref,
                              (1 - alpha) * logp_policy + alpha * logp_ref))
  return jax.nn.log_softmax(mixed, axis=-1)


# Tokens per block of the two-stage inverse-CDF sampler: the block stage and
# the in-block stage each scan ~sqrt(V) cumulative sums (V = 32k-150k).
SAMPLING_BLOCK = 256


def _first_above(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse CDF of one discrete law: first i with w_i > 0 and Σ_{j<=i} w_j > u · Σ_j w_j.

  Requiring w_i > 0 keeps zero-weight entries out even where a parallel
  cumulative sum rounds differently at neighbouring entries.

  Args:
    weights: [..., n] non-negative, unnormalised weights.
    u: [...] uniforms in [0, 1).

  Returns:
    [...] int32 index of a positive weight (the last one if rounding leaves
    none above the target); 0 for a row with no positive weight.
  """
  cumulative = jnp.cumsum(weights, axis=-1)
  positive = weights > 0
  above = (cumulative > (u * cumulative[..., -1])[..., None]) & positive
  last_positive = weights.shape[-1] - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
  index = jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), last_positive)
  return jnp.where(jnp.any(positive, axis=-1), index, 0).astype(jnp.int32)


def categorical_from_uniforms(u: jax.Array, logits: jax.Array, *,
                              block: int = SAMPLING_BLOCK) -> jax.Array:
  """One sample per row of softmax(logits) from two uniforms per row, [..., V] -> [...] int32.

  Two-stage inverse-CDF sampling: with p = exp(logits - max), the vocabulary is
  cut into blocks of `block` tokens; u[0] picks a block b with probability
  Σ_{i∈b} p_i / Σ_i p_i, then u[1] picks a token i of b with probability
  p_i / Σ_{j∈b} p_j. The product is softmax(logits)_i, and the work is two passes
  over the logits (exp, block sums) plus cumulative sums of ~sqrt(V) entries,
  against V random numbers for the Gumbel-max trick (4-8x the time per draw
  on CPU at V = 49152: `benchmarks/README.md`).

  Probabilities are exact up to the uniforms' resolution (2^-23 in float32,
  2^-52 in float64) and the rounding of the cumulative sums; -inf logits are
  never sampled.

  Args:
    u: [2, ...] uniforms in [0, 1); u[0] chooses the block, u[1] the token.
    logits: [..., V] float logits (-inf for excluded tokens).
    block: tokens per block (static).

  Returns:
    [...] int32 token indices; 0 for a row whose logits are all -inf.
  """
  dtype = jnp.result_type(logits.dtype, jnp.float32)
  z = logits.astype(dtype)
  vocab = z.shape[-1]
  block = min(block, vocab)
  num_blocks = -(-vocab // block)
  top = jnp.max(z, axis=-1, keepdims=True)
  p = jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0))
  p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, num_blocks * block - vocab)])
  p = p.reshape(*p.shape[:-1], num_blocks, block)
  u = u.astype(dtype)
  chosen = _first_above(jnp.sum(p, axis=-1), u[0])
  in_block = jnp.take_along_axis(p, chosen[..., None, None], axis=-2)[..., 0, :]
  return chosen * block + _first_above(in_block, u[1])


def categorical(key: jax.Array, logits: jax.Array, *, block: int = SAMPLING_BLOCK) -> jax.Array:
  """One sample per row of softmax(logits), [..., V] -> [...] int32.

  Draws the two uniforms per row of `categorical_from_uniforms` from `key`
  (float64 uniforms for float64 logits).

  Args:
    key: PRNG key.
    logits: [..., V] float logits (-inf for excluded tokens).
    block: tokens per block of the two-stage sampler (static).

  Returns:
    [...] int32 token indices.
  """
  dtype = jnp.result_type(logits.dtype, jnp.float32)
  u = jax.random.uniform(key, (2, *logits.shape[:-1]), dtype)
  return categorical_from_uniforms(u, logits, block=block)
