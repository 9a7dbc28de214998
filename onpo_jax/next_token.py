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


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One sample per row of softmax(logits) by the Gumbel-max trick, [..., V] -> [...] int32.

  Same noise and tie rule (first maximal index) as `jax.random.categorical`, so
  the samples are identical; written as max-then-first-index because XLA:CPU
  fuses the random-number generation into argmax's variadic reduction, which
  then runs ~2.5x slower (measured at [32, 32000]).
  """
  y = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  is_max = y == jnp.max(y, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, y.shape, y.ndim - 1)
  return jnp.min(jnp.where(is_max, iota, y.shape[-1]), axis=-1)
