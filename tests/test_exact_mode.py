"""Exact mode (`onpo_jax.testbed.exact`): exact expected losses, their minimisers, the solver.

References are plain numpy loops over (prompt, y, y') written from the formulas
(λ_p pair probability π_t(y)·π_t(y')·P(y ≻ y'), uniform prompts), not from the
code under test.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import tolerances
from onpo_jax.onpo_step import onpo_anchor_params
from onpo_jax.onpo_step import onpo_begin_phase
from onpo_jax.onpo_step import onpo_end_phase
from onpo_jax.onpo_step import onpo_step
from onpo_jax.tabular import dynamics
from onpo_jax.testbed import env
from onpo_jax.testbed import evaluation
from onpo_jax.testbed import exact
from onpo_jax.testbed import exact_backend
from onpo_jax.testbed import solver

PAIR_METHODS = ("onpo_two_step", "omd", "inpo", "dpo", "online_ipo")


def _cfg():
  c = ml_collections.ConfigDict()
  c.onpo = {"eta": 2.0}
  c.omd = {"eta_inpo": 0.5}
  c.inpo = {"eta_inpo": 0.5, "tau": 0.5 / 3}
  c.dpo = {"beta": 0.5, "label_smoothing": 0.1}
  c.online_ipo = {"beta": 0.4}
  c.sppo = {"beta": 0.5}
  c.nash_md = {"alpha": 0.125, "beta": 0.05}
  return ml_collections.ConfigDict(c)


CFG = _cfg()


def _game(seed=0, c=2, n=6):
  """Random symmetric game (P + Pᵀ = 1) and five random log tables, float64 numpy."""
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=(c, n, n))
  p = np.triu(u, 1) + np.tril(1.0 - np.swapaxes(u, 1, 2), -1) + 0.5 * np.eye(n)
  tables = {}
  for k in ("policy", "aux", "prev", "ref", "mix"):
    x = rng.normal(size=(c, n))
    tables[k] = x - np.log(np.sum(np.exp(x), -1, keepdims=True))
  return p, tables


def _log_sigmoid(z):
  return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def np_exact_losses(cfg, p, t):
  """Brute-force expected losses: one loop over every (c, y, y') or (c, y)."""
  lp, aux, prev, ref, mix = (t[k] for k in ("policy", "aux", "prev", "ref", "mix"))
  c_n, n = lp.shape
  pi = np.exp(prev)
  num = dict.fromkeys(PAIR_METHODS + ("sppo", "nash_md"), 0.0)
  den_pair = den_sample = 0.0
  ratio = cfg.inpo.tau / cfg.inpo.eta_inpo
  eps = cfg.dpo.label_smoothing
  for c in range(c_n):
    for i in range(n):
      for j in range(n):
        w = pi[c, i] * pi[c, j] * p[c, i, j] / c_n
        den_pair += w
        pol = lp[c, i] - lp[c, j]
        d_aux, d_prev, d_ref = aux[c, i] - aux[c, j], prev[c, i] - prev[c, j], ref[c, i] - ref[c, j]
        num["onpo_two_step"] += w * (pol - d_aux - cfg.onpo.eta / 2) ** 2
        num["omd"] += w * (pol - d_prev - 1 / (2 * cfg.omd.eta_inpo)) ** 2
        num["inpo"] += w * (pol - ratio * d_ref - (1 - ratio) * d_prev
                            - 1 / (2 * cfg.inpo.eta_inpo)) ** 2
        num["online_ipo"] += w * (pol - d_ref - 1 / (2 * cfg.online_ipo.beta)) ** 2
        z = cfg.dpo.beta * (pol - d_ref)
        num["dpo"] += w * (-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
      win = sum(p[c, i, j] * pi[c, j] for j in range(n))
      win_mix = sum(p[c, i, j] * math.exp(mix[c, j]) for j in range(n))
      w = pi[c, i] / c_n
      den_sample += w
      num["sppo"] += w * (lp[c, i] - prev[c, i] - (win - 0.5) / cfg.sppo.beta) ** 2
      num["nash_md"] += w * (cfg.nash_md.beta * (lp[c, i] - ref[c, i]) - (win_mix - 0.5)) * lp[c, i]
  return {k: v / (den_sample if k in ("sppo", "nash_md") else den_pair) for k, v in num.items()}


def _all_exact_losses(p, t):
  out = {}
  anchors = {k: t[k] for k in ("aux", "prev", "ref")}
  for name in PAIR_METHODS + ("sppo", "nash_md"):
    data = exact.exact_data(name, CFG, t["prev"], p, logp_mix=t["mix"])
    out[name] = exact.exact_loss(name, CFG, t["policy"], anchors, data)[0]
  return out


@pytest.mark.parametrize("x64, use_jit", [(x, j) for x in (True, False) for j in (True, False)])
def test_exact_losses_match_brute_force(x64, use_jit):
  p, t = _game()
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    # The reference sees the same (possibly float32-rounded) inputs.
    p_in = np.asarray(jnp.asarray(p, dtype), np.float64)
    t_in = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in t.items()}
    fn = jax.jit(_all_exact_losses) if use_jit else _all_exact_losses
    ours = fn(jnp.asarray(p_in, dtype), {k: jnp.asarray(v, dtype) for k, v in t_in.items()})
    for v in ours.values():
      assert v.dtype == dtype
  ref = np_exact_losses(CFG, p_in, t_in)
  c, n = p.shape[:2]
  # Every per-example loss is bounded by scale = max(1, max|table|)² (targets ≤ 1.25,
  # β ≤ 0.5), and its roundings are relative to that scale; the weighted mean
  # accumulates C·n² terms. float32: (C·n² + 16)·eps ≈ 1e-5; float64: 1e-12.
  scale = max(1.0, max(np.abs(v).max() for v in t_in.values())) ** 2
  rtol = 1e-12 if x64 else (c * n * n + 16) * tolerances.F32_EPS
  for name in ref:
    tolerances.assert_close_rel(np.asarray(ours[name]), np.asarray(ref[name]), rtol=rtol,
                                scale=scale, what=f"{name} x64={x64} jit={use_jit}")


def test_pair_weights_and_targets_by_hand():
  # n = 2, P(0 ≻ 1) = 0.8, π_t = (1/4, 3/4), one prompt.
  pref = jnp.asarray([[[0.5, 0.8], [0.2, 0.5]]])
  logp = jnp.log(jnp.asarray([[0.25, 0.75]]))
  w = exact.exact_pair_weights(logp, pref)
  # (y, y') in (0,0), (0,1), (1,0), (1,1): π(y)π(y')P(y ≻ y').
  np.testing.assert_allclose(w, [0.03125, 0.15, 0.0375, 0.28125], rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(w), 0.5, rtol=1e-6)  # J(π, π) = 1/2
  pairs = exact.exact_pair_logps(jnp.asarray([[1.0, 2.0]]))
  np.testing.assert_array_equal(pairs.w, [1, 1, 2, 2])
  np.testing.assert_array_equal(pairs.l, [1, 2, 1, 2])
  win, ws = exact.exact_sppo_targets(logp, pref)
  np.testing.assert_allclose(win, [0.5 * 0.25 + 0.8 * 0.75, 0.2 * 0.25 + 0.5 * 0.75], rtol=1e-6)
  np.testing.assert_allclose(ws, [0.25, 0.75], rtol=1e-6)
  mix = jnp.log(jnp.asarray([[0.5, 0.5]]))
  target, wn = exact.exact_nash_md_targets(logp, mix, pref)
  np.testing.assert_allclose(target, [0.65, 0.35], rtol=1e-6)
  np.testing.assert_allclose(wn, [0.25, 0.75], rtol=1e-6)


def _tabular_next(name, p, tables):
  """The closed-form tabular step each regression must reproduce."""
  if name == "omd":
    return dynamics.omd_step(p, tables["prev"], 1.0 / CFG.omd.eta_inpo)
  return dynamics.inpo_step(p, tables["prev"], tables["ref"], CFG.inpo.tau, CFG.inpo.eta_inpo)


def _free_loss(theta, name, anchors, data):
  return exact.exact_loss(name, CFG, jax.nn.log_softmax(theta, axis=-1), anchors, data)[0]


_LOSS_OMD = lambda theta, anchors, data: _free_loss(theta, "omd", anchors, data)
_LOSS_INPO = lambda theta, anchors, data: _free_loss(theta, "inpo", anchors, data)
_LOSS_ONPO = lambda theta, aux, data: _free_loss(theta, "onpo_two_step", {"aux": aux}, data)

# Free tabular parameters (log π = log_softmax(θ)) reach the closed-form step:
# L-BFGS in float64 to ‖∇‖ ≤ 1e-12 leaves |log π − log π*| ~ 1e-11; the test
# asks 1e-6 (the stated accuracy of the exact mode), far below the O(η) size of
# one step and 1e-1 for a wrong target.
SOLVE_TOL = 1e-12
TABLE_ATOL = 1e-6


@pytest.mark.parametrize("name, loss_fn", [("omd", _LOSS_OMD), ("inpo", _LOSS_INPO)])
def test_free_tabular_minimiser_is_the_tabular_step(name, loss_fn):
  p, t = _game(1, c=2, n=5)
  with jax.enable_x64(True):
    p, t = jnp.asarray(p), {k: jnp.asarray(v) for k, v in t.items()}
    anchors = {"prev": t["prev"], "ref": t["ref"]}
    data = exact.exact_data(name, CFG, t["prev"], p)
    res = solver.solve_regression(loss_fn, t["prev"], anchors, data, tol=SOLVE_TOL,
                                 max_steps=500)
    print(f"{name}: {int(res.steps)} L-BFGS steps, grad norm {float(res.grad_norm):.2e}")
    assert bool(res.converged)
    lp = jax.nn.log_softmax(res.params, axis=-1)
    want = _tabular_next(name, p, t)
    np.testing.assert_allclose(lp, want, atol=TABLE_ATOL, rtol=0)
    np.testing.assert_allclose(exact.regression_solution(name, CFG, anchors, data), want,
                               atol=1e-12, rtol=0)
    residual = jax.jit(lambda lp: exact.regression_residual(name, CFG, lp, anchors, data))
    loss = jax.jit(lambda lp: exact.exact_loss(name, CFG, lp, anchors, data)[0])
    assert float(residual(lp)) < 1e-18
    # Away from the solution the residual is the loss excess (orthogonality).
    lp_off = t["policy"]
    np.testing.assert_allclose(residual(lp_off), loss(lp_off) - loss(want), rtol=1e-10)


@pytest.mark.parametrize("variant", ["two_step", "extrapolate"])
def test_onpo_rounds_through_onpo_step_track_tabular_onpo(variant):
  p, t = _game(2, c=2, n=5)
  eta = CFG.onpo.eta
  with jax.enable_x64(True):
    p = jnp.asarray(p)
    opt = onpo_step(optax.lbfgs(), variant=variant)
    theta = jnp.asarray(t["policy"])
    state = jax.jit(opt.init)(theta)
    logp_aux, reward_prev = jax.nn.log_softmax(theta, axis=-1), jnp.zeros_like(theta)
    phases = 2 if variant == "two_step" else 1
    name = f"onpo_{variant}"
    for _ in range(2):
      lp_t = jax.nn.log_softmax(theta, axis=-1)
      data = exact.exact_data(name, CFG, lp_t, p)
      steps = []
      for _ in range(phases):
        theta, state = onpo_begin_phase(opt, theta, state)
        aux = jax.nn.log_softmax(onpo_anchor_params(state), axis=-1)
        res = solver.solve_regression(_LOSS_ONPO, theta, aux, data, tol=SOLVE_TOL, max_steps=500,
                                     optimizer=opt, opt_state=state)
        assert bool(res.converged)
        steps.append(int(res.steps))
        assert float(exact.regression_residual(
            name, CFG, jax.nn.log_softmax(res.params, axis=-1), {"aux": aux}, data)) < 1e-18
        theta, state = onpo_end_phase(opt, res.params, res.opt_state)
      print(f"{variant}: L-BFGS steps per phase {steps}")
      logp_policy, logp_aux, r = dynamics.onpo_step(p, logp_aux, reward_prev, eta)
      np.testing.assert_allclose(lp_t, logp_policy, atol=TABLE_ATOL, rtol=0)
      reward_prev = r
      want_next = jax.nn.log_softmax(logp_aux + eta * r, axis=-1)  # π_{t+1}
      np.testing.assert_allclose(jax.nn.log_softmax(theta, axis=-1), want_next,
                                 atol=TABLE_ATOL, rtol=0)


def test_nash_md_exact_gradient_is_the_objective_gradient():
  p, t = _game(3, c=2, n=5)
  beta = CFG.nash_md.beta
  with jax.enable_x64(True):
    p = jnp.asarray(p)
    theta_t = jnp.asarray(t["policy"]) + 0.3
    lp_t = jax.nn.log_softmax(theta_t, axis=-1)
    ref, mix = jnp.asarray(t["ref"]), jnp.asarray(t["mix"])
    data = exact.exact_data("nash_md", CFG, lp_t, p, logp_mix=mix)

    def surrogate(theta):
      return exact.exact_loss("nash_md", CFG, jax.nn.log_softmax(theta, -1), {"ref": ref}, data)[0]

    def objective(theta):
      # β KL(π_θ‖π_ref) − P(π_θ ≻ π_mix), mean over prompts, mixture held fixed.
      lp = jax.nn.log_softmax(theta, -1)
      pi = jnp.exp(lp)
      kl = jnp.sum(pi * (lp - ref), -1)
      win = jnp.einsum("ci,cij,cj->c", pi, p, jnp.exp(mix))
      return jnp.mean(beta * kl - win)

    g_sur = jax.jit(jax.grad(surrogate))(theta_t)
    g_obj = jax.jit(jax.grad(objective))(theta_t)
    np.testing.assert_allclose(g_sur, g_obj, atol=1e-14, rtol=1e-10)
    # Central finite difference of the objective along a random direction.
    v = jnp.asarray(np.random.default_rng(0).normal(size=theta_t.shape))
    h = 1e-5
    fd = (objective(theta_t + h * v) - objective(theta_t - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(g_sur, v), fd, rtol=1e-7)


def _causal_token_logits(seed, c, v, length):
  """Token logits [C, V^L, L, V] that depend on the prompt and the prefix y_<t only."""
  rng = np.random.default_rng(seed)
  responses = env.enumerate_responses(v, length)
  table = rng.normal(size=(c, length, v ** length, v))  # indexed by (t, prefix code)
  out = np.zeros((c, len(responses), length, v))
  for i, y in enumerate(responses):
    for t in range(length):
      code = int(sum(int(y[s]) * v ** (t - 1 - s) for s in range(t)))
      out[:, i, t] = table[:, t, code]
  return out, responses


def _np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_mixture_table_matches_numpy_and_is_normalised():
  lg_pol, responses = _causal_token_logits(0, 2, 3, 3)
  lg_ref, _ = _causal_token_logits(1, 2, 3, 3)
  alpha = 0.3
  want = np.zeros(lg_pol.shape[:2])
  for c in range(lg_pol.shape[0]):
    for i, y in enumerate(responses):
      for t, tok in enumerate(y):
        mixed = _np_log_softmax((1 - alpha) * _np_log_softmax(lg_pol[c, i, t])
                                + alpha * _np_log_softmax(lg_ref[c, i, t]))
        want[c, i] += mixed[tok]
  with jax.enable_x64(True):
    got = exact.mixture_logp_table(jnp.asarray(lg_pol), jnp.asarray(lg_ref), responses, alpha)
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(jnp.sum(jnp.exp(got), -1), 1.0, atol=1e-12)
    pol = exact.sequence_logp_from_token_logits(jnp.asarray(lg_pol), responses)
    np.testing.assert_allclose(
        exact.mixture_logp_table(jnp.asarray(lg_pol), jnp.asarray(lg_ref), responses, 0.0), pol,
        atol=1e-12, rtol=0)


def test_token_logits_of_the_decoder_give_the_policy_table():
  v, length, c = 2, 2, 2
  cfg = env.model_config(v, 16, 32, 1, 2, 1, 8, 8)
  graphdef, params = env.init_policy(cfg, 0)
  responses = env.enumerate_responses(v, length)
  prompts, mask = env.make_prompts(jax.random.key(0), c, 2, v)
  logits = exact.token_logits_table(graphdef, params, prompts, mask, responses, chunk=2)
  assert logits.shape == (c, v ** length, length, v)
  table = evaluation.policy_table(graphdef, params, prompts, mask, responses)
  # Same forward pass, reduced in two ways: a few float32 roundings of log-probs ≲ 3.
  np.testing.assert_allclose(exact.sequence_logp_from_token_logits(logits, responses), table,
                             atol=1e-5, rtol=0)


_QUAD = lambda x, a: jnp.sum(jnp.square(x - a))


def test_solver_stops_at_tol_or_budget_and_compiles_once():
  a = jnp.asarray([1.0, -2.0, 3.0])
  res = solver.solve_regression(_QUAD, jnp.zeros(3), a, tol=1e-4, max_steps=50)
  assert bool(res.converged) and float(res.grad_norm) <= 1e-4
  np.testing.assert_allclose(res.params, a, atol=1e-4)
  size = solver._solve._cache_size()
  res2 = solver.solve_regression(_QUAD, jnp.zeros(3), 2 * a, tol=1e-4, max_steps=50)
  np.testing.assert_allclose(res2.params, 2 * a, atol=1e-4)
  assert solver._solve._cache_size() == size  # new data, same executable
  short = solver.solve_regression(_QUAD, jnp.zeros(3), a, tol=1e-4, max_steps=1,
                                 optimizer=optax.sgd(0.1))
  assert int(short.steps) == 1 and not bool(short.converged)
  np.testing.assert_allclose(short.params, 0.2 * a, rtol=1e-6)  # one SGD step
  assert np.isnan(short.residual)
  # The residual rule: SGD with rate 0.1 shrinks x − a by 0.8 per step, so the
  # residual |x − a|² = 14·0.64^k first drops below 0.1 at k = 12.
  res = solver.solve_regression(_QUAD, jnp.zeros(3), a, tol=1e-9, max_steps=100,
                               optimizer=optax.sgd(0.1), residual_fn=_QUAD, residual_tol=0.1)
  assert int(res.steps) == 12 and bool(res.converged)
  np.testing.assert_allclose(res.residual, 14.0 * 0.64 ** 12, rtol=1e-5)


def test_stall_rule_ends_a_solve_at_the_precision_floor():
  # SGD with rate 0.1 on c·|x − a|²: c = 1 converges; c = 10 jumps to the mirror
  # point x ↦ 2a − x, so the loss never falls. With stall_steps=3 that solve
  # ends after 3 steps, not converged; the converging one is not cut short.
  a = jnp.asarray([1.0, -2.0, 3.0])
  scaled = lambda x, a, c: c * _QUAD(x, a)
  sgd = optax.sgd(0.1)
  res = solver.solve_regression(scaled, jnp.zeros(3), a, 10.0, tol=1e-4, max_steps=50,
                                optimizer=sgd, stall_steps=3)
  assert int(res.steps) == 3 and not bool(res.converged)
  res = solver.solve_regression(scaled, jnp.zeros(3), a, 1.0, tol=1e-4, max_steps=200,
                                optimizer=sgd, stall_steps=3)
  assert bool(res.converged) and int(res.steps) > 3
  # Batched: each problem stalls on its own; the loop runs until the last one stops.
  batch = solver.solve_regression_batch(
      scaled, jnp.zeros((2, 3)), jnp.stack([a, a]), jnp.asarray([10.0, 1.0]), tol=1e-4,
      max_steps=200, optimizer=sgd, opt_state=sgd.init(jnp.zeros((2, 3))), stall_steps=3)
  assert np.asarray(batch.converged).tolist() == [False, True]
  assert int(batch.steps[0]) == 3 and int(batch.steps[1]) > 3
  with pytest.raises(ValueError, match="stall_steps"):
    solver.solve_regression(_QUAD, jnp.zeros(3), a, tol=1e-3, max_steps=5, stall_steps=0)


def test_gauss_newton_damping_floor_follows_the_parameters_dtype():
  # Steps that do better than the model predicts lower λ ÷3 each, down to the
  # floor of the parameters' precision (1e-12 float64, 1e-6 float32).
  assert solver.default_gauss_newton() is solver.default_gauss_newton()
  opt = solver.gauss_newton(damping=1e-2)
  for dtype, floor in (("float64", 1e-12), ("float32", 1e-6)):
    with jax.enable_x64(dtype == "float64"):
      fn = lambda x: x
      # Σ exp(−o): a Newton step decreases it by 1 − e⁻¹ of its value, the
      # model predicts ½: the ratio is 1.26 at every step, and it never reaches 0.
      out_loss = lambda o: jnp.sum(jnp.exp(-o))
      x = jnp.zeros(3, dtype)
      state = opt.init(x)
      for _ in range(40):
        up, state = opt.update(None, state, x, value=out_loss(x), output_fn=fn,
                               output_loss=out_loss)
        x = x + up
      assert state.damping.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(float(state.damping), floor, rtol=1e-6)
  with pytest.raises(ValueError, match="min_damping"):
    solver.gauss_newton(damping=1e-8)  # below float32's floor


def test_a_float64_policy_computes_in_float64():
  # Exact rounds in float64 need every matmul of the decoder in float64 (scores
  # and unembedding included), not a float32 product of float64 inputs.
  cfg32 = env.model_config(2, 16, 32, 1, 2, 1, 8, 8)
  graphdef32, params32 = env.init_policy(cfg32, 0)
  responses = env.enumerate_responses(2, 3)
  prompts, mask = env.make_prompts(jax.random.key(0), 2, 3, 2)
  with pytest.raises(ValueError, match="x64"):
    env.model_config(2, 16, 32, 1, 2, 1, 8, 8, dtype="float64")
  with jax.enable_x64(True):
    cfg64 = env.model_config(2, 16, 32, 1, 2, 1, 8, 8, dtype="float64")
    graphdef64, params64 = env.init_policy(cfg64, 0)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params64))
    t64 = evaluation.policy_table(graphdef64, params64, prompts, mask, responses)
    assert t64.dtype == jnp.float64
    # Each table is normalised to its own precision: float32 only to ~1e-7.
    np.testing.assert_allclose(jax.scipy.special.logsumexp(t64, axis=-1), 0.0, atol=1e-13)
  t32 = evaluation.policy_table(graphdef32, params32, prompts, mask, responses)
  # Same initial weights (drawn in float32, then cast): the tables agree to float32's rounding.
  np.testing.assert_allclose(t64, t32, atol=1e-5, rtol=0)


def test_bad_inputs_raise_named_errors():
  p, t = _game()
  p, prev = jnp.asarray(p, jnp.float32), jnp.asarray(t["prev"], jnp.float32)
  with pytest.raises(ValueError, match="pref must have shape"):
    exact.exact_pair_weights(prev, p[:, :3])
  with pytest.raises(ValueError, match="logp_prev must be a"):
    exact.exact_sppo_targets(prev[0], p)
  with pytest.raises(ValueError, match="logp_mix"):
    exact.exact_data("nash_md", CFG, prev, p)
  with pytest.raises(ValueError, match="name must be one of"):
    exact.exact_data("nope", CFG, prev, p)
  data = exact.exact_data("inpo", CFG, prev, p)
  with pytest.raises(ValueError, match="missing \\['ref'\\]"):
    exact.exact_loss("inpo", CFG, prev, {"prev": prev}, data)
  with pytest.raises(ValueError, match="data.weights"):
    exact.exact_loss("sppo", CFG, prev, {"prev": prev}, data)
  with pytest.raises(ValueError, match="name must be one of"):
    exact.regression_solution("dpo", CFG, {"ref": prev}, data)
  with pytest.raises(ValueError, match="alpha"):
    exact.mixture_logp_table(jnp.zeros((1, 4, 2, 2)), jnp.zeros((1, 4, 2, 2)),
                             env.enumerate_responses(2, 2), 1.5)
  with pytest.raises(ValueError, match="tol must be"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=0.0, max_steps=5)
  with pytest.raises(ValueError, match="max_steps"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=1e-3, max_steps=0)
  with pytest.raises(ValueError, match="residual_fn and residual_tol go together"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=1e-3, max_steps=5,
                           residual_fn=_QUAD)
  with pytest.raises(ValueError, match="residual_tol must be"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=1e-3, max_steps=5,
                           residual_fn=_QUAD, residual_tol=-1.0)


# Gauss–Newton in output space: a small over-parameterised nonlinear least squares
# with a known zero-residual solution (float64), then the decoder's table Jacobian.
_NLS_W = np.random.default_rng(7).normal(size=(4, 6)) / 2.0
_NLS_OUT = lambda p, w, target: jnp.tanh(w @ p)
_NLS_LOSS = lambda out, w, target: jnp.sum(jnp.square(out - target))
_NLS_JAC = lambda p, w, target: jax.jacrev(lambda q: jnp.tanh(w @ q))(p)


@pytest.mark.parametrize("with_jacobian", [False, True])
def test_gauss_newton_solves_a_nonlinear_least_squares_monotonically(with_jacobian):
  with jax.enable_x64(True):
    w = jnp.asarray(_NLS_W)
    target = jnp.tanh(w @ jnp.asarray([0.8, -0.5, 0.3, 0.9, -0.7, 0.2]))
    kw = {"output_fn": _NLS_OUT, "optimizer": solver.gauss_newton()}
    if with_jacobian:
      kw["output_jacobian"] = _NLS_JAC
    losses = [float(solver.solve_regression(_NLS_LOSS, jnp.zeros(6), w, target, tol=1e-300,
                                            max_steps=k, **kw).loss) for k in range(1, 9)]
    # Levenberg–Marquardt never accepts a step that raises the loss.
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    res = solver.solve_regression(_NLS_LOSS, jnp.zeros(6), w, target, tol=1e-12, max_steps=30,
                                  **kw)
    print(f"jacobian={with_jacobian}: {int(res.steps)} steps, loss {float(res.loss):.2e}")
    assert bool(res.converged) and float(res.loss) < 1e-20
    np.testing.assert_allclose(jnp.tanh(w @ res.params), target, atol=1e-10, rtol=0)
    # The residual rule sees the output, as the loss does.
    res = solver.solve_regression(_NLS_LOSS, jnp.zeros(6), w, target, tol=1e-300, max_steps=30,
                                  residual_fn=_NLS_LOSS, residual_tol=1e-6, **kw)
    assert bool(res.converged) and float(res.residual) <= 1e-6 < losses[0]


def _nls_grad_numpy(p, w, target):
  """∇ Σ (tanh(Wp) − t)² in numpy: Wᵀ[2 (tanh(Wp) − t) (1 − tanh²(Wp))]."""
  u = np.tanh(np.asarray(w) @ np.asarray(p))
  return np.asarray(w).T @ (2 * (u - np.asarray(target)) * (1 - u ** 2))


def _nls_loss_rounding(p, w, target):
  """A first-order bound on |Σ(u − t)² in jax − the same in numpy| from float64 rounding.

  Near the solution the residuals r = u − t are small differences of O(1)
  numbers, so each side's rounding of u = tanh(Wp) (an n-term dot, error up to
  n·ε·Σ_j |W_ij p_j| times tanh' ≤ 1, then a tanh within 4 ulps) moves the loss
  by up to 2·|r_i| times it per output, and the two sides round independently.
  """
  w, p = np.asarray(w), np.asarray(p)
  u = np.tanh(w @ p)
  eps = np.finfo(np.float64).eps
  per_side = eps * (w.shape[1] * (np.abs(w) @ np.abs(p)) + 4 * np.abs(u))
  return float(np.sum(2 * np.abs(u - np.asarray(target)) * 2 * per_side + (2 * per_side) ** 2))


def test_gauss_newton_reports_the_loss_and_the_gradient_norm_it_started_from():
  # The solver takes no gradient with gauss_newton: the loss it returns is the
  # one the optimizer evaluated at the accepted point, the gradient norm √(gᵀKg)
  # at the point the last step started from (the result of one step fewer).
  with jax.enable_x64(True):
    w = jnp.asarray(_NLS_W)
    target = jnp.tanh(w @ jnp.asarray([0.8, -0.5, 0.3, 0.9, -0.7, 0.2]))
    kw = {"output_fn": _NLS_OUT, "output_jacobian": _NLS_JAC,
          "optimizer": solver.gauss_newton(), "tol": 1e-300}
    start = jnp.zeros(6)
    runs = [solver.solve_regression(_NLS_LOSS, start, w, target, max_steps=k, **kw)
            for k in (1, 2, 3)]
    before = [start] + [r.params for r in runs[:-1]]
    for r, p0 in zip(runs, before):
      np.testing.assert_allclose(float(r.grad_norm),
                                 np.linalg.norm(_nls_grad_numpy(p0, w, target)), rtol=1e-12)
      u = np.tanh(np.asarray(w) @ np.asarray(r.params))
      # rtol alone would ask more of the cancelling residuals than float64 gives.
      np.testing.assert_allclose(float(r.loss), np.sum((u - np.asarray(target)) ** 2),
                                 rtol=1e-13, atol=_nls_loss_rounding(r.params, w, target))
    # Started at the solution, it still takes one step, for its report.
    at = solver.solve_regression(_NLS_LOSS, jnp.asarray([0.8, -0.5, 0.3, 0.9, -0.7, 0.2]), w,
                                 target, max_steps=5, residual_fn=_NLS_LOSS, residual_tol=1e-6,
                                 **kw)
    assert int(at.steps) == 1 and bool(at.converged) and float(at.grad_norm) < 1e-12


def test_table_jacobian_is_the_jacobian_of_the_policy_table():
  cfg = env.model_config(2, 16, 32, 1, 2, 1, 8, 8)
  graphdef, params = env.init_policy(cfg, 3)
  responses = env.enumerate_responses(2, 3)
  prompts, mask = env.make_prompts(jax.random.key(2), 2, 3, 2)
  got = jax.jit(lambda p: exact_backend.table_jacobian(graphdef, p, prompts, mask, responses))(
      params)
  want = jax.jacrev(lambda p: evaluation.policy_table(graphdef, p, prompts, mask, responses))(
      params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == (2 * 8,) + w.shape[2:]
    tolerances.assert_close_rel(g, w.reshape(g.shape), rtol=tolerances.DECODER_GRAD_RTOL)


def test_gauss_newton_and_bad_output_arguments_raise_named_errors():
  with pytest.raises(ValueError, match="min_damping <= damping"):
    solver.gauss_newton(0.0)
  with pytest.raises(ValueError, match="output_fn must be callable"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=1e-3, max_steps=5,
                            output_fn=1.0)
  with pytest.raises(ValueError, match="output_jacobian must be a callable given with output_fn"):
    solver.solve_regression(_QUAD, jnp.zeros(3), jnp.zeros(3), tol=1e-3, max_steps=5,
                            output_jacobian=_NLS_JAC)
  with pytest.raises(ValueError, match="one leading batch axis"):
    solver.solve_regression_batch(_QUAD, jnp.zeros((2, 3)), jnp.zeros((3, 3)), tol=1e-3,
                                  max_steps=5, optimizer=optax.sgd(0.1),
                                  opt_state=optax.sgd(0.1).init(jnp.zeros((2, 3))))


def test_batched_solve_equals_one_solve_per_problem():
  a = jnp.asarray([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]])
  opt = solver.gauss_newton()
  out = lambda x, target: x ** 3
  loss = lambda o, target: jnp.sum(jnp.square(o - target))
  batch = solver.solve_regression_batch(loss, jnp.ones((2, 3)), a, tol=1e-5, max_steps=40,
                                        optimizer=opt, opt_state=opt.init(jnp.ones(3)),
                                        output_fn=out)
  for i in range(2):
    one = solver.solve_regression(loss, jnp.ones(3), a[i], tol=1e-5, max_steps=40, optimizer=opt,
                                  output_fn=out)
    assert int(batch.steps[i]) == int(one.steps) and bool(batch.converged[i])
    np.testing.assert_allclose(batch.params[i], one.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(batch.params ** 3, a, atol=1e-5)
  assert jnp.shape(batch.opt_state.damping) == ()  # a shared scalar comes back as one


def test_a_step_into_nan_is_undone_and_ends_the_solve():
  # log(x) is NaN for x < 0: SGD with a large rate steps there at once.
  loss = lambda x: jnp.sum(jnp.square(jnp.log(x)))
  res = solver.solve_regression(loss, jnp.full(2, 2.0), tol=1e-9, max_steps=10,
                                optimizer=optax.sgd(10.0))
  assert int(res.steps) == 1 and not bool(res.converged)
  np.testing.assert_array_equal(res.params, jnp.full(2, 2.0))
  assert np.isfinite(float(res.loss))
