"""Tabular dynamics: numpy references, closed-form identities and the convergence theory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax.tabular import dynamics
from onpo_jax.tabular import games

# Tolerances for iterates after T = 20 rounds. float64: log-space vs
# probability-space recursions differ only by round-off, compounded over 20
# steps of a map with Lipschitz constant ≤ 1 + η: 1e-11. float32: per-step
# round-off ≈ 1e-7 on logits, compounded the same way: 1e-5.
ATOL64 = 1e-11
ATOL32 = 1e-5
T_SHORT = 20


def _instance(seed=0, c=2, n=4):
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=(c, n, n))
  p = np.triu(u, 1) + np.tril(1.0 - np.swapaxes(u, 1, 2), -1) + 0.5 * np.eye(n)
  pi1 = rng.dirichlet(np.ones(n) * 3, size=c)
  ref = rng.dirichlet(np.ones(n) * 3, size=c)
  return p, pi1, ref


def _normalise(w):
  return w / w.sum(-1, keepdims=True)


def _wr(p, pi):
  return np.einsum("cij,cj->ci", p, pi)


# Independent numpy references, in probability space with explicit loops over rounds.
def np_omd(p, pi1, eta, t):
  out, pi = [], pi1.copy()
  for _ in range(t):
    out.append(pi)
    pi = _normalise(pi * np.exp(eta * _wr(p, pi)))
  return np.stack(out)


def np_onpo(p, pi1, eta, t):
  out, aux, m = [], pi1.copy(), np.zeros_like(pi1)
  for _ in range(t):
    pi = _normalise(aux * np.exp(eta * m))
    out.append(pi)
    r = _wr(p, pi)
    aux = _normalise(aux * np.exp(eta * r))
    m = r
  return np.stack(out)


def np_inpo(p, pi1, ref, tau, eta_i, t):
  out, pi = [], pi1.copy()
  for _ in range(t):
    out.append(pi)
    pi = _normalise(np.exp(_wr(p, pi) / eta_i) * ref ** (tau / eta_i) * pi ** (1 - tau / eta_i))
  return np.stack(out)


def np_nash_md(p, pi1, ref, tau, eta, t):
  out, pi = [], pi1.copy()
  for _ in range(t):
    out.append(pi)
    mix = _normalise(pi ** (1 - eta * tau) * ref ** (eta * tau))
    pi = _normalise(mix * np.exp(eta * _wr(p, mix)))
  return np.stack(out)


def np_extragradient(p, pi1, ref, tau, eta, t):
  out, pi = [], pi1.copy()
  for _ in range(t):
    out.append(pi)
    prior = pi ** (1 - eta * tau) * ref ** (eta * tau)
    half = _normalise(prior * np.exp(eta * _wr(p, pi)))
    pi = _normalise(prior * np.exp(eta * _wr(p, half)))
  return np.stack(out)


def np_gap(p, pi):
  return 2 * _wr(p, pi).max(-1) - 1


METHODS = {
    "omd": (lambda p, l, r: dynamics.run_omd(p, l, 0.7, T_SHORT),
            lambda p, pi, r: np_omd(p, pi, 0.7, T_SHORT)),
    "onpo": (lambda p, l, r: dynamics.run_onpo(p, l, 0.5, T_SHORT),
             lambda p, pi, r: np_onpo(p, pi, 0.5, T_SHORT)),
    "onpo_compact": (lambda p, l, r: dynamics.run_onpo_compact(p, l, 0.5, T_SHORT),
                     lambda p, pi, r: np_onpo(p, pi, 0.5, T_SHORT)),
    "inpo": (lambda p, l, r: dynamics.run_inpo(p, l, r, 0.3, 1.5, T_SHORT),
             lambda p, pi, r: np_inpo(p, pi, r, 0.3, 1.5, T_SHORT)),
    "nash_md": (lambda p, l, r: dynamics.run_nash_md(p, l, r, 0.4, 0.8, T_SHORT),
                lambda p, pi, r: np_nash_md(p, pi, r, 0.4, 0.8, T_SHORT)),
    "extragradient": (lambda p, l, r: dynamics.run_extragradient(p, l, r, 0.2, 0.6, T_SHORT),
                      lambda p, pi, r: np_extragradient(p, pi, r, 0.2, 0.6, T_SHORT)),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("x64", [True, False])
def test_runner_matches_numpy(method, x64):
  run_fn, ref_fn = METHODS[method]
  p, pi1, ref = _instance()
  expected = ref_fn(p, pi1, ref)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    args = (jnp.asarray(p, dtype), jnp.log(jnp.asarray(pi1, dtype)),
            jnp.log(jnp.asarray(ref, dtype)))
    got = run_fn(*args)
    assert got.dtype == dtype and got.shape == (T_SHORT, 2, 4)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=ATOL64 if x64 else ATOL32)


@pytest.mark.parametrize("method", ["omd", "onpo", "extragradient"])
def test_runner_without_jit_matches_jit(method):
  run_fn, _ = METHODS[method]
  p, pi1, ref = _instance(1)
  with jax.enable_x64(True):
    args = (jnp.asarray(p), jnp.log(jnp.asarray(pi1)), jnp.log(jnp.asarray(ref)))
    jitted = np.asarray(run_fn(*args))
    with jax.disable_jit():
      eager = np.asarray(run_fn(*args))
  np.testing.assert_allclose(eager, jitted, rtol=0, atol=ATOL64)


def test_steps_without_jit_match_numpy():
  p, pi1, ref = _instance(2)
  with jax.enable_x64(True):
    pj, lj, rj = jnp.asarray(p), jnp.log(jnp.asarray(pi1)), jnp.log(jnp.asarray(ref))
    np.testing.assert_allclose(np.exp(dynamics.omd_step(pj, lj, 0.3)), np_omd(p, pi1, 0.3, 2)[1],
                               atol=ATOL64)
    np.testing.assert_allclose(np.exp(dynamics.inpo_step(pj, lj, rj, 0.1, 2.0)),
                               np_inpo(p, pi1, ref, 0.1, 2.0, 2)[1], atol=ATOL64)
    np.testing.assert_allclose(np.exp(dynamics.nash_md_step(pj, lj, rj, 0.1, 0.9)),
                               np_nash_md(p, pi1, ref, 0.1, 0.9, 2)[1], atol=ATOL64)
    np.testing.assert_allclose(np.exp(dynamics.extragradient_step(pj, lj, rj, 0.0, 0.9)),
                               np_extragradient(p, pi1, ref, 0.0, 0.9, 2)[1], atol=ATOL64)


def test_onpo_compact_form_equals_two_sequence_recursion():
  p, pi1, _ = _instance(3, c=3, n=5)
  with jax.enable_x64(True):
    pj, lj = jnp.asarray(p), jnp.log(jnp.asarray(pi1))
    two = dynamics.run_onpo(pj, lj, 0.5, 200)
    compact = dynamics.run_onpo_compact(pj, lj, 0.5, 200)
  # 200 rounds of the same arithmetic in two groupings: round-off only.
  np.testing.assert_allclose(np.asarray(compact), np.asarray(two), rtol=0, atol=1e-10)


def test_onpo_with_zero_predictor_is_omd():
  p, pi1, _ = _instance(4)
  with jax.enable_x64(True):
    pj, lj = jnp.asarray(p), jnp.log(jnp.asarray(pi1))
    zero, aux, played = jnp.zeros_like(lj), lj, []
    for _ in range(T_SHORT):
      logp_policy, aux, _ = dynamics.onpo_step(pj, aux, zero, 0.5)
      played.append(np.exp(np.asarray(logp_policy)))
    omd = np.asarray(dynamics.run_omd(pj, lj, 0.5, T_SHORT))
  np.testing.assert_allclose(np.stack(played), omd, rtol=0, atol=ATOL64)
  # ...while the real predictor changes the iterates.
  assert np.abs(np_onpo(p, pi1, 0.5, T_SHORT) - omd).max() > 1e-3


def test_inpo_without_kl_is_omd_with_inverse_step():
  p, pi1, ref = _instance(5)
  with jax.enable_x64(True):
    pj, lj, rj = jnp.asarray(p), jnp.log(jnp.asarray(pi1)), jnp.log(jnp.asarray(ref))
    inpo = dynamics.run_inpo(pj, lj, rj, 0.0, 4.0, T_SHORT)
    omd = dynamics.run_omd(pj, lj, 0.25, T_SHORT)
  np.testing.assert_allclose(np.asarray(inpo), np.asarray(omd), rtol=0, atol=ATOL64)


def test_average_and_last_iterate_gaps_vs_numpy():
  p, pi1, _ = _instance(6)
  pis = np_onpo(p, pi1, 0.5, 50)
  ref_avg = np.cumsum(pis, 0) / np.arange(1, 51)[:, None, None]
  with jax.enable_x64(True):
    pj, pisj = jnp.asarray(p), jnp.asarray(pis)
    np.testing.assert_allclose(np.asarray(dynamics.average_iterates(pisj)), ref_avg, atol=1e-14)
    np.testing.assert_allclose(np.asarray(dynamics.average_iterate_gaps(pj, pisj)),
                               np.stack([np_gap(p, a) for a in ref_avg]), atol=1e-13)
    np.testing.assert_allclose(np.asarray(dynamics.last_iterate_gaps(pj, pisj)),
                               np.stack([np_gap(p, a) for a in pis]), atol=1e-13)


def test_float32_average_iterate_stays_accurate_over_long_horizons():
  """Compensated prefix sums: float32 averages stay at input-rounding accuracy at T = 1e4.

  Casting the inputs to float32 and the final division each cost ≤ 6e-8, so
  1.5e-7 is the budget; a plain float32 running sum is off by 7e-7 here.
  """
  t = 10_000
  rng = np.random.default_rng(7)
  pis = rng.dirichlet(np.ones(4), size=(t, 2))
  ref = np.cumsum(pis, 0) / np.arange(1, t + 1)[:, None, None]
  got = np.asarray(dynamics.average_iterates(jnp.asarray(pis, jnp.float32)))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1.5e-7)


def _random_games(n, seeds=(0, 1, 2)):
  return jnp.concatenate([games.random_antisymmetric(jax.random.key(s), 2, n, jnp.float64)
                          for s in seeds])


@pytest.mark.parametrize("n", [3, 5, 8])
def test_onpo_average_gap_is_order_one_over_t(n):
  """ONPO Theorem 2: gap(π̄_T)·T ≤ 4·max(D, √D) + 1 for every T ≤ 1e4 (docs/algorithm.md §2.5)."""
  t_max = 10_000
  d = math.log(n)
  eta = min(0.5, math.sqrt(d))
  bound = 4 * max(d, math.sqrt(d)) + 1
  with jax.enable_x64(True):
    p = _random_games(n)
    lp = dynamics.uniform_logp(p.shape[0], n, jnp.float64)
    gaps = np.asarray(dynamics.average_iterate_gaps(p, dynamics.run_onpo(p, lp, eta, t_max)))
    ts = np.arange(1, t_max + 1)[:, None]
    assert np.all(gaps * ts <= bound), (gaps * ts).max()
    # The bound is not vacuous: OMD with the same fixed η breaks it.
    omd = np.asarray(dynamics.average_iterate_gaps(p, dynamics.run_omd(p, lp, eta, t_max)))
    assert np.any(omd * ts > bound)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_omd_average_gap_is_order_one_over_sqrt_t(n):
  """ONPO Theorem 1: with η = √(D/T), gap(π̄_T)·√T ≤ 4√D.

  The bound is rigorous, no slack needed: Hedge with rewards in [0, 1] has regret
  ≤ D/η + ηT/8, and in symmetric self-play gap(π̄_T) = 2·regret/T, so
  gap·√T ≤ 2(1 + 1/8)√D = 2.25√D ≤ 4√D.
  """
  d = math.log(n)
  horizons = np.array([10, 100, 1000, 10_000])
  with jax.enable_x64(True):
    p = _random_games(n)
    lp = dynamics.uniform_logp(p.shape[0], n, jnp.float64)
    etas = jnp.sqrt(d / jnp.asarray(horizons, jnp.float64))
    pis = jax.vmap(lambda e: dynamics.run_omd(p, lp, e, int(horizons[-1])))(etas)
    gaps = np.stack([np.asarray(dynamics.average_iterate_gaps(p, pis[k]))[t - 1]
                     for k, t in enumerate(horizons)])
  scaled = gaps * np.sqrt(horizons)[:, None]
  assert np.all(scaled <= 2.25 * math.sqrt(d) + 1e-9), scaled.max()
  # O(1/√T) but not O(1/T): gap·T grows beyond ONPO's bound at T = 1e4.
  assert np.max(gaps[-1] * horizons[-1]) > 4 * max(d, math.sqrt(d)) + 1


def test_rps_last_iterate_onpo_converges_omd_cycles():
  """ONPO Theorem 3 (η ≤ 1/8, unique Nash): last iterate converges; OMD's cycles."""
  with jax.enable_x64(True):
    p = games.rock_paper_scissors(1, 3, dtype=jnp.float64)
    lp = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    onpo = np.asarray(dynamics.last_iterate_gaps(p, dynamics.run_onpo(p, lp, 1 / 8, 10_000)))[:, 0]
    omd = np.asarray(dynamics.last_iterate_gaps(p, dynamics.run_omd(p, lp, 1 / 8, 10_000)))[:, 0]
  # Measured: ONPO 0.30 at t=1, 7e-4 at t=1e4; OMD never below 0.33 after t=5000.
  assert onpo[-1] < 2e-3
  assert onpo[-1] < onpo[5000] / 4 < onpo[0] / 4
  assert omd[5000:].min() > 0.25


@pytest.mark.parametrize("call, match", [
    (lambda: dynamics.omd_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 4)), 0.1), "logp must"),
    (lambda: dynamics.omd_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), -0.1), "eta"),
    (lambda: dynamics.onpo_step(jnp.zeros((3, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), 0.1),
     "P must"),
    (lambda: dynamics.onpo_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), jnp.zeros((3,)), 0.1),
     "reward_prev"),
    (lambda: dynamics.inpo_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), 2.0,
                                1.0), "tau <= eta_inpo"),
    (lambda: dynamics.inpo_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), 0.0,
                                0.0), "eta_inpo"),
    (lambda: dynamics.nash_md_step(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)),
                                   3.0, 1.0), "eta \\* tau"),
    (lambda: dynamics.onpo_policy_compact(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros(3),
                                          0.1), "share"),
    (lambda: dynamics.average_iterates(jnp.zeros((3, 3))), r"\[T, C, n\]"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
