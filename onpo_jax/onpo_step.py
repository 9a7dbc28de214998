"""ONPO's optimistic state as a functional optax transform.

ONPO (arXiv 2502.16852, Algorithm 1; docs/algorithm.md §3) keeps two policies across
rounds: the played policy π (sampled from, and the output) and the auxiliary,
"lagging" policy π' (the regression anchor). `onpo_step(inner, ...)` wraps any
optax optimizer: the trained parameters are π_θ, and the transform's state holds
π' plus the round/phase counters, so one optimizer state is everything a resume
needs besides the parameters themselves.

API
---
    opt = onpo_step(optax.adam(lr), variant='two_step', init_from='anchor')
    state = opt.init(params)                     # π'_1 = π_1 = params (SFT)
    updates, state = opt.update(grads, state, params, event=OnpoEvent.STEP, **extra)
    params, state = onpo_begin_phase(opt, params, state)
    params, state = onpo_end_phase(opt, params, state)
    anchor = onpo_anchor_params(state)           # params of the current regression's anchor

`event` is an `OnpoEvent`/int or a traced int32 scalar. STEP is one
inner-optimizer step on `grads` (other extra args, e.g. LBFGS's `value`, `grad`,
`value_fn`, go to the inner optimizer). BEGIN and END are phase transitions: they
ignore `grads` and return updates `target − params` that move the parameters to
where the next regression starts (as `optax.lookahead` does for its
synchronisation; exact up to one rounding in the parameter dtype, so keep f32
master weights). Which transition happens depends on the phase stored in the
state and is chosen with `lax.cond` inside jit, never by Python branching on
traced values, so one executable serves every round. A concrete event picks its
branch at trace time; a traced event goes through `lax.switch`, which traces all
three branches, so it then needs the inner optimizer's extra args for
transitions too. `onpo_begin_phase` / `onpo_end_phase` are concrete-event calls
with zero grads; jit them with `opt` closed over. Create the state with
`jax.jit(opt.init)` (or with `out_shardings` from `jax.eval_shape(opt.init, ...)`)
so the first step does not compile twice; weak types in the inner state are
dropped for the same reason.

Call sequence of one round t
----------------------------
`variant='two_step'` (Algorithm 1: two regressions on the same data D_t):
  1. sample responses from params (= π_t); build pairs D_t with the oracle.
  2. onpo_begin_phase   -> params := start of the auxiliary regression.
  3. anchor log-probs from onpo_anchor_params(state) (= π'_t), once.
  4. STEP updates on the ONPO loss (`losses.onpo_loss`)       -> params ≈ π'_{t+1}.
  5. onpo_end_phase     -> π' := params (π'_{t+1}); phase := policy.
  6. onpo_begin_phase   -> params := start of the policy regression.
  7. anchor log-probs from onpo_anchor_params(state) (= π'_{t+1}), once.
  8. STEP updates on the ONPO loss, same D_t                  -> params ≈ π_{t+1}.
  9. onpo_end_phase     -> phase := auxiliary, round += 1. params = π_{t+1}.
`variant='extrapolate'` (one regression; exact for tabular softmax logits, where
logit π_{t+1} = 2·logit π'_{t+1} − logit π'_t; an approximation for networks):
  1-4 as above (regression against π'_t gives params ≈ π'_{t+1});
  5. onpo_end_phase     -> params := 2·params − π'_t; π' := π'_{t+1}; round += 1.

Initialisation of each regression (`init_from`, docs/algorithm.md §3.6)
-----------------------------------------------------------------------
Not stated in the paper; 'anchor' is our default.
- 'anchor' (default): every regression starts at its anchor: the auxiliary step
  at π'_t, the policy step at π'_{t+1} (already the parameters after step 4, so
  free). Each regression starts at g = 0 (loss η²/4), and a regression stopped
  early stays close to its anchor, as the mirror-descent proximal term intends.
  It needs no extra copy of the parameters.
- 'policy': every regression starts at the current policy π_t (as INPO does,
  whose anchor is π_t). For `two_step` the state then keeps a snapshot of π_t
  (one more parameter copy) to restart the policy step from it.
For a tabular softmax policy both reach the same minimiser (tests check this);
for networks only the optimisation path, hence the solution reached, differs.

The inner optimizer state is reset at each BEGIN (`reset_inner_state=True`):
each regression is a separate problem, and Adam moments of the previous one
point at a different target.
"""

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

VARIANTS = ("two_step", "extrapolate")
INIT_FROM = ("anchor", "policy")
AUX_PHASE = 0
POLICY_PHASE = 1


class OnpoEvent(enum.IntEnum):
  """What `update` does: a gradient step or a phase transition."""
  STEP = 0
  BEGIN = 1
  END = 2


class OnpoStepState(NamedTuple):
  """State of `onpo_step`.

  Attributes:
    inner_state: state of the wrapped optimizer.
    aux_params: π', the anchor of the current regression (π'_t in the
      auxiliary phase, π'_{t+1} in the policy phase), shaped like the params.
    policy_snapshot: π_t, saved at the auxiliary BEGIN; only for
      `two_step` with `init_from='policy'`, otherwise `optax.EmptyState()`.
    round: int32, number of completed rounds (t − 1 during round t).
    phase: int32, AUX_PHASE (0) or POLICY_PHASE (1).
    step: int32, gradient steps taken since the last BEGIN.
  """
  inner_state: Any
  aux_params: Any
  policy_snapshot: Any
  round: jax.Array
  phase: jax.Array
  step: jax.Array


def _select(pred, on_true, on_false):
  """Tree select that runs only one side (lax.cond), unlike a tree of jnp.where."""
  return jax.lax.cond(pred, lambda: on_true, lambda: on_false)


def _strong(tree):
  """Drops weak types (e.g. Python-scalar fields of optax.lbfgs's state).

  A state leaf that is weakly typed after `init` but strongly typed after an
  update has a different abstract value, so the train step would compile twice.
  """
  return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)


def _tree_sub(a, b):
  return jax.tree.map(lambda x, y: x - y, a, b)


def onpo_step(inner: optax.GradientTransformation, *, variant: str = "two_step",
              init_from: str = "anchor",
              reset_inner_state: bool = True) -> optax.GradientTransformationExtraArgs:
  """ONPO's optimistic two-sequence update around an inner optimizer.

  See the module docstring for the call sequence of a round.

  Args:
    inner: optimizer that minimises each regression (e.g. `optax.adamw`).
    variant: 'two_step' (Algorithm 1: auxiliary then policy regression) or
      'extrapolate' (policy := 2·π'_{t+1} − π'_t in parameter space).
    init_from: 'anchor' (default) or 'policy': where each regression starts.
    reset_inner_state: re-initialise the inner state at every BEGIN.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update takes the extra
    keyword `event` (an `OnpoEvent` or int32 scalar, default STEP) and passes
    other extra args to `inner`.

  Raises:
    ValueError: unknown `variant` or `init_from`.
  """
  if variant not in VARIANTS:
    raise ValueError(f"onpo_step: variant must be one of {VARIANTS}, got {variant!r}")
  if init_from not in INIT_FROM:
    raise ValueError(f"onpo_step: init_from must be one of {INIT_FROM}, got {init_from!r}")
  inner = optax.with_extra_args_support(inner)
  keep_snapshot = variant == "two_step" and init_from == "policy"

  def init_fn(params):
    # Own buffers: params and state may be donated to the train step separately.
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return OnpoStepState(
        inner_state=_strong(inner.init(params)),
        aux_params=copy(params),
        policy_snapshot=copy(params) if keep_snapshot else optax.EmptyState(),
        round=jnp.zeros([], jnp.int32),
        phase=jnp.full([], AUX_PHASE, jnp.int32),
        step=jnp.zeros([], jnp.int32))

  def step_branch(grads, state, params, extra):
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
    return updates, state._replace(inner_state=_strong(inner_state), step=state.step + 1)

  def begin_branch(grads, state, params, extra):
    del grads, extra
    is_aux = state.phase == AUX_PHASE
    snapshot = state.policy_snapshot
    if init_from == "anchor":
      target = state.aux_params
    elif variant == "extrapolate":
      target = params
    else:  # two_step from the policy: π_t at both BEGINs of the round.
      target = _select(is_aux, params, snapshot)
      snapshot = target
    inner_state = _strong(inner.init(target)) if reset_inner_state else state.inner_state
    new_state = state._replace(inner_state=inner_state, policy_snapshot=snapshot,
                               step=jnp.zeros_like(state.step))
    return _tree_sub(target, params), new_state

  def end_branch(grads, state, params, extra):
    del grads, extra
    if variant == "extrapolate":
      # params' = 2·π'_{t+1} − π'_t, written as an update params − π'_t.
      updates = _tree_sub(params, state.aux_params)
      new_state = state._replace(aux_params=params, round=state.round + 1)
      return updates, new_state
    is_aux = state.phase == AUX_PHASE
    zeros = jax.tree.map(jnp.zeros_like, params)
    new_state = state._replace(
        aux_params=_select(is_aux, params, state.aux_params),
        phase=jnp.where(is_aux, POLICY_PHASE, AUX_PHASE).astype(jnp.int32),
        round=state.round + jnp.where(is_aux, 0, 1).astype(jnp.int32))
    return zeros, new_state

  def update_fn(grads, state, params=None, *, event=OnpoEvent.STEP, **extra_args):
    if params is None:
      raise ValueError("onpo_step: update needs params (the current policy parameters)")
    fns = (step_branch, begin_branch, end_branch)
    if not isinstance(event, jax.core.Tracer):
      if int(event) not in tuple(OnpoEvent):
        raise ValueError(f"onpo_step: event must be one of {list(OnpoEvent)}, got {event!r}")
      # A concrete event picks its branch at trace time: transitions then need
      # no inner extra args (e.g. LBFGS's value_fn).
      return fns[int(event)](grads, state, params, extra_args)
    # Traced event: lax.switch traces every branch, so the inner extra args must
    # be given for transitions too. They (possibly callables, e.g. LBFGS's
    # value_fn) are closed over, not passed as operands.
    branches = [lambda g, s, p, fn=fn: fn(g, s, p, extra_args) for fn in fns]
    step_out = jax.eval_shape(branches[0], grads, state, params)
    # Transition updates take the dtypes of the inner updates so that every
    # lax.switch branch has the same output types.
    cast = lambda fn: (lambda *a: _cast_like(fn(*a), step_out))
    return jax.lax.switch(
        jnp.asarray(event, jnp.int32),
        [branches[0], cast(branches[1]), cast(branches[2])], grads, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cast_like(out, like):
  updates, state = out
  like_updates, _ = like
  updates = jax.tree.map(lambda u, l: u.astype(l.dtype), updates, like_updates)
  return updates, state


def _transition(opt, params, state, event):
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = opt.update(zeros, state, params, event=event)
  return optax.apply_updates(params, updates), state


def onpo_begin_phase(opt: optax.GradientTransformationExtraArgs, params, state):
  """Moves `params` to where the current regression starts; resets counters.

  Call right before the first gradient step of each regression (after sampling,
  for the auxiliary one). Jittable; `opt` is static.

  Returns:
    (params, state).
  """
  return _transition(opt, params, state, OnpoEvent.BEGIN)


def onpo_end_phase(opt: optax.GradientTransformationExtraArgs, params, state):
  """Records the finished regression and advances phase / round.

  Call right after the last gradient step of each regression. After the last
  phase of a round the returned params are π_{t+1}, ready for sampling.

  Returns:
    (params, state).
  """
  return _transition(opt, params, state, OnpoEvent.END)


def onpo_anchor_params(state: OnpoStepState):
  """Parameters of the anchor π' of the current regression (compute its log-probs once)."""
  return state.aux_params
