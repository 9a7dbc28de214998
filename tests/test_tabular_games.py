"""Preference-game constructors: axioms, endpoints of the knob, determinism, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax.tabular import games

# float32 constructions: P + Pᵀ = 1 holds to a few ulps of 1 (≈ 6e-8 each).
ATOL32 = 1e-6


def _all_games(key):
  return {
      "random": games.random_antisymmetric(key, 3, 5),
      "rps": games.rock_paper_scissors(3, 5, strength=0.8),
      "rps_even": games.rock_paper_scissors(2, 4),
      "bradley_terry": games.random_bradley_terry(key, 3, 5, scale=2.0),
      "mixture": games.mixture(key, 3, 5, cyclicity=0.3),
      "ties": games.ties(2, [2, 1, 2], strength=1.5),
      "dominance": games.dominance(key, 3, 5, margin=0.4, dominant=2),
  }


@pytest.mark.parametrize("name", ["random", "rps", "rps_even", "bradley_terry", "mixture", "ties",
                                  "dominance"])
def test_axioms(name):
  p = np.asarray(_all_games(jax.random.key(1))[name])
  assert p.ndim == 3 and p.shape[1] == p.shape[2]
  np.testing.assert_allclose(p + np.swapaxes(p, 1, 2), 1.0, atol=ATOL32)
  np.testing.assert_allclose(np.diagonal(p, axis1=1, axis2=2), 0.5, atol=ATOL32)
  assert p.min() >= 0.0 and p.max() <= 1.0
  games.validate_preference(p)


def test_rps_is_classic_for_n3():
  p = np.asarray(games.rock_paper_scissors(1, 3))[0]
  # Action i beats action i + 1 (mod 3) surely.
  expected = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])
  np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_rps_uniform_is_unbeatable(n):
  p = np.asarray(games.rock_paper_scissors(1, n, strength=0.6), np.float64)[0]
  np.testing.assert_allclose(p @ np.full(n, 1.0 / n), 0.5, atol=1e-7)


def test_bradley_terry_matches_sigmoid_of_score_difference():
  scores = np.array([[0.3, -1.2, 2.0], [0.0, 0.5, -0.5]])
  with jax.enable_x64(True):
    p = np.asarray(games.bradley_terry(jnp.asarray(scores)))
  ref = 1.0 / (1.0 + np.exp(-(scores[:, :, None] - scores[:, None, :])))
  np.testing.assert_allclose(p, ref, rtol=1e-14, atol=1e-15)


def _is_bt_consistent(p):
  """Transitivity of a BT game: logit P(a≻c) = logit P(a≻b) + logit P(b≻c)."""
  logit = np.log(p) - np.log1p(-p)
  n = p.shape[-1]
  for a, b, c in itertools.product(range(n), repeat=3):
    if not np.allclose(logit[:, a, c], logit[:, a, b] + logit[:, b, c], atol=1e-9):
      return False
  return True


def test_mixture_endpoints():
  key = jax.random.key(3)
  with jax.enable_x64(True):
    transitive = np.asarray(games.mixture(key, 2, 5, cyclicity=0.0, dtype=jnp.float64))
    cyclic = np.asarray(games.mixture(key, 2, 5, cyclicity=1.0, dtype=jnp.float64))
    half = np.asarray(games.mixture(key, 2, 5, cyclicity=0.5, dtype=jnp.float64))
    bt = np.asarray(games.random_bradley_terry(key, 2, 5, dtype=jnp.float64))
  assert _is_bt_consistent(transitive)
  np.testing.assert_allclose(transitive, bt, atol=1e-15)
  assert not _is_bt_consistent(half)
  np.testing.assert_allclose(cyclic, np.asarray(games.rock_paper_scissors(2, 5)), atol=1e-15)
  # Cyclic endpoint: uniform is unbeatable, i.e. a Nash equilibrium.
  np.testing.assert_allclose(cyclic @ np.full(5, 0.2), 0.5, atol=1e-12)


def test_ties_blocks():
  p = np.asarray(games.ties(1, [2, 3], strength=1.0), np.float64)[0]
  np.testing.assert_allclose(p[:2, :2], 0.5, atol=1e-7)
  np.testing.assert_allclose(p[2:, 2:], 0.5, atol=1e-7)
  np.testing.assert_allclose(p[:2, 2:], 1 / (1 + np.exp(-1.0)), atol=1e-6)


def test_dominance():
  p = np.asarray(games.dominance(jax.random.key(0), 2, 4, margin=0.5, dominant=1))
  others = [0, 2, 3]
  np.testing.assert_allclose(p[:, 1, others], 0.75, atol=ATOL32)
  np.testing.assert_allclose(p[:, others, 1], 0.25, atol=ATOL32)


def test_determinism_from_key():
  for name in ("random", "bradley_terry", "mixture", "dominance"):
    a = _all_games(jax.random.key(7))[name]
    b = _all_games(jax.random.key(7))[name]
    c = _all_games(jax.random.key(8))[name]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c)), name


def test_make_game_dispatch():
  key = jax.random.key(2)
  np.testing.assert_array_equal(
      np.asarray(games.make_game("random", key, num_contexts=2, num_actions=3)),
      np.asarray(games.random_antisymmetric(key, 2, 3)))
  np.testing.assert_array_equal(
      np.asarray(games.make_game("rps", key, num_contexts=1, num_actions=5, strength=0.5)),
      np.asarray(games.rock_paper_scissors(1, 5, 0.5)))
  assert games.make_game("ties", key, num_contexts=1, block_sizes=[1, 2]).shape == (1, 3, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: games.make_game("nope", jax.random.key(0)), "unknown"),
    (lambda: games.make_game("random", jax.random.key(0), num_contexts=1, num_actions=3,
                             bogus=1), "bad parameters"),
    (lambda: games.random_antisymmetric(jax.random.key(0), 0, 3), "num_contexts"),
    (lambda: games.rock_paper_scissors(1, 3, strength=1.5), "strength"),
    (lambda: games.rock_paper_scissors(1, 1), "num_actions"),
    (lambda: games.mixture(jax.random.key(0), 1, 3, cyclicity=-0.1), "cyclicity"),
    (lambda: games.ties(1, [2, 0]), r"block_sizes\[1\]"),
    (lambda: games.dominance(jax.random.key(0), 1, 3, dominant=3), "dominant"),
    (lambda: games.bradley_terry(jnp.zeros(3)), "scores"),
    (lambda: games.validate_preference(np.zeros((2, 2))), "shape"),
    (lambda: games.validate_preference(np.full((1, 2, 2), 0.7)), "P \\+ Pᵀ = 1"),
    (lambda: games.validate_preference(np.array([[[0.5, 1.5], [-0.5, 0.5]]])), r"\[0, 1\]"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
