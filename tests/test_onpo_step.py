"""Tests for the `onpo_step` optax transform: tabular ONPO rounds, compilation,
sharding, abstract init and orbax round-trips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from onpo_jax import losses
from onpo_jax.onpo_step import (OnpoEvent, OnpoStepState, onpo_anchor_params,
                                onpo_begin_phase, onpo_end_phase, onpo_step)
import numpy_refs as ref

PROMPTS, Y = 2, 3
ETA = 0.9
STEPS_PER_PHASE = 25
OFF_DIAG = np.nonzero(~np.eye(Y, dtype=bool)[None].repeat(PROMPTS, 0))


def _pair_weights(pi_t, pmat):
  """Exact λ_p expectation: ordered pair (i, j) weighted by π_t(i)π_t(j)P(i ≻ j)."""
  p, i, j = OFF_DIAG
  return pi_t[p, i] * pi_t[p, j] * pmat[p, i, j]


def _pair_logps(logits):
  p, i, j = OFF_DIAG
  logp = jax.nn.log_softmax(logits, -1)
  return logp[p, i], logp[p, j]


def _onpo_value(params, anchor_w, anchor_l, weights):
  pw, pl = _pair_logps(params["logits"])
  return losses.onpo_loss(pw, pl, anchor_w, anchor_l, eta=ETA, weights=weights)[0]


def _make_fns(opt):
  @jax.jit
  def train_step(params, state, anchor_w, anchor_l, weights):
    value_fn = functools.partial(_onpo_value, anchor_w=anchor_w, anchor_l=anchor_l,
                                 weights=weights)
    value, grad = jax.value_and_grad(value_fn)(params)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  begin = jax.jit(functools.partial(onpo_begin_phase, opt))
  end = jax.jit(functools.partial(onpo_end_phase, opt))
  return train_step, begin, end


def _regress(fns, params, state, weights):
  train_step, begin, end = fns
  params, state = begin(params, state)
  # Anchor log-probs are computed once per regression, as in the LLM loop.
  anchor_w, anchor_l = _pair_logps(onpo_anchor_params(state)["logits"])
  for _ in range(STEPS_PER_PHASE):
    params, state = train_step(params, state, anchor_w, anchor_l, weights)
  return end(params, state)


@pytest.mark.parametrize("init_from", ["anchor", "policy"])
@pytest.mark.parametrize("variant", ["two_step", "extrapolate"])
def test_tabular_rounds_match_closed_form_without_recompiling(variant, init_from):
  rounds = 3
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    pmat = ref.random_preference(rng, PROMPTS, Y)
    pi_1 = ref.normalize(rng.uniform(0.3, 1.0, size=(PROMPTS, Y)))
    params = {"logits": jnp.log(jnp.asarray(pi_1))}
    # LBFGS solves each (quadratic) regression to rounding error in a few steps.
    opt = onpo_step(optax.lbfgs(), variant=variant, init_from=init_from)
    state = opt.init(params)
    fns = _make_fns(opt)
    want_aux, want_pi = pi_1, pi_1
    for t in range(rounds):
      pi_t = np.asarray(jax.nn.softmax(params["logits"], -1))
      weights = jnp.asarray(_pair_weights(pi_t, pmat))
      params, state = _regress(fns, params, state, weights)
      if variant == "two_step":
        params, state = _regress(fns, params, state, weights)
      want_aux, want_pi = ref.onpo_tabular_round(want_aux, want_pi, pmat, ETA)
      got_pi = np.asarray(jax.nn.softmax(params["logits"], -1))
      got_aux = np.asarray(jax.nn.softmax(onpo_anchor_params(state)["logits"], -1))
      np.testing.assert_allclose(got_pi, want_pi, atol=1e-5, err_msg=f"π after round {t + 1}")
      np.testing.assert_allclose(got_aux, want_aux, atol=1e-5, err_msg=f"π' after round {t + 1}")
      assert int(state.round) == t + 1 and int(state.phase) == 0
      if t == 0:
        sizes = [f._cache_size() for f in fns]
    # Rounds 2.. reuse round 1's executables: no recompilation.
    assert [f._cache_size() for f in fns] == sizes == [1, 1, 1]
    assert params["logits"].dtype == jnp.float64
    assert state.aux_params["logits"].dtype == jnp.float64
    # ONPO differs from OMD here: a broken transform that ignored π' would fail above.
    assert np.max(np.abs(want_pi - want_aux)) > 1e-2


def test_transitions_move_params_exactly_as_documented():
  with jax.enable_x64(True):
    p0 = {"w": jnp.array([1.0, -2.0, 0.5])}
    g = {"w": jnp.array([1.0, 1.0, 1.0])}
    for variant, init_from in [("two_step", "anchor"), ("two_step", "policy"),
                               ("extrapolate", "anchor")]:
      opt = onpo_step(optax.sgd(0.5), variant=variant, init_from=init_from)
      state = opt.init(p0)
      params = {"w": p0["w"] + 3.0}  # the sampled π_t differs from π'_t = p0
      params, state = onpo_begin_phase(opt, params, state)
      want_start = p0["w"] if init_from == "anchor" else p0["w"] + 3.0
      np.testing.assert_array_equal(params["w"], want_start)
      u, state = opt.update(g, state, params)
      params = optax.apply_updates(params, u)
      fitted = want_start - 0.5
      np.testing.assert_array_equal(params["w"], fitted)
      assert int(state.step) == 1
      params, state = onpo_end_phase(opt, params, state)
      if variant == "extrapolate":
        np.testing.assert_allclose(params["w"], 2 * fitted - p0["w"], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(state.aux_params["w"], fitted)
        assert int(state.round) == 1
        continue
      np.testing.assert_array_equal(state.aux_params["w"], fitted)
      assert int(state.phase) == 1 and int(state.round) == 0
      params, state = onpo_begin_phase(opt, params, state)
      want_policy_start = fitted if init_from == "anchor" else p0["w"] + 3.0
      np.testing.assert_array_equal(params["w"], want_policy_start)
      assert int(state.step) == 0
      params, state = onpo_end_phase(opt, params, state)
      assert int(state.phase) == 0 and int(state.round) == 1


@pytest.mark.parametrize("reset", [True, False])
def test_begin_resets_inner_state_only_when_asked(reset):
  params = {"w": jnp.array([1.0, 2.0])}
  opt = onpo_step(optax.adam(0.1), reset_inner_state=reset)
  state = opt.init(params)
  params, state = onpo_begin_phase(opt, params, state)
  for _ in range(2):
    u, state = opt.update({"w": jnp.ones(2)}, state, params)
    params = optax.apply_updates(params, u)
  params, state = onpo_end_phase(opt, params, state)
  _, state = onpo_begin_phase(opt, params, state)
  assert int(state.inner_state[0].count) == (0 if reset else 2)
  assert float(jnp.abs(state.inner_state[0].mu["w"]).sum()) == (0.0 if reset else pytest.approx(0.38))


def _sharded_params():
  """Params created already sharded by a jitted initialiser, so their
  shardings are in the normalised form that jitted steps return."""
  mesh = jax.make_mesh((8,), ("data",))
  shardings = {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P(None))}
  make = lambda: {"w": jnp.arange(32.0).reshape(8, 4) / 10, "b": jnp.ones(4)}
  return jax.jit(make, out_shardings=shardings)()


def _signature(tree):
  return jax.tree.structure(tree), [
      (type(x), jax.typeof(x), x.sharding) for x in jax.tree.leaves(tree)]


def test_state_types_and_shardings_stable_and_one_compile_for_all_events():
  params = _sharded_params()
  opt = onpo_step(optax.adam(1e-2), variant="two_step", init_from="policy")
  state = jax.jit(opt.init)(params)
  assert isinstance(state, OnpoStepState)
  assert state.aux_params["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  init_sig = _signature(state)

  @jax.jit
  def train_step(params, state, event):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(jnp.sin(p["b"])))(params)
    updates, state = opt.update(grads, state, params, event=event)
    return optax.apply_updates(params, updates), state

  # One round of two_step, driven through a single jitted function: the event is
  # a traced argument, so every transition reuses the same executable.
  for event in [OnpoEvent.BEGIN, OnpoEvent.STEP, OnpoEvent.STEP, OnpoEvent.END,
                OnpoEvent.BEGIN, OnpoEvent.STEP, OnpoEvent.END]:
    params, state = train_step(params, state, jnp.int32(event))
    assert _signature(state) == init_sig
  assert train_step._cache_size() == 1
  assert int(state.round) == 1 and int(state.phase) == 0
  assert params["w"].sharding.is_equivalent_to(state.aux_params["w"].sharding, 2)
  assert state.inner_state[0].mu["w"].sharding.spec == state.aux_params["w"].sharding.spec


def test_init_on_abstract_params():
  params = _sharded_params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  for variant, init_from in [("two_step", "policy"), ("extrapolate", "anchor")]:
    opt = onpo_step(optax.adamw(1e-3), variant=variant, init_from=init_from)
    shapes = jax.eval_shape(opt.init, abstract)
    concrete = opt.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
    for s, c in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete)):
      assert (s.shape, s.dtype) == (c.shape, c.dtype)
    assert shapes.aux_params["w"].sharding.spec == params["w"].sharding.spec == P("data", None)


@pytest.mark.parametrize("init_from", ["anchor", "policy"])
def test_state_round_trips_through_orbax(tmp_path, init_from):
  params = _sharded_params()
  opt = onpo_step(optax.adam(1e-2), variant="two_step", init_from=init_from)
  state = jax.jit(opt.init)(params)
  grads = jax.tree.map(jnp.ones_like, params)
  params, state = onpo_begin_phase(opt, params, state)
  updates, state = opt.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  params, state = onpo_end_phase(opt, params, state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / "state", target)
  assert isinstance(restored, OnpoStepState)
  assert _signature(restored) == _signature(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(restored.phase) == 1 and int(restored.step) == 1


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="variant"):
    onpo_step(optax.sgd(0.1), variant="three_step")
  with pytest.raises(ValueError, match="init_from"):
    onpo_step(optax.sgd(0.1), init_from="ref")
  opt = onpo_step(optax.sgd(0.1))
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(params, state)
  with pytest.raises(ValueError, match="event"):
    opt.update(params, state, params, event=7)
