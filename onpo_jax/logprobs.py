"""Token and sequence log-probabilities of a causal LM, with prompt/pad masking.

Convention ("aligned" log-probs, shared with the decoder and sampler): for tokens
[B, L] and logits [B, L, V] from a causal LM run on those tokens,

    token_logps[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]]   for t >= 1
    token_logps[b, 0] = 0

so the value at position t is the log-prob OF token t. `response_mask[B, L]` marks
response tokens (never prompt or padding). Position 0 has no predicting logits, so
it can never be a response token: every sequence starts with at least one prompt
token (e.g. BOS).

The sequence log-prob lp(y) of docs/algorithm.md §3.4 is the **sum** over response tokens
(`reduction='sum'`, the default); `reduction='mean'` divides by the number of
response tokens of each sequence (docs/conventions.md §3). Targets such as η/2
only mean something at a fixed reduction, so callers should log the one they use.

All reductions accumulate in float32 or wider: bf16 logits are upcast first, since
summing hundreds of bf16 log-probs loses several digits.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Reduction = Literal["sum", "mean"]
REDUCTIONS = ("sum", "mean")


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _accum_dtype(dtype) -> jnp.dtype:
  """float32 for narrow floats (bf16/f16), otherwise the dtype itself (f32/f64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_logits_tokens(logits, tokens, fn: str):
  if logits.ndim != 3:
    raise ValueError(f"{fn}: logits must have shape [B, L, V], got {logits.shape}")
  if tokens.shape != logits.shape[:2]:
    raise ValueError(
        f"{fn}: tokens must have shape [B, L] = {logits.shape[:2]} to match "
        f"logits {logits.shape}, got {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{fn}: tokens must be integer, got dtype {tokens.dtype}")


def _check_mask(response_mask, shape, fn: str):
  if response_mask.shape != tuple(shape):
    raise ValueError(
        f"{fn}: response_mask must have shape {tuple(shape)}, got "
        f"{response_mask.shape}")
  # Only checkable on concrete values; under jit the docstring contract applies.
  if _is_concrete(response_mask) and np.any(np.asarray(response_mask)[:, 0]):
    raise ValueError(
        f"{fn}: response_mask[:, 0] must be False: position 0 has no predicting "
        "logits, so every sequence needs at least one prompt token")


def logprobs_of_targets(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[..., target] without the aligned shift.

  The per-position building block: `logits[..., V]` predict `targets[...]` at the
  same index. Useful for chunked computations that shift once themselves.

  Args:
    logits: [..., V] float logits.
    targets: [...] integer ids in [0, V).

  Returns:
    [...] log-probs in float32 (or float64 when logits are float64).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f"logprobs_of_targets: targets shape {targets.shape} must equal "
        f"logits.shape[:-1] = {logits.shape[:-1]}")
  logits = logits.astype(_accum_dtype(logits.dtype))
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Aligned per-token log-probs (see module docstring).

  Args:
    logits: [B, L, V] causal-LM logits computed on `tokens`.
    tokens: [B, L] integer token ids.

  Returns:
    [B, L] with out[:, t] = log p(tokens[:, t] | tokens[:, :t]) for t >= 1 and
    out[:, 0] = 0.
  """
  _check_logits_tokens(logits, tokens, "token_logprobs_from_logits")
  # logits[:, t - 1] predict tokens[:, t]: the off-by-one of docs/conventions.md §1.
  shifted = logprobs_of_targets(logits[:, :-1], tokens[:, 1:])
  return jnp.pad(shifted, ((0, 0), (1, 0)))


def reduce_logprobs(token_logps: jax.Array, response_mask: jax.Array,
                    reduction: Reduction = "sum") -> jax.Array:
  """Per-sequence log-prob from aligned token log-probs.

  lp(y) = Σ_t mask[t] · token_logps[t]  ('sum', the default; docs/conventions.md §3), or that sum
  divided by the number of response tokens ('mean'; 0 for a sequence without
  response tokens instead of NaN, so padded rows stay finite).

  Args:
    token_logps: [B, L] aligned token log-probs.
    response_mask: [B, L] bool or 0/1, True on response tokens only.
    reduction: 'sum' or 'mean'.

  Returns:
    [B] sequence log-probs.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"reduce_logprobs: reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if token_logps.ndim != 2:
    raise ValueError(
        f"reduce_logprobs: token_logps must have shape [B, L], got {token_logps.shape}")
  _check_mask(response_mask, token_logps.shape, "reduce_logprobs")
  token_logps = token_logps.astype(_accum_dtype(token_logps.dtype))
  mask = response_mask.astype(token_logps.dtype)
  # where, not multiply: a -inf log-prob on a masked position must not give NaN.
  total = jnp.sum(jnp.where(mask > 0, token_logps, 0.0), axis=-1)
  if reduction == "sum":
    return total
  count = jnp.sum(mask, axis=-1)
  return total / jnp.maximum(count, 1.0)


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, response_mask: jax.Array,
                      reduction: Reduction = "sum") -> jax.Array:
  """lp(y | x) of each sequence: aligned token log-probs reduced over the response.

  Args:
    logits: [B, L, V] causal-LM logits computed on `tokens`.
    tokens: [B, L] prompt + response + padding token ids.
    response_mask: [B, L] True on response tokens only.
    reduction: 'sum' (default, docs/conventions.md §3) or 'mean'.

  Returns:
    [B] sequence log-probs.
  """
  token_logps = token_logprobs_from_logits(logits, tokens)
  return reduce_logprobs(token_logps, response_mask, reduction)


def token_entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Aligned entropy of the distribution that predicts each token.

  Args:
    logits: [B, L, V] causal-LM logits.

  Returns:
    [B, L] with out[:, t] = H(softmax(logits[:, t - 1])) for t >= 1, 0 at t = 0,
    so it lines up with `token_logprobs_from_logits` and `response_mask`.
  """
  if logits.ndim != 3:
    raise ValueError(
        f"token_entropy_from_logits: logits must have shape [B, L, V], got {logits.shape}")
  logits = logits[:, :-1].astype(_accum_dtype(logits.dtype))
  logp = jax.nn.log_softmax(logits, axis=-1)
  # xlogy-style guard: p = 0 entries contribute 0, not 0 · (-inf) = NaN.
  ent = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)
  return jnp.pad(ent, ((0, 0), (1, 0)))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over positions where `mask` is set (0 if none are).

  Statistics must never average over pad or prompt positions (docs/conventions.md §2).
  """
  if values.shape != mask.shape:
    raise ValueError(
        f"masked_mean: mask shape {mask.shape} must equal values shape {values.shape}")
  values = values.astype(_accum_dtype(values.dtype))
  m = mask.astype(values.dtype)
  return jnp.sum(jnp.where(m > 0, values, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def masked_entropy(logits: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Mean per-token policy entropy over response tokens of the whole batch.

  Args:
    logits: [B, L, V] causal-LM logits.
    response_mask: [B, L] True on response tokens only.

  Returns:
    Scalar: Σ_{response t} H(softmax(logits[:, t - 1])) / #response tokens.
  """
  if logits.ndim != 3:
    raise ValueError(f"masked_entropy: logits must have shape [B, L, V], got {logits.shape}")
  _check_mask(response_mask, logits.shape[:2], "masked_entropy")
  return masked_mean(token_entropy_from_logits(logits), response_mask)
