"""The tabular shadow (`onpo_jax.testbed.shadow`): numpy references, consistency, the 1/T rate."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onpo_jax.infra import stats
from onpo_jax.testbed import evaluation
from onpo_jax.testbed import exact
from onpo_jax.testbed import shadow


def _cfg(eta=2.0, eta_omd=0.5, eta_inpo=0.5, tau=0.5 / 3, beta_ipo=0.4):
  c = ml_collections.ConfigDict()
  c.onpo = {"eta": eta}
  c.omd = {"eta_inpo": eta_omd}
  c.inpo = {"eta_inpo": eta_inpo, "tau": tau}
  c.online_ipo = {"beta": beta_ipo}
  return ml_collections.ConfigDict(c)


CFG = _cfg()
T_SHORT = 6


def _game(seed=0, c=2, n=5):
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=(c, n, n))
  p = np.triu(u, 1) + np.tril(1.0 - np.swapaxes(u, 1, 2), -1) + 0.5 * np.eye(n)
  x = rng.normal(size=(c, n))
  return p, x - np.log(np.exp(x).sum(-1, keepdims=True))


def _normalise(w):
  return w / w.sum(-1, keepdims=True)


def np_shadow(name, cfg, p, logp_sft, t_rounds):
  """Probability-space loops over rounds, written from the update rules."""
  sft = np.exp(logp_sft)
  wr = lambda pi: np.einsum("cij,cj->ci", p, pi)
  out, pi = [sft], sft.copy()
  aux, m = sft.copy(), np.zeros_like(sft)
  for _ in range(t_rounds):
    if name.startswith("onpo"):
      eta = cfg.onpo.eta
      r = wr(_normalise(aux * np.exp(eta * m)))
      aux = _normalise(aux * np.exp(eta * r))
      pi, m = _normalise(aux * np.exp(eta * r)), r
    elif name == "omd":
      pi = _normalise(pi * np.exp(wr(pi) / cfg.omd.eta_inpo))
    elif name == "inpo":
      k = cfg.inpo.tau / cfg.inpo.eta_inpo
      pi = _normalise(np.exp(wr(pi) / cfg.inpo.eta_inpo) * sft ** k * pi ** (1 - k))
    else:
      pi = _normalise(sft * np.exp(wr(pi) / cfg.online_ipo.beta))
    out.append(pi)
  return np.log(np.stack(out))


# After T_SHORT = 6 rounds: float64 iterates differ from the probability-space
# loops by round-off compounded over 6 steps of a map with Lipschitz constant
# ≤ 1 + η: 1e-11. float32: per-step round-off ≈ 1e-7 of logits of size ≲ 10,
# compounded the same way: 2e-5.
ATOL64, ATOL32 = 1e-11, 2e-5


@pytest.mark.parametrize("x64, use_jit", [(x, j) for x in (True, False) for j in (True, False)])
def test_shadow_matches_numpy(x64, use_jit):
  p, sft = _game()
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    p_in, sft_in = jnp.asarray(p, dtype), jnp.asarray(sft, dtype)
    for name in shadow.SHADOW_METHODS:
      run = lambda pp, ss, name=name: shadow.shadow_iterates(name, CFG, pp, ss, T_SHORT)
      if use_jit:
        got = jax.jit(run)(p_in, sft_in)
      else:
        with jax.disable_jit():
          got = run(p_in, sft_in)
      assert got.shape == (T_SHORT + 1,) + p.shape[:2] and got.dtype == dtype
      want = np_shadow(name, CFG, np.asarray(p_in, np.float64), np.asarray(sft_in, np.float64),
                       T_SHORT)
      np.testing.assert_allclose(got, want, atol=ATOL64 if x64 else ATOL32, rtol=0,
                                 err_msg=name)


def test_both_onpo_variants_have_one_shadow_and_it_is_the_exact_regression_chain():
  p, sft = _game(1)
  with jax.enable_x64(True):
    p, sft = jnp.asarray(p), jnp.asarray(sft)
    two = shadow.shadow_iterates("onpo_two_step", CFG, p, sft, 3)
    np.testing.assert_array_equal(two, shadow.shadow_iterates("onpo_extrapolate", CFG, p, sft, 3))
    np.testing.assert_allclose(two[0], sft, atol=1e-15)
    # Round t of the neural exact mode, solved exactly: aux then policy regression
    # on the data of π_t (exact.regression_solution) gives the shadow's π_{t+1}.
    aux, lp = sft, sft
    for t in range(3):
      data = exact.exact_data("onpo_two_step", CFG, lp, p)
      aux_next = exact.regression_solution("onpo_two_step", CFG, {"aux": aux}, data)
      lp = exact.regression_solution("onpo_two_step", CFG, {"aux": aux_next}, data)
      np.testing.assert_allclose(lp, two[t + 1], atol=1e-12, rtol=0)
      # `extrapolate`: logit π_{t+1} = 2·logit π'_{t+1} − logit π'_t is the same policy.
      np.testing.assert_allclose(jax.nn.log_softmax(2 * aux_next - aux, -1), lp, atol=1e-12,
                                 rtol=0)
      aux = aux_next
    for name, anchors in (("omd", lambda lp: {"prev": lp}),
                          ("inpo", lambda lp: {"prev": lp, "ref": sft}),
                          ("online_ipo", lambda lp: {"ref": sft})):
      its = shadow.shadow_iterates(name, CFG, p, sft, 2)
      for t in range(2):
        data = exact.exact_data(name, CFG, its[t], p)
        np.testing.assert_allclose(
            exact.regression_solution(name, CFG, anchors(its[t]), data), its[t + 1], atol=1e-12,
            rtol=0, err_msg=name)


def test_tracking_kl_and_gaps_match_numpy():
  p, sft = _game(2)
  its = shadow.shadow_iterates("omd", CFG, jnp.asarray(p, jnp.float32),
                               jnp.asarray(sft, jnp.float32), 4)
  its_np = np.asarray(its, np.float64)
  other = its_np[::-1].copy()
  kl = np.mean(np.sum(np.exp(its_np) * (its_np - other), -1), -1)  # [T]
  np.testing.assert_allclose(shadow.tracking_kl(its, jnp.asarray(other, jnp.float32)), kl,
                             atol=1e-6)
  np.testing.assert_allclose(shadow.tracking_kl(its, its), 0.0, atol=0)
  # Zero-probability neural entries contribute 0, not NaN.
  lp0 = jnp.log(jnp.asarray([[1.0, 0.0]]))
  np.testing.assert_allclose(shadow.tracking_kl(lp0, jnp.log(jnp.asarray([[0.5, 0.5]]))),
                             np.log(2.0), rtol=1e-6)
  gaps = shadow.iterate_gaps(jnp.asarray(p, jnp.float32), its)
  pis = np.exp(its_np)
  wr = lambda pi: np.einsum("cij,cj->ci", p, pi)
  gap = [np.mean(2 * wr(pi).max(-1) - 1) for pi in pis]
  avg = [np.mean(2 * wr(pis[:t + 1].mean(0)).max(-1) - 1) for t in range(len(pis))]
  # Gaps are win rates in [0, 1] from float32 tables: 1e-6.
  np.testing.assert_allclose(gaps["gap"], gap, atol=1e-6)
  np.testing.assert_allclose(gaps["avg_gap"], avg, atol=1e-6)
  m = shadow.shadow_metrics(jnp.asarray(p, jnp.float32), its, its[0])
  ev = evaluation.exact_metrics(jnp.asarray(p, jnp.float32), its[3], its[0])
  for k in ev:
    np.testing.assert_allclose(m[k][3], ev[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(m["avg_gap"], gaps["avg_gap"], rtol=1e-6)


def test_onpo_average_iterate_gap_decays_as_one_over_t():
  # A cyclic 3-action game with an interior Nash (no pure equilibrium), where
  # OMD's last iterate cycles: ONPO's average iterate should decay as 1/T
  # (docs/algorithm.md §2, Theorem 2), OMD's clearly more slowly.
  a = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]])
  p = jnp.asarray(a[None], jnp.float32)
  sft = jax.nn.log_softmax(jnp.asarray([[1.0, 0.0, -1.0]], jnp.float32))
  cfg = _cfg(eta=0.5, eta_omd=2.0)  # the same step size η = 0.5 for both
  t_rounds = 4000
  ts = np.arange(1, t_rounds + 2)
  slopes = {}
  for name in ("onpo_two_step", "omd"):
    gaps = shadow.iterate_gaps(p, shadow.shadow_iterates(name, cfg, p, sft, t_rounds))
    slopes[name] = stats.loglog_slope(ts, np.asarray(gaps["avg_gap"], np.float64), t_min=10)
  print(f"log-log slopes of the average-iterate gap: {slopes}")
  # Measured: ONPO −1.03, OMD −0.66.
  assert -1.2 < slopes["onpo_two_step"] < -0.85
  assert slopes["omd"] > slopes["onpo_two_step"] + 0.2


def test_bad_inputs_raise_named_errors():
  p, sft = _game()
  p, sft = jnp.asarray(p, jnp.float32), jnp.asarray(sft, jnp.float32)
  with pytest.raises(ValueError, match="name must be one of"):
    shadow.shadow_iterates("sppo", CFG, p, sft, 2)
  with pytest.raises(ValueError, match="logp_sft must have shape"):
    shadow.shadow_iterates("omd", CFG, p, sft[:, :3], 2)
  with pytest.raises(ValueError, match="pref must have shape"):
    shadow.shadow_iterates("omd", CFG, p[0], sft, 2)
  with pytest.raises(ValueError, match="num_rounds"):
    shadow.shadow_iterates("omd", CFG, p, sft, -1)
  with pytest.raises(ValueError, match="tau < eta_inpo"):
    shadow.shadow_iterates("inpo", _cfg(tau=0.6), p, sft, 2)
  with pytest.raises(ValueError, match="positive step sizes"):
    shadow.shadow_iterates("onpo_two_step", _cfg(eta=0.0), p, sft, 2)
  with pytest.raises(ValueError, match="share a"):
    shadow.tracking_kl(sft, sft[:, :3])
  with pytest.raises(ValueError, match="logp_iterates must have shape"):
    shadow.iterate_gaps(p, sft)
