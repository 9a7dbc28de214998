"""Tabular preference games: matrices P[c, y, y'] = P(y ≻ y' | x_c).

Every game is a batch of C contexts (prompts) with n actions (responses) and
satisfies the general-preference axioms of ONPO (arXiv 2502.16852;
docs/algorithm.md §1.1): P ∈ [0, 1] and P + Pᵀ = 1, hence P(y ≻ y) = 1/2. Nothing here
assumes a Bradley–Terry (BT) reward; BT games are one family among several.

Random games take an explicit PRNG key so that a seed fixes the game; games
without randomness ignore the key in `make_game`.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax.infra import checks

GAMES = ("random", "rps", "bradley_terry", "mixture", "ties", "dominance")


def _check_positive_int(value, name: str) -> None:
  if not checks.is_int(value, 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_unit_interval(value, name: str) -> None:
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def from_antisymmetric(a: jax.Array) -> jax.Array:
  """Turns an antisymmetric matrix A (|A| ≤ 1/2) into P = 1/2 + A.

  Args:
    a: [C, n, n] with A = -Aᵀ.

  Returns:
    [C, n, n] preference matrix; P + Pᵀ = 1 holds exactly because only the
    strict upper triangle of `a` is read and mirrored.
  """
  if a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f"a must have shape [C, n, n], got {a.shape}")
  upper = jnp.triu(a, k=1)
  return 0.5 + upper - jnp.swapaxes(upper, 1, 2)


def random_antisymmetric(key: jax.Array, num_contexts: int, num_actions: int,
                         dtype=jnp.float32) -> jax.Array:
  """Random general game: P(y ≻ y') ~ U[0, 1] i.i.d. above the diagonal.

  Such games are intransitive with high probability and have a unique,
  usually mixed, Nash equilibrium.

  Args:
    key: PRNG key.
    num_contexts: C.
    num_actions: n.
    dtype: float dtype of the result.

  Returns:
    [C, n, n] preference matrix.
  """
  _check_positive_int(num_contexts, "num_contexts")
  _check_positive_int(num_actions, "num_actions")
  u = jax.random.uniform(key, (num_contexts, num_actions, num_actions), dtype=dtype)
  return from_antisymmetric(u - 0.5)


def rock_paper_scissors(num_contexts: int, num_actions: int = 3, strength: float = 1.0,
                        dtype=jnp.float32) -> jax.Array:
  """Generalised n-action rock–paper–scissors (a circulant cyclic game).

  Action i beats i + k (mod n) for k = 1..⌈n/2⌉−1 with probability
  (1 + strength)/2; for even n, i and i + n/2 tie. Every row of P − 1/2 sums to
  zero, so the uniform policy is a Nash equilibrium (the unique one for odd n
  and strength > 0).

  Args:
    num_contexts: C (all contexts share the game).
    num_actions: n ≥ 2.
    strength: s ∈ [0, 1]; s = 1 is deterministic RPS, s = 0 all ties.
    dtype: float dtype of the result.

  Returns:
    [C, n, n] preference matrix.
  """
  _check_positive_int(num_contexts, "num_contexts")
  _check_positive_int(num_actions, "num_actions")
  if num_actions < 2:
    raise ValueError(f"num_actions must be >= 2 for rock_paper_scissors, got {num_actions}")
  _check_unit_interval(strength, "strength")
  n = num_actions
  k = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # column minus row, mod n
  sign = np.where((k >= 1) & (2 * k < n), 1.0, np.where((k >= 1) & (2 * k > n), -1.0, 0.0))
  p = 0.5 + 0.5 * strength * jnp.asarray(sign, dtype=dtype)
  return jnp.broadcast_to(p, (num_contexts, n, n))


def bradley_terry(scores: jax.Array) -> jax.Array:
  """Transitive game from scores: P(y ≻ y') = σ(s_y − s_y').

  Args:
    scores: [C, n] real scores.

  Returns:
    [C, n, n] preference matrix.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must have shape [C, n], got {scores.shape}")
  return jax.nn.sigmoid(scores[:, :, None] - scores[:, None, :])


def random_bradley_terry(key: jax.Array, num_contexts: int, num_actions: int,
                         scale: float = 1.0, dtype=jnp.float32) -> jax.Array:
  """BT game with scores ~ scale · N(0, 1)."""
  _check_positive_int(num_contexts, "num_contexts")
  _check_positive_int(num_actions, "num_actions")
  if scale < 0:
    raise ValueError(f"scale must be >= 0, got {scale}")
  return bradley_terry(scale * jax.random.normal(key, (num_contexts, num_actions), dtype))


def mixture(key: jax.Array, num_contexts: int, num_actions: int, cyclicity: float,
            scale: float = 1.0, strength: float = 1.0, dtype=jnp.float32) -> jax.Array:
  """Convex mixture (1 − λ)·P_BT + λ·P_RPS, from transitive to cyclic.

  A convex combination of preference matrices is again one, so the knob λ
  moves continuously from a BT game (λ = 0) to generalised RPS (λ = 1).

  Args:
    key: PRNG key for the BT scores.
    num_contexts: C.
    num_actions: n ≥ 2.
    cyclicity: λ ∈ [0, 1].
    scale: BT score scale.
    strength: RPS strength.
    dtype: float dtype of the result.

  Returns:
    [C, n, n] preference matrix.
  """
  _check_unit_interval(cyclicity, "cyclicity")
  bt = random_bradley_terry(key, num_contexts, num_actions, scale, dtype)
  rps = rock_paper_scissors(num_contexts, num_actions, strength, dtype)
  return (1.0 - cyclicity) * bt + cyclicity * rps


def ties(num_contexts: int, block_sizes: Sequence[int], strength: float = 1.0,
         dtype=jnp.float32) -> jax.Array:
  """Blocks of equally strong actions: a BT game with tied scores.

  Block b has score −strength·b, so earlier blocks win; within a block P = 1/2.
  Any policy supported on the first block is a Nash equilibrium (not unique
  when that block has more than one action).

  Args:
    num_contexts: C.
    block_sizes: positive sizes, summing to n.
    strength: score gap between consecutive blocks (≥ 0).
    dtype: float dtype of the result.

  Returns:
    [C, n, n] preference matrix.
  """
  _check_positive_int(num_contexts, "num_contexts")
  sizes = list(block_sizes)
  if not sizes:
    raise ValueError("block_sizes must be non-empty")
  for i, s in enumerate(sizes):
    _check_positive_int(s, f"block_sizes[{i}]")
  if strength < 0:
    raise ValueError(f"strength must be >= 0, got {strength}")
  block = np.repeat(np.arange(len(sizes)), sizes)
  scores = jnp.asarray(-strength * block, dtype=dtype)
  return bradley_terry(jnp.broadcast_to(scores, (num_contexts, block.size)))


def dominance(key: jax.Array, num_contexts: int, num_actions: int, margin: float = 0.5,
              dominant: int = 0, dtype=jnp.float32) -> jax.Array:
  """One action beats every other one; the rest is a random general game.

  The dominant action wins each duel with probability 1/2 + margin/2, so with
  margin > 0 the pure dominant action is the unique Nash equilibrium.

  Args:
    key: PRNG key for the sub-game among the other actions.
    num_contexts: C.
    num_actions: n ≥ 2.
    margin: in [0, 1].
    dominant: index of the dominant action.
    dtype: float dtype of the result.

  Returns:
    [C, n, n] preference matrix.
  """
  _check_unit_interval(margin, "margin")
  _check_positive_int(num_actions, "num_actions")
  if not 0 <= dominant < num_actions:
    raise ValueError(f"dominant must be in [0, {num_actions}), got {dominant}")
  p = random_antisymmetric(key, num_contexts, num_actions, dtype)
  win = jnp.asarray(0.5 + 0.5 * margin, dtype)
  p = p.at[:, dominant, :].set(win).at[:, :, dominant].set(1.0 - win)
  return p.at[:, dominant, dominant].set(0.5)


def validate_preference(p, atol: float = 1e-6) -> np.ndarray:
  """Checks a concrete preference matrix and returns it as numpy.

  Args:
    p: array-like [C, n, n].
    atol: tolerance on P + Pᵀ = 1 and on the range.

  Returns:
    `p` as a numpy array.

  Raises:
    ValueError: naming the violated property.
  """
  p = np.asarray(p)
  if p.ndim != 3 or p.shape[1] != p.shape[2] or p.shape[1] < 1:
    raise ValueError(f"preference matrix P must have shape [C, n, n], got {p.shape}")
  if not np.all(np.isfinite(p)):
    raise ValueError("preference matrix P has non-finite entries")
  if p.min() < -atol or p.max() > 1 + atol:
    raise ValueError(f"preference matrix P must lie in [0, 1], got range "
                     f"[{p.min():.3g}, {p.max():.3g}]")
  err = np.abs(p + np.swapaxes(p, 1, 2) - 1.0).max()
  if err > atol:
    raise ValueError(f"preference matrix P must satisfy P + Pᵀ = 1; max violation {err:.3g}")
  return p


def _no_key(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  return lambda key, **kw: fn(**kw)


_FACTORIES: dict[str, Callable[..., jax.Array]] = {
    "random": random_antisymmetric,
    "rps": _no_key(rock_paper_scissors),
    "bradley_terry": random_bradley_terry,
    "mixture": mixture,
    "ties": _no_key(ties),
    "dominance": dominance,
}


def make_game(name: str, key: jax.Array, **kwargs) -> jax.Array:
  """Builds a game by name (for configs) and validates it.

  Args:
    name: one of `GAMES`.
    key: PRNG key (ignored by deterministic games: 'rps', 'ties').
    **kwargs: the keyword arguments of the named constructor.

  Returns:
    [C, n, n] preference matrix.

  Raises:
    ValueError: for an unknown name or bad parameters.
  """
  if name not in _FACTORIES:
    raise ValueError(f"game name {name!r} is unknown; expected one of {GAMES}")
  try:
    p = _FACTORIES[name](key, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad parameters for game {name!r}: {e}") from e
  validate_preference(p)
  return p
