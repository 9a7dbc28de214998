"""Exact game quantities against independent numpy references (loops, brute force, LP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax.tabular import exact
from onpo_jax.tabular import games

# Tolerances. float64: the kernels are a handful of sums of ≤ 8 terms, so
# agreement with the loop references is at round-off level (1e-12). float32:
# inputs are rounded to float32 first (rel. 6e-8), sums of ≤ 8 terms in [0, 1]
# and a logsumexp add a few ulps; 2e-6 absolute covers that with margin.
ATOL64 = 1e-12
ATOL32 = 2e-6


def _random_instance(seed, c=3, n=5):
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=(c, n, n))
  p = np.triu(u, 1) + np.tril(1.0 - np.swapaxes(u, 1, 2), -1) + 0.5 * np.eye(n)
  pi = rng.dirichlet(np.ones(n), size=c)
  pi2 = rng.dirichlet(np.ones(n), size=c)
  ref = rng.dirichlet(np.ones(n) * 2, size=c)
  return p, pi, pi2, ref


def _np_win_rate(p, pi):
  c, n, _ = p.shape
  out = np.zeros((c, n))
  for k in range(c):
    for y in range(n):
      out[k, y] = sum(p[k, y, z] * pi[k, z] for z in range(n))
  return out


def _np_value(p, pi1, pi2):
  c, n, _ = p.shape
  return np.array([sum(pi1[k, a] * p[k, a, b] * pi2[k, b]
                       for a in range(n) for b in range(n)) for k in range(c)])


def _np_gap_brute(p, pi):
  """max over pure row strategies of J(y, π) − min over pure column strategies of J(π, y')."""
  c, n, _ = p.shape
  eye = np.eye(n)
  out = []
  for k in range(c):
    best = max(_np_value(p[k:k + 1], eye[y][None], pi[k:k + 1])[0] for y in range(n))
    worst = min(_np_value(p[k:k + 1], pi[k:k + 1], eye[y][None])[0] for y in range(n))
    out.append(best - worst)
  return np.array(out)


def _np_kl(a, b):
  return np.array([sum(a[k, i] * np.log(a[k, i] / b[k, i]) for i in range(a.shape[1])
                       if a[k, i] > 0) for k in range(a.shape[0])])


def _np_j_tau(p, pi1, pi2, ref, tau):
  return _np_value(p, pi1, pi2) - tau * _np_kl(pi1, ref) + tau * _np_kl(pi2, ref)


def _run(fn, args, x64, use_jit):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    args = [jnp.asarray(a, dtype) if isinstance(a, np.ndarray) else a for a in args]
    f = jax.jit(fn) if use_jit else fn
    out = f(*args)
    assert out.dtype == dtype
    return np.asarray(out, np.float64)


CASES = [(x64, use_jit) for x64 in (True, False) for use_jit in (True, False)]


@pytest.mark.parametrize("x64, use_jit", CASES)
def test_win_rate_value_gap_vs_numpy(x64, use_jit):
  p, pi, pi2, _ = _random_instance(0)
  atol = ATOL64 if x64 else ATOL32
  np.testing.assert_allclose(_run(exact.win_rate_vs_policy, [p, pi], x64, use_jit),
                             _np_win_rate(p, pi), rtol=0, atol=atol)
  np.testing.assert_allclose(_run(exact.preference_value, [p, pi, pi2], x64, use_jit),
                             _np_value(p, pi, pi2), rtol=0, atol=atol)
  np.testing.assert_allclose(_run(exact.duality_gap, [p, pi], x64, use_jit),
                             _np_gap_brute(p, pi), rtol=0, atol=atol)


@pytest.mark.parametrize("x64, use_jit", CASES)
def test_kl_duality_gap_closed_form_vs_gibbs_optima(x64, use_jit):
  """Closed form = J_τ at the (numpy-computed) Gibbs best responses, for several τ."""
  p, pi, _, ref = _random_instance(1)
  atol = ATOL64 if x64 else 1e-5  # float32: 2τ·logsumexp(r/τ) amplifies round-off by ≤ 1/τ.
  for tau in (0.05, 0.3, 2.0):
    r = _np_win_rate(p, pi)
    # Best response to π in J_τ(·, π): ∝ ref·exp(r/τ); best response of the column
    # player against π minimises 1 − <π2, r> + τ KL(π2‖ref): the same Gibbs policy.
    gibbs = ref * np.exp(r / tau)
    gibbs /= gibbs.sum(-1, keepdims=True)
    ref_gap = _np_j_tau(p, gibbs, pi, ref, tau) - _np_j_tau(p, pi, gibbs, ref, tau)
    got = _run(lambda a, b, c: exact.kl_duality_gap(a, b, c, tau), [p, pi, ref], x64, use_jit)
    np.testing.assert_allclose(got, ref_gap, rtol=0, atol=atol)


def test_kl_duality_gap_is_the_max_min_over_a_simplex_grid():
  """Brute force over a grid of the 3-simplex: nothing beats the closed form, and it is attained."""
  p, pi, _, ref = _random_instance(2, c=2, n=3)
  tau = 0.2
  h = 1.0 / 240
  grid = np.array([(i * h, j * h, 1 - (i + j) * h) for i in range(241) for j in range(241 - i)])
  grid = np.clip(grid, 0.0, 1.0)
  with jax.enable_x64(True):
    closed = np.asarray(exact.kl_duality_gap(jnp.asarray(p), jnp.asarray(pi), jnp.asarray(ref),
                                             tau))
  for k in range(2):
    r = p[k] @ pi[k]
    kl_grid = np.sum(np.where(grid > 0, grid * np.log(np.where(grid > 0, grid, 1) / ref[k]), 0),
                     axis=1)
    kl_pi = np.sum(pi[k] * np.log(pi[k] / ref[k]))
    best = np.max(grid @ r - tau * kl_grid) + tau * kl_pi
    # J_τ(π, π2) = 1 − <π2, r> − τ KL(π‖ref) + τ KL(π2‖ref).
    worst = np.min(1 - grid @ r + tau * kl_grid) - tau * kl_pi
    brute = best - worst
    # The grid can only under-estimate the max and over-estimate the min.
    assert brute <= closed[k] + 1e-12
    # A grid of spacing h is within O(h²/π_min) of the interior optimum: 1e-4 here.
    assert closed[k] - brute < 1e-4


def test_kl_divergence_vs_numpy():
  _, pi, pi2, _ = _random_instance(3)
  pi = pi.copy()
  pi[0, 0] = 0.0  # 0·log 0 = 0 must not produce NaN.
  pi[0] /= pi[0].sum()
  with jax.enable_x64(True):
    got = np.asarray(exact.kl_divergence(jnp.asarray(pi), jnp.asarray(pi2)))
  np.testing.assert_allclose(got, _np_kl(pi, pi2), rtol=0, atol=ATOL64)


def test_gap_is_zero_at_lp_nash_and_value_is_half():
  key = jax.random.key(4)
  ps = [games.random_antisymmetric(key, 3, 6), games.mixture(key, 2, 5, 0.6),
        games.random_bradley_terry(key, 2, 4), games.rock_paper_scissors(1, 5, 0.7)]
  for p in ps:
    p = np.asarray(p, np.float64)
    pi, value = exact.nash_lp(p)
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
    assert pi.min() >= 0
    # HiGHS' default feasibility tolerance is 1e-7.
    np.testing.assert_allclose(value, 0.5, atol=1e-7)
    np.testing.assert_allclose(_np_gap_brute(p, pi), 0.0, atol=1e-6)
    # The gap of any other policy is positive.
    assert np.all(_np_gap_brute(p, np.full_like(pi, 1 / pi.shape[1])) >= -1e-12)


def test_lp_nash_known_games():
  pi, _ = exact.nash_lp(np.asarray(games.rock_paper_scissors(2, 3), np.float64))
  np.testing.assert_allclose(pi, 1 / 3, atol=1e-7)
  p = np.asarray(games.dominance(jax.random.key(0), 2, 4, margin=0.5, dominant=3), np.float64)
  pi, _ = exact.nash_lp(p)
  np.testing.assert_allclose(pi, np.tile(np.eye(4)[3], (2, 1)), atol=1e-7)
  p = np.asarray(games.random_bradley_terry(jax.random.key(1), 1, 5), np.float64)
  pi, _ = exact.nash_lp(p)
  # A BT game's Nash equilibrium is the Condorcet winner: the top-score action.
  np.testing.assert_allclose(pi[0], np.eye(5)[np.argmax(p[0].sum(1))], atol=1e-7)


def test_lp_value_nonsymmetric_game_matches_pure_minmax():
  """For a general (non-symmetric) matrix the LP value is max_π min_y' J(π, y')."""
  rng = np.random.default_rng(5)
  p = rng.uniform(size=(1, 3, 3))
  pi, value = exact.nash_lp(p)
  assert abs(np.min(pi[0] @ p[0]) - value[0]) < 1e-7
  # No grid policy guarantees more than the LP value.
  h = 1 / 100
  grid = np.array([(i * h, j * h, 1 - (i + j) * h) for i in range(101) for j in range(101 - i)])
  assert np.max(np.min(grid @ p[0], axis=1)) <= value[0] + 1e-7


@pytest.mark.parametrize("call, match", [
    (lambda: exact.win_rate_vs_policy(jnp.zeros((2, 3)), jnp.zeros((2, 3))), "P must"),
    (lambda: exact.win_rate_vs_policy(jnp.zeros((2, 3, 3)), jnp.zeros((2, 4))), "pi must"),
    (lambda: exact.preference_value(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), jnp.zeros((3,))),
     "pi2 must"),
    (lambda: exact.kl_duality_gap(jnp.zeros((1, 3, 3)), jnp.ones((1, 3)) / 3,
                                  jnp.ones((1, 3)) / 3, 0.0), "tau"),
    (lambda: exact.kl_duality_gap(jnp.zeros((1, 3, 3)), jnp.ones((1, 3)) / 3,
                                  jnp.ones((1, 2)) / 2, 0.1), "pi_ref"),
    (lambda: exact.kl_divergence(jnp.ones(3), jnp.ones(2)), "equal shapes"),
    (lambda: exact.nash_lp(np.zeros((3, 3))), "shape"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_brute_force_reference_on_hand_example():
  """The brute-force gap reference itself: 2·max_y P(y ≻ π) − 1 on a hand example."""
  p = np.array([[[0.5, 0.9], [0.1, 0.5]]])
  pi = np.array([[0.5, 0.5]])
  # max_y P(y ≻ π) = 0.7 (action 0), so the gap is 0.4.
  assert abs(_np_gap_brute(p, pi)[0] - 0.4) < 1e-15
