"""Synthetic preference oracles over token sequences, for the testbed.

Both implement `onpo_jax.oracles.base.Oracle` (the LM judge and the BT
reward-model oracle built on the decoder live in `judge.py` and
`reward_model.py` beside this file):

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

Exact symmetry comes from `base.antisymmetric_logit` and `base.symmetric_sigmoid`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from onpo_jax.oracles.base import check_batch
from onpo_jax.oracles.base import antisymmetric_logit
from onpo_jax.oracles.base import symmetric_sigmoid


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
    check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
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
    check_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)

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
