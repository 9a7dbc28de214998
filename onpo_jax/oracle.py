"""Preference oracles over token sequences: the shared interface and synthetic oracles.

The oracle contract (ONPO_SPEC.md §1, BASELINES.md "Oracle contract"): a general
preference P(a ≻ b | x) ∈ [0, 1] with P(a ≻ b) + P(b ≻ a) = 1, so P(a ≻ a) = 1/2.
Nothing assumes a Bradley–Terry (BT) reward: intransitive (cyclic) preferences
are allowed. Querying the oracle yields a Bernoulli label (`compare`).

Token-level batches: prompts left-padded `prompt_tokens [N, P] int32` with
`prompt_mask [N, P] bool`; responses right-padded `a_tokens [N, R]`,
`a_mask [N, R]`, same for b.

Two synthetic oracles live here (the LM judge and the BT reward-model oracle
built on the decoder live in `onpo_jax/judge.py`):

* `SyntheticOracle`: random features φ(x, y) = tanh(h(x) + h(y)) ∈ R^d, with
  h a sum of position-dependent token embeddings (prompt positions counted from
  the first real token, so left padding does not change the result), and

      P(a ≻ b | x) = σ( z(x, a, b) ),
      z(x, a, b) = strength · [ (1 − κ_x) · (s(x, a) − s(x, b)) + κ_x · A(x, a, b) ],
      s(x, y)    = w · φ(x, y) / √d                              (transitive score),
      A(x, a, b) = [φ_a ᵀ M φ_b − φ_b ᵀ M φ_a] / d                  (antisymmetric),

  with κ_x ∈ [0, 1] the per-prompt cyclicity knob: κ = 0 is a BT game
  (transitive), κ = 1 is purely cyclic (every A-game is balanced: E_y A = 0
  has no dominant response in general). κ_x = clip(cyclic + cyclic_spread ·
  (u(x) − 1/2), 0, 1) with u(x) = σ(v · h(x)) a fixed random function of the
  prompt, so prompts differ in how cyclic their game is.
* `BTRewardOracle`: P(a ≻ b | x) = σ(r(x, a) − r(x, b)) for a reward function r.

Exact symmetry in floating point: each row's pair is put in a canonical order
(lexicographic on the masked tokens), the logit z is computed once for that
order and negated when the caller's order is the other one, and identical
responses get z = 0. So z(a, b) == −z(b, a) bit-exactly whatever the batch
position, and P = σ(|z|) if z ≥ 0 else 1 − σ(|z|): since σ(|z|) ∈ [1/2, 1],
1 − σ(|z|) is exact (Sterbenz), hence P(a ≻ b) + P(b ≻ a) == 1 exactly and
P(a ≻ a) == 1/2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp


class Oracle(Protocol):
  """A general preference oracle over token sequences (see module docstring)."""

  vocab_size: int

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens,
                      b_mask) -> jax.Array:
    """Returns P(a ≻ b | x) [N] float, order-symmetrised (P(a≻b) + P(b≻a) == 1)."""
    ...


def _check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
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


def _positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token counted from the first real one (pads get 0)."""
  return jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _embed_sum(table: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_t mask_t · table[pos_t, tokens_t] / √(#real tokens): [N, L] -> [N, d]."""
  pos = _positions_from_mask(mask)
  pos = jnp.minimum(pos, table.shape[0] - 1)
  emb = table[pos, tokens]  # [N, L, d]
  m = mask.astype(table.dtype)[..., None]
  count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return jnp.sum(emb * m, axis=1) / jnp.sqrt(count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SyntheticOracle:
  """Random-feature general preference oracle (see module docstring for the formula).

  Attributes:
    prompt_table: [P_max, V, d] position-dependent prompt-token embeddings.
    response_table: [R_max, V, d] position-dependent response-token embeddings.
    w: [d] transitive score weights.
    m: [d, d] bilinear weights; only M − Mᵀ matters (the antisymmetric part).
    v: [d] weights of the per-prompt cyclicity function u(x) = σ(v · h(x)).
    strength: scalar, multiplies the logit z (larger = more decisive preferences).
    cyclic: scalar κ ∈ [0, 1], 0 = Bradley–Terry, 1 = purely cyclic.
    cyclic_spread: scalar ≥ 0, per-prompt spread of κ around `cyclic`.
    vocab_size: V (static).
  """

  prompt_table: jax.Array
  response_table: jax.Array
  w: jax.Array
  m: jax.Array
  v: jax.Array
  strength: jax.Array
  cyclic: jax.Array
  cyclic_spread: jax.Array
  vocab_size: int = dataclasses.field(metadata=dict(static=True), default=0)

  def features(self, prompt_tokens, prompt_mask, tokens, mask):
    """φ(x, y) = tanh(h(x) + h(y)) [N, d] and the prompt embedding h(x) [N, d]."""
    hx = _embed_sum(self.prompt_table, prompt_tokens, prompt_mask)
    hy = _embed_sum(self.response_table, tokens, mask)
    return jnp.tanh(hx + hy), hx

  def kappa(self, hx: jax.Array) -> jax.Array:
    """Per-prompt cyclicity κ_x ∈ [0, 1] from the prompt embedding [N, d] -> [N]."""
    u = jax.nn.sigmoid(hx @ self.v)
    return jnp.clip(self.cyclic + self.cyclic_spread * (u - 0.5), 0.0, 1.0)

  def raw_logit(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
    """z(x, a, b) [N] from the formula, antisymmetric up to rounding only."""
    n = prompt_tokens.shape[0]
    d = self.w.shape[0]
    phi, hx = self.features(
        jnp.concatenate([prompt_tokens, prompt_tokens]), jnp.concatenate([prompt_mask, prompt_mask]),
        jnp.concatenate([a_tokens, b_tokens]), jnp.concatenate([a_mask, b_mask]))
    phi_a, phi_b = phi[:n], phi[n:]
    kappa = self.kappa(hx[:n])
    score = (phi_a - phi_b) @ self.w / jnp.sqrt(jnp.asarray(d, phi.dtype))
    anti = (jnp.einsum("ni,ij,nj->n", phi_a, self.m, phi_b)
            - jnp.einsum("ni,ij,nj->n", phi_b, self.m, phi_a)) / d
    return self.strength * ((1.0 - kappa) * score + kappa * anti)

  def logit(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
    """z(x, a, b) [N], exactly antisymmetric under swapping a and b."""
    _check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    return antisymmetric_logit(self.raw_logit, prompt_tokens, prompt_mask, a_tokens, a_mask,
                               b_tokens, b_mask)

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
    """P(a ≻ b | x) [N] = σ(z(x, a, b)), with P(a≻b) + P(b≻a) == 1 exactly."""
    return symmetric_sigmoid(
        self.logit(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask))


def make_synthetic_oracle(key: jax.Array, *, vocab_size: int, max_prompt_length: int,
                          max_response_length: int, feature_dim: int = 16,
                          strength: float = 3.0, cyclic: float = 0.5,
                          cyclic_spread: float = 0.0, dtype: Any = jnp.float32) -> SyntheticOracle:
  """Builds a `SyntheticOracle` deterministically from `key`.

  Args:
    key: PRNG key; the same key gives the same oracle.
    vocab_size: V, token ids must lie in [0, V).
    max_prompt_length: longest prompt (in real tokens) the oracle can score.
    max_response_length: longest response it can score.
    feature_dim: d.
    strength: multiplies the preference logit; must be > 0.
    cyclic: κ ∈ [0, 1]; 0 = transitive (BT), 1 = purely cyclic.
    cyclic_spread: ≥ 0, per-prompt spread of κ.
    dtype: float dtype of the parameters.

  Returns:
    The oracle.

  Raises:
    ValueError: naming the argument when a value is out of range.
  """
  for name, val in (("vocab_size", vocab_size), ("max_prompt_length", max_prompt_length),
                    ("max_response_length", max_response_length), ("feature_dim", feature_dim)):
    if int(val) < 1:
      raise ValueError(f"{name} must be a positive integer; got {val}")
  if not strength > 0:
    raise ValueError(f"strength must be > 0; got {strength}")
  if not 0.0 <= cyclic <= 1.0:
    raise ValueError(f"cyclic must lie in [0, 1]; got {cyclic}")
  if not cyclic_spread >= 0:
    raise ValueError(f"cyclic_spread must be >= 0; got {cyclic_spread}")
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  d = feature_dim
  # Unit-variance embeddings scaled so tanh is not saturated.
  return SyntheticOracle(
      prompt_table=jax.random.normal(k1, (max_prompt_length, vocab_size, d), dtype),
      response_table=jax.random.normal(k2, (max_response_length, vocab_size, d), dtype),
      w=jax.random.normal(k3, (d,), dtype),
      m=jax.random.normal(k4, (d, d), dtype),
      v=jax.random.normal(k5, (d,), dtype),
      strength=jnp.asarray(strength, dtype),
      cyclic=jnp.asarray(cyclic, dtype),
      cyclic_spread=jnp.asarray(cyclic_spread, dtype),
      vocab_size=int(vocab_size),
  )


@dataclasses.dataclass(frozen=True)
class BTRewardOracle:
  """Bradley–Terry oracle from a reward function: P(a ≻ b | x) = σ(r(x, a) − r(x, b)).

  Attributes:
    reward_fn: (prompt_tokens, prompt_mask, tokens, mask) -> [N] rewards.
    vocab_size: V the reward function accepts.
  """

  reward_fn: Callable[..., jax.Array]
  vocab_size: int

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
    """P(a ≻ b | x) [N], with P(a≻b) + P(b≻a) == 1 exactly."""
    _check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)

    def raw(pt, pm, at, am, bt, bm):
      n = pt.shape[0]
      r = self.reward_fn(jnp.concatenate([pt, pt]), jnp.concatenate([pm, pm]),
                         jnp.concatenate([at, bt]), jnp.concatenate([am, bm]))
      return r[:n] - r[n:]

    return symmetric_sigmoid(antisymmetric_logit(raw, prompt_tokens, prompt_mask, a_tokens,
                                                 a_mask, b_tokens, b_mask))


def synthetic_reward_oracle(oracle: SyntheticOracle) -> BTRewardOracle:
  """The BT oracle whose reward is `oracle`'s transitive score s(x, y) times its strength."""

  def reward_fn(prompt_tokens, prompt_mask, tokens, mask):
    phi, _ = oracle.features(prompt_tokens, prompt_mask, tokens, mask)
    d = oracle.w.shape[0]
    return oracle.strength * (phi @ oracle.w) / jnp.sqrt(jnp.asarray(d, phi.dtype))

  return BTRewardOracle(reward_fn=reward_fn, vocab_size=oracle.vocab_size)


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
