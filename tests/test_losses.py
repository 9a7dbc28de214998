"""Tests for onpo_jax.losses against tests/numpy_refs.py, finite differences and
the tabular closed forms of docs/algorithm.md §2 and docs/baselines.md §4."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax import losses
import numpy_refs as ref

# f64: same formula, different summation order: 1e-12 relative.
# f32: inputs O(1-10) give squared margins O(100); f32 eps 1.2e-7 times a few
# operations stays below 1e-5 relative.
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-6), jnp.float64: dict(rtol=1e-12, atol=1e-12)}
N = 6


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["f32", "f64"])
def dtype(request):
  with jax.enable_x64(request.param == jnp.float64):
    yield request.param


def _logps(seed, k, n=N):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=n) * 3.0 - 20.0 for _ in range(k)]


WEIGHTS = np.array([1.0, 0.0, 2.0, 0.5, 0.0, 1.0])

# name -> (jax fn, numpy ref, #logp inputs, kwargs, positional ref extras)
CASES = {
    "onpo": (losses.onpo_loss, ref.onpo_loss, 4, dict(eta=2.0), (2.0,)),
    "omd": (losses.omd_loss, ref.omd_loss, 4, dict(eta_inpo=0.2), (0.2,)),
    "inpo": (losses.inpo_loss, ref.inpo_loss, 6, dict(tau=0.1, eta_inpo=0.3), (0.1, 0.3)),
    "ipo": (losses.ipo_loss, ref.ipo_loss, 4, dict(beta=0.5), (0.5,)),
    "dpo": (losses.dpo_loss, ref.dpo_loss, 4, dict(beta=0.3, label_smoothing=0.1), (0.3, 0.1)),
    "sppo_pair": (losses.sppo_pair_loss, ref.sppo_pair_loss, 6, dict(beta=0.25), (0.25,)),
    "nash_md": (losses.nash_md_loss, ref.nash_md_loss, 3, dict(beta=0.1), (0.1,)),
}


def _inputs(name, seed=0):
  _, _, k, _, _ = CASES[name]
  xs = _logps(seed, k)
  rng = np.random.default_rng(seed + 100)
  if name == "sppo_pair":  # last two inputs are win rates in [0, 1]
    xs[4], xs[5] = rng.uniform(size=N), rng.uniform(size=N)
  if name == "nash_md":  # last input is a preference in [0, 1]
    xs[2] = rng.uniform(size=N)
  return xs


@pytest.mark.parametrize("use_weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_numpy(name, use_jit, use_weights, dtype):
  fn, ref_fn, _, kwargs, extras = CASES[name]
  xs = _inputs(name)
  weights = WEIGHTS if use_weights else None
  want = ref_fn(*xs, *extras, weights=weights)
  f = functools.partial(fn, **kwargs)
  if use_jit:
    f = jax.jit(f)
  loss, metrics = f(*[jnp.asarray(x, dtype) for x in xs],
                    weights=None if weights is None else jnp.asarray(weights, dtype))
  assert loss.dtype == dtype and loss.shape == ()
  np.testing.assert_allclose(float(loss), want, **TOL[dtype])
  assert float(metrics["loss"]) == float(loss)


@pytest.mark.parametrize("name", ["onpo", "inpo", "dpo", "sppo_pair", "omd", "ipo"])
def test_gradient_matches_central_differences(name):
  fn, _, k, kwargs, _ = CASES[name]
  with jax.enable_x64(True):
    xs = [jnp.asarray(x) for x in _inputs(name, seed=1)]
    w = jnp.asarray(WEIGHTS)
    n_policy = 2  # the first two inputs are the trained policy's log-probs
    loss_of = jax.jit(lambda *p: fn(*p, *xs[n_policy:], weights=w, **kwargs)[0])
    grads = jax.grad(loss_of, argnums=(0, 1))(*xs[:n_policy])
    h = 1e-5
    for arg in range(n_policy):
      for i in range(N):
        e = jnp.zeros(N).at[i].set(h)
        plus = [x + e if j == arg else x for j, x in enumerate(xs[:n_policy])]
        minus = [x - e if j == arg else x for j, x in enumerate(xs[:n_policy])]
        fd = (loss_of(*plus) - loss_of(*minus)) / (2 * h)
        # Central differences: truncation O(h²·f''') ~ 1e-10 for these smooth losses,
        # rounding ~ eps·|f|/h ~ 1e-9 with |f| <~ 100.
        np.testing.assert_allclose(float(grads[arg][i]), float(fd), rtol=1e-6, atol=1e-7)
    # Anchors are constants: stop_gradient, whatever the caller passes.
    anchor_grads = jax.grad(lambda *a: fn(*xs[:n_policy], *a, weights=w, **kwargs)[0],
                            argnums=tuple(range(k - n_policy)))(*xs[n_policy:])
    for g in anchor_grads:
      assert np.all(np.asarray(g) == 0.0)


def test_nash_md_gradient_is_reinforce():
  with jax.enable_x64(True):
    lp, lp_ref, pref = _inputs("nash_md", seed=2)
    g = jax.grad(lambda x: losses.nash_md_loss(x, jnp.asarray(lp_ref), jnp.asarray(pref),
                                               beta=0.1, weights=jnp.asarray(WEIGHTS))[0])(
                                                   jnp.asarray(lp))
    np.testing.assert_allclose(np.asarray(g), ref.nash_md_grad(lp, lp_ref, pref, 0.1, WEIGHTS),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,target", [("onpo", 1.0), ("ipo", 1.0), ("omd", 2.5)])
def test_swapping_pair_negates_margin(name, target, dtype):
  fn, ref_fn, _, kwargs, extras = CASES[name]
  pw, pl, aw, al = [jnp.asarray(x, dtype) for x in _inputs(name, seed=3)]
  loss, m = fn(pw, pl, aw, al, **kwargs)
  loss_s, m_s = fn(pl, pw, al, aw, **kwargs)
  np.testing.assert_allclose(float(m_s["margin"]), -float(m["margin"]), **TOL[dtype])
  assert float(m["target"]) == pytest.approx(target) == float(m_s["target"])
  # Swapped: (−g − t)² = (g + t)², i.e. the reference with target −t.
  g = (np.asarray(pw, np.float64) - pl) - (np.asarray(aw, np.float64) - al)
  np.testing.assert_allclose(float(loss_s), np.mean((g + target) ** 2), **TOL[dtype])
  np.testing.assert_allclose(float(m_s["accuracy"]), 1.0 - float(m["accuracy"]), **TOL[dtype])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_swap_relations(eps, dtype):
  pw, pl, rw, rl = [jnp.asarray(x, dtype) for x in _inputs("dpo", seed=4)]
  beta = 0.3
  f = lambda a, b, c, d: losses.dpo_loss(a, b, c, d, beta=beta, label_smoothing=eps)[0]
  z = beta * ((np.asarray(pw, np.float64) - pl) - (np.asarray(rw, np.float64) - rl))
  # log σ(z) − log σ(−z) = z, so loss(w,l) − loss(l,w) = −(1 − 2ε)·mean z, and
  # loss(w,l) + loss(l,w) = mean[−log σ(z) − log σ(−z)] whatever ε.
  np.testing.assert_allclose(float(f(pw, pl, rw, rl) - f(pl, pw, rl, rw)),
                             -(1 - 2 * eps) * z.mean(), **TOL[dtype])
  both = np.mean(np.logaddexp(0, -z) + np.logaddexp(0, z))
  np.testing.assert_allclose(float(f(pw, pl, rw, rl) + f(pl, pw, rl, rw)), both, **TOL[dtype])


def test_sppo_pair_symmetric_under_swap(dtype):
  xs = [jnp.asarray(x, dtype) for x in _inputs("sppo_pair", seed=5)]
  pw, pl, qw, ql, ww, wl = xs
  a, _ = losses.sppo_pair_loss(pw, pl, qw, ql, ww, wl, beta=0.25)
  b, _ = losses.sppo_pair_loss(pl, pw, ql, qw, wl, ww, beta=0.25)
  np.testing.assert_allclose(float(a), float(b), **TOL[dtype])


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("include_self", [True, False])
def test_sppo_win_rates_any_k(k, include_self, dtype):
  if k == 1 and not include_self:
    with pytest.raises(ValueError, match="K >= 2"):
      losses.sppo_win_rates(jnp.full((2, 1, 1), 0.5, dtype), include_self=False)
    return
  win = ref.random_preference(np.random.default_rng(k), 2, k)
  got = jax.jit(functools.partial(losses.sppo_win_rates, include_self=include_self))(
      jnp.asarray(win, dtype))
  assert got.shape == (2, k)
  np.testing.assert_allclose(np.asarray(got), ref.sppo_win_rates(win, include_self), **TOL[dtype])


def test_sppo_loss_over_all_samples_of_prompts(dtype):
  rng = np.random.default_rng(6)
  win = ref.random_preference(rng, 3, 4)
  lp, lp_prev = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  p_hat = ref.sppo_win_rates(win)
  loss, _ = losses.sppo_loss(jnp.asarray(lp, dtype), jnp.asarray(lp_prev, dtype),
                             losses.sppo_win_rates(jnp.asarray(win, dtype)), beta=0.5)
  want = np.mean(((lp - lp_prev) - (p_hat - 0.5) / 0.5) ** 2)
  np.testing.assert_allclose(float(loss), want, **TOL[dtype])


@pytest.mark.parametrize("name", list(CASES))
def test_padded_pairs_contribute_nothing(name):
  fn, _, _, kwargs, _ = CASES[name]
  xs = _inputs(name, seed=7)
  keep = np.array([True, False, True, True, False, True])
  # Padded pairs hold garbage, even inf/NaN: neither loss nor gradient may see it.
  padded = [np.where(keep, x, np.nan if i % 2 else np.inf) for i, x in enumerate(xs)]
  w = keep.astype(np.float32)
  f = lambda p0, *rest: fn(p0, *rest, weights=jnp.asarray(w), **kwargs)[0]
  loss_pad, g_pad = jax.jit(jax.value_and_grad(f))(*[jnp.asarray(x, jnp.float32) for x in padded])
  loss_ref, g_ref = jax.value_and_grad(lambda p0, *rest: fn(p0, *rest, **kwargs)[0])(
      *[jnp.asarray(x[keep], jnp.float32) for x in xs])
  np.testing.assert_allclose(float(loss_pad), float(loss_ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_pad)[keep], np.asarray(g_ref), rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(g_pad)[~keep] == 0.0)
  # Every pair padded (a tournament that kept none): loss 0, finite zero gradient.
  loss0, g0 = jax.value_and_grad(lambda p0, *rest: fn(
      p0, *rest, weights=jnp.zeros(N), **kwargs)[0])(*[jnp.asarray(x, jnp.float32) for x in padded])
  assert float(loss0) == 0.0 and np.all(np.asarray(g0) == 0.0)


def test_bad_inputs_raise_clear_errors():
  x = jnp.zeros(N)
  with pytest.raises(ValueError, match="eta"):
    losses.onpo_loss(x, x, x, x, eta=0.0)
  with pytest.raises(ValueError, match="tau"):
    losses.inpo_loss(x, x, x, x, x, x, tau=0.3, eta_inpo=0.3)
  with pytest.raises(ValueError, match="tau"):
    losses.inpo_loss(x, x, x, x, x, x, tau=-0.1, eta_inpo=0.3)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
  with pytest.raises(ValueError, match="beta"):
    losses.ipo_loss(x, x, x, x, beta=-1.0)
  with pytest.raises(ValueError, match="beta"):
    losses.sppo_pair_loss(x, x, x, x, x, x, beta=0.0)
  with pytest.raises(ValueError, match="logp_aux_l must have shape"):
    losses.onpo_loss(x, x, x, jnp.zeros(N + 1), eta=1.0)
  with pytest.raises(ValueError, match="weights must have shape"):
    losses.onpo_loss(x, x, x, x, eta=1.0, weights=jnp.ones(N + 1))
  with pytest.raises(ValueError, match="weights must be >= 0"):
    losses.onpo_loss(x, x, x, x, eta=1.0, weights=-jnp.ones(N))
  with pytest.raises(ValueError, match="floating"):
    losses.onpo_loss(x.astype(jnp.int32), x, x, x, eta=1.0)
  with pytest.raises(ValueError, match="win_matrix"):
    losses.sppo_win_rates(jnp.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------
# Tabular equivalence: the regressions' minimisers are the closed-form steps.

PROMPTS, Y = 2, 4


def _tabular_setup(seed):
  rng = np.random.default_rng(seed)
  pmat = ref.random_preference(rng, PROMPTS, Y)
  dists = [ref.normalize(rng.uniform(0.2, 1.0, size=(PROMPTS, Y))) for _ in range(3)]
  return pmat, dists


def _all_pairs(pi_data, pmat):
  """Every ordered pair (y_w=i, y_l=j), i ≠ j, weighted by π_t(i)π_t(j)P(i ≻ j):
  the exact λ_p expectation over pairs sampled from π_t."""
  p_idx, i_idx, j_idx = np.nonzero(~np.eye(Y, dtype=bool)[None].repeat(PROMPTS, 0))
  w = pi_data[p_idx, i_idx] * pi_data[p_idx, j_idx] * pmat[p_idx, i_idx, j_idx]
  return (p_idx, i_idx, j_idx), w


def _minimise(loss_of_logits, theta0, *consts):
  """Newton steps with a pseudo-inverse: the loss is quadratic in the logits (the
  log-partition cancels in pair differences) with a flat direction per prompt
  (adding a constant), so two steps reach the minimum to rounding error."""
  theta = jnp.asarray(theta0).reshape(-1)
  f = lambda t, *c: loss_of_logits(t.reshape(PROMPTS, Y), *c)
  grad_f, hess_f = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
  for _ in range(2):
    g, hess = grad_f(theta, *consts), hess_f(theta, *consts)
    theta = theta - jnp.asarray(np.linalg.pinv(np.asarray(hess), rcond=1e-10) @ np.asarray(g))
  assert float(jnp.max(jnp.abs(grad_f(theta, *consts)))) < 1e-10
  return theta.reshape(PROMPTS, Y)


def _pair_logps(logp, idx):
  p_idx, i_idx, j_idx = idx
  return logp[p_idx, i_idx], logp[p_idx, j_idx]


def test_tabular_onpo_regressions_reproduce_closed_form():
  with jax.enable_x64(True):
    pmat, (pi_aux, pi_t, _) = _tabular_setup(8)
    eta = 0.7
    idx, w = _all_pairs(pi_t, pmat)

    def loss(theta, aw, al):
      pw, pl = _pair_logps(jax.nn.log_softmax(theta, -1), idx)
      return losses.onpo_loss(pw, pl, aw, al, eta=eta, weights=jnp.asarray(w))[0]

    def fit(anchor_logp):
      return jax.nn.log_softmax(
          _minimise(loss, jnp.log(pi_t), *_pair_logps(anchor_logp, idx)), -1)

    logp_aux_next = fit(jnp.log(pi_aux))          # step c: anchor π'_t
    logp_pi_next = fit(logp_aux_next)             # step d: anchor π'_{t+1}, same data
    want_aux, want_pi = ref.onpo_tabular_round(pi_aux, pi_t, pmat, eta)
    np.testing.assert_allclose(np.exp(np.asarray(logp_aux_next)), want_aux, atol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(logp_pi_next)), want_pi, atol=1e-5)
    # The step really moved: a broken loss returning the anchor would fail above.
    assert np.max(np.abs(want_aux - pi_aux)) > 1e-2


@pytest.mark.parametrize("tau_frac", [0.0, 1 / 3])
def test_tabular_inpo_regression_reproduces_closed_form(tau_frac):
  with jax.enable_x64(True):
    pmat, (pi_ref, pi_t, _) = _tabular_setup(9)
    eta_inpo = 0.8
    tau = tau_frac * eta_inpo
    idx, w = _all_pairs(pi_t, pmat)
    rw, rl = _pair_logps(jnp.log(pi_ref), idx)
    qw, ql = _pair_logps(jnp.log(pi_t), idx)

    def loss(theta):
      pw, pl = _pair_logps(jax.nn.log_softmax(theta, -1), idx)
      if tau == 0.0:  # INPO without KL is the OMD loss
        return losses.omd_loss(pw, pl, qw, ql, eta_inpo=eta_inpo, weights=jnp.asarray(w))[0]
      return losses.inpo_loss(pw, pl, rw, rl, qw, ql, tau=tau, eta_inpo=eta_inpo,
                              weights=jnp.asarray(w))[0]

    got = jax.nn.softmax(_minimise(loss, jnp.log(pi_t)), -1)
    want = ref.inpo_tabular_step(pi_t, pi_ref, pmat, tau, eta_inpo)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.max(np.abs(want - pi_t)) > 1e-2
