"""The oracle interface: a general preference P(a ≻ b | x) over token batches.

The contract (docs/algorithm.md §1, docs/baselines.md "Oracle contract"): a general
preference P(a ≻ b | x) ∈ [0, 1] with P(a ≻ b) + P(b ≻ a) = 1, so P(a ≻ a) = 1/2.
Nothing assumes a Bradley–Terry (BT) reward: intransitive (cyclic) preferences
are allowed. Querying the oracle yields a Bernoulli label (`compare`).

Token-level batches: prompts left-padded `prompt_tokens [N, P] int32` with
`prompt_mask [N, P] bool`; responses right-padded `a_tokens [N, R]`,
`a_mask [N, R]`, same for b.

Exact symmetry in floating point: each row's pair is put in a canonical order
(lexicographic on the masked tokens), the logit z is computed once for that
order and negated when the caller's order is the other one, and identical
responses get z = 0. So z(a, b) == −z(b, a) bit-exactly whatever the batch
position, and P = σ(|z|) if z ≥ 0 else 1 − σ(|z|): since σ(|z|) ∈ [1/2, 1],
1 − σ(|z|) is exact (Sterbenz), hence P(a ≻ b) + P(b ≻ a) == 1 exactly and
P(a ≻ a) == 1/2.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

class Oracle(Protocol):
  """A general preference oracle over token sequences (see module docstring)."""

  vocab_size: int

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens,
                      b_mask) -> jax.Array:
    """Returns P(a ≻ b | x) [N] float, order-symmetrised (P(a≻b) + P(b≻a) == 1)."""
    ...


def check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
  """Shape checks shared by every oracle; raises ValueError naming the argument."""
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be [N, P]; got shape {prompt_tokens.shape}")
  n = prompt_tokens.shape[0]
  if prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_mask must have prompt_tokens' shape {prompt_tokens.shape}; "
                     f"got {prompt_mask.shape}")
  for name, tok, mask in (("a", a_tokens, a_mask), ("b", b_tokens, b_mask)):
    if tok.ndim != 2 or tok.shape[0] != n:
      raise ValueError(f"{name}_tokens must be [N={n}, R]; got shape {tok.shape}")
    if mask.shape != tok.shape:
      raise ValueError(f"{name}_mask must have {name}_tokens' shape {tok.shape}; got {mask.shape}")
  if a_tokens.shape != b_tokens.shape:
    raise ValueError(f"a_tokens and b_tokens must have the same shape; got {a_tokens.shape} "
                     f"and {b_tokens.shape}")


def symmetric_sigmoid(z: jax.Array) -> jax.Array:
  """σ(z) computed so that symmetric_sigmoid(z) + symmetric_sigmoid(−z) == 1 exactly.

  Args:
    z: logits of any shape; callers guarantee z(a, b) == −z(b, a) bit-exactly.

  Returns:
    σ(z), same shape and dtype.
  """
  p_hi = jax.nn.sigmoid(jnp.abs(z))
  return jnp.where(z >= 0, p_hi, 1.0 - p_hi)


def canonical_order(a_tokens, a_mask, b_tokens, b_mask):
  """Puts each row's pair in a fixed order so a pairwise score is order-free.

  Args:
    a_tokens, a_mask, b_tokens, b_mask: [N, R] right-padded responses.

  Returns:
    (first_tokens, first_mask, second_tokens, second_mask, a_first [N] bool,
    same [N] bool): `a_first` says whether a is the first of the canonical
    order (lexicographic on tokens with pads as −1), `same` marks rows where a
    and b are the same response (equal real tokens).
  """
  key_a = jnp.where(a_mask, a_tokens, -1)
  key_b = jnp.where(b_mask, b_tokens, -1)
  diff = key_a != key_b
  same = ~jnp.any(diff, axis=-1)
  idx = jnp.argmax(diff, axis=-1)[:, None]
  a_first = (jnp.take_along_axis(key_a, idx, -1) < jnp.take_along_axis(key_b, idx, -1))[:, 0]
  a_first = a_first | same
  sel = a_first[:, None]
  return (jnp.where(sel, a_tokens, b_tokens), jnp.where(sel, a_mask, b_mask),
          jnp.where(sel, b_tokens, a_tokens), jnp.where(sel, b_mask, a_mask), a_first, same)


def antisymmetric_logit(raw_logit_fn, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens,
                        b_mask):
  """z(a, b) = raw(first, second) signed by the caller's order; exactly −z(b, a).

  Args:
    raw_logit_fn: (prompt_tokens, prompt_mask, first_tokens, first_mask,
      second_tokens, second_mask) -> [N], mathematically antisymmetric.
    prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask: the batch.

  Returns:
    [N] logits with z(a, b) == −z(b, a) and z(a, a) == 0 bit-exactly.
  """
  ft, fm, st, sm, a_first, same = canonical_order(a_tokens, a_mask, b_tokens, b_mask)
  raw = raw_logit_fn(prompt_tokens, prompt_mask, ft, fm, st, sm)
  return jnp.where(same, jnp.zeros_like(raw), jnp.where(a_first, raw, -raw))


def compare(oracle: Oracle, key: jax.Array, prompt_tokens, prompt_mask, a_tokens, a_mask,
            b_tokens, b_mask) -> jax.Array:
  """One oracle query per row: a Bernoulli(P(a ≻ b | x)) label, True where a wins.

  Args:
    oracle: any `Oracle`.
    key: explicit PRNG key; the same key gives the same labels.
    prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask: token batch
      as in the module docstring.

  Returns:
    [N] bool.
  """
  p = oracle.preference_prob(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
  return jax.random.uniform(key, p.shape, dtype=p.dtype) < p


def preference_matrix(oracle: Oracle, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Full matrix P[x, i, j] = P(y_i ≻ y_j | x) over an enumerated response set.

  Args:
    oracle: any `Oracle`.
    prompt_tokens: [C, P] left-padded prompts.
    prompt_mask: [C, P] bool.
    responses: [Y, R] every response.
    response_mask: [Y, R] bool.

  Returns:
    [C, Y, Y] with P + Pᵀ == 1 exactly and diagonal 1/2 (the lower triangle is
    completed from the upper one).
  """
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens/prompt_mask must be [C, P]; got {prompt_tokens.shape}, "
                     f"{prompt_mask.shape}")
  if responses.ndim != 2 or response_mask.shape != responses.shape:
    raise ValueError(f"responses/response_mask must be [Y, R]; got {responses.shape}, "
                     f"{response_mask.shape}")
  responses, response_mask = jnp.asarray(responses), jnp.asarray(response_mask)
  n_y = responses.shape[0]

  def one_prompt(args):
    pt, pm = args

    def one_row(i):
      a = jnp.broadcast_to(responses[i], responses.shape)
      am = jnp.broadcast_to(response_mask[i], response_mask.shape)
      return oracle.preference_prob(
          jnp.broadcast_to(pt, (n_y,) + pt.shape), jnp.broadcast_to(pm, (n_y,) + pm.shape),
          a, am, responses, response_mask)

    return jax.lax.map(one_row, jnp.arange(n_y))

  mat = jax.lax.map(one_prompt, (prompt_tokens, prompt_mask))
  # Entries (i, j) and (j, i) come from different batch positions, so take the
  # upper triangle and complete it: q + fl(1 − q) == 1 exactly in round-to-nearest.
  upper = jnp.triu(jnp.ones((n_y, n_y), bool), 1)
  mat_t = jnp.swapaxes(mat, 1, 2)
  eye = jnp.eye(n_y, dtype=bool)
  return jnp.where(upper, mat, jnp.where(eye, jnp.full_like(mat, 0.5), 1.0 - mat_t))
