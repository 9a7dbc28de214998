"""Full-batch solver of exact-mode regressions: any optax transform to a stated tolerance.

Each exact round (`testbed.exact`) regresses the policy on the exact expected
loss; `solve_regression` runs the optimizer's steps in one jitted
`lax.while_loop` until the gradient's global L2 norm (or an optional residual)
falls below its tolerance, L-BFGS by default, `onpo_step(...)` included.

`gauss_newton` is the solver of choice when the loss is a function of a small
output (the policy's table, C·|Y| numbers): it takes the loss's exact second
order model in output space and maps it through the network's Jacobian: on the
testbed's first OMD round it reaches an excess loss of 1e-9 in about 25 steps,
where L-BFGS needs about 300 steps for 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class SolveResult(NamedTuple):
  """What `solve_regression` returns.

  Attributes:
    params: the parameters reached.
    opt_state: the optimizer state after the last step (pass it on to
      `onpo_end_phase` when the optimizer is `onpo_step(...)`).
    loss: loss_fn at `params`.
    grad_norm: global L2 norm of the gradient at `params`; for an optimizer
      that reports it in its state (`gauss_newton`), at the point its last
      step started from (the same point when that step was not taken).
    residual: residual_fn at `params` (NaN when no residual_fn was given).
    steps: optimizer steps taken (int32).
    converged: grad_norm <= tol, or residual <= residual_tol (False also when
      the loss became NaN).
  """

  params: Any
  opt_state: Any
  loss: jax.Array
  grad_norm: jax.Array
  residual: jax.Array
  steps: jax.Array
  converged: jax.Array


@functools.lru_cache(maxsize=None)
def default_solver() -> optax.GradientTransformationExtraArgs:
  """L-BFGS with a zoom line search (optax.lbfgs defaults): the exact losses are smooth.

  One shared instance, so that `solve_regression`'s executable cache (keyed on
  the optimizer) hits across calls.
  """
  return optax.lbfgs()


_STEP_SCALES = (1.0, 0.5, 0.25, 0.125)


class GaussNewtonState(NamedTuple):
  """State of `gauss_newton`.

  Attributes:
    damping: the current relative damping λ.
    value: the loss at the parameters after the last update (the point it
      accepted; the loss it was given when it took no step).
    grad_norm: the global L2 norm of the loss gradient at the parameters the
      last update started from.
  """

  damping: jax.Array
  value: jax.Array
  grad_norm: jax.Array


# The damping's floor per parameter precision (`gauss_newton(min_damping=None)`).
# float64 lowers it to 1e-12: the curvature of a response with small probability
# under π_t is small, a floor of 1e-6 swamps it, and those directions then
# converge linearly and slowly (on the default exact games, 3.3x fewer ONPO
# two_step steps in float64 with the lower floor). Below ~1e-6 a float32 solve
# of a near-singular H K is noise.
MIN_DAMPING = {"float64": 1e-12, "float32": 1e-6}


def gauss_newton(damping: float = 1e-2, *, min_damping: Optional[float] = None,
                 max_damping: float = 1e9) -> optax.GradientTransformationExtraArgs:
  """Levenberg–Marquardt steps of a loss of the network's output, in output space.

  For a loss ℓ(f(θ)) with a small output f (n = C·|Y| log-probabilities), let
  g = ∇ℓ and H = ∇²ℓ at the current output, J = ∂f/∂θ and K = J Jᵀ [n, n]
  (the network's tangent kernel). The step δ minimises the second-order model
  gᵀJδ + ½ δᵀJᵀHJδ in the row space of J, damped: δ = Jᵀa with
  (H K + λ s I) a = −g, where s = tr(HK)/n makes λ relative. For
  the exact-mode losses ℓ is quadratic in the table, so the model is exact in
  output space and the only error is the network's curvature: steps converge
  like Newton's near the solution. Each update tries δ, δ/2, δ/4 and δ/8 (one
  batched forward pass) and takes the one with the lowest loss, or none if
  none lowers it. λ adapts to the full step (Moré's rule): a real decrease
  < ¼ of the predicted one raises λ ×4, > ¾ lowers it ÷3.

  The state reports the loss at the accepted point and the gradient norm
  (‖Jᵀg‖ = √(gᵀKg)), so `solve_regression` takes no gradient of its own
  between steps: a step costs the Jacobian and one batched forward pass.

  Memory: the Jacobian holds n × (number of parameters) floats; meant for the
  enumerable testbed (n ≤ a few hundred), not for language models.

  Args:
    damping: initial relative damping λ > 0.
    min_damping: lower bound of λ; None: `MIN_DAMPING` of the parameters'
      dtype (1e-6 for dtypes it does not name).
    max_damping: upper bound of λ.

  Returns:
    An optax transform whose update needs the extra args `value` (ℓ at
    params), `output_fn` (params -> output array) and `output_loss`
    (output -> scalar), and takes `output_jacobian` (params -> the tree of
    ∂f/∂θ with a leading axis over the flattened output); without it the
    Jacobian is n vector-Jacobian products. `solve_regression(...,
    output_fn=..., output_jacobian=...)` passes them.
  """
  floor = lambda dtype: (MIN_DAMPING.get(jnp.dtype(dtype).name, MIN_DAMPING["float32"])
                        if min_damping is None else min_damping)
  if not all(0 < floor(d) <= damping <= max_damping for d in MIN_DAMPING):
    raise ValueError(f"gauss_newton: need 0 < min_damping <= damping <= max_damping, got "
                     f"{min_damping}, {damping}, {max_damping}")

  def init_fn(params):
    dtype = jax.tree.leaves(params)[0].dtype
    nan = jnp.full([], jnp.nan, dtype)  # nothing evaluated yet
    return GaussNewtonState(jnp.asarray(damping, dtype), nan, nan)

  def update_fn(grads, state, params, *, value, output_fn, output_loss, output_jacobian=None,
                **unused):
    del grads, unused  # the gradient is recomputed in output space
    if output_jacobian is None:
      out, vjp = jax.vjp(output_fn, params)
      jac = jax.vmap(lambda e: vjp(e.reshape(out.shape))[0])(jnp.eye(out.size, dtype=out.dtype))
    else:
      out, jac = output_fn(params), output_jacobian(params)
    shape, n = out.shape, out.size
    flat_loss = lambda o: output_loss(o.reshape(shape))
    g = jax.grad(flat_loss)(out.ravel())
    h = jax.hessian(flat_loss)(out.ravel())
    rows = [j.reshape(n, -1) for j in jax.tree.leaves(jac)]
    k = sum(r @ r.T for r in rows)
    hk = h @ k
    # ∇θ ℓ = Jᵀg, so its squared norm is gᵀKg: no backward pass needed.
    grad_norm = jnp.sqrt(jnp.maximum(g @ (k @ g), 0.0))
    scale = jnp.maximum(jnp.trace(hk) / n, jnp.finfo(out.dtype).tiny)
    a = jnp.linalg.solve(hk + state.damping * scale * jnp.eye(n, dtype=out.dtype), -g)
    step = jax.tree.map(lambda j: jnp.tensordot(a, j, axes=1), jac)
    du = k @ a  # the output's change to first order
    predicted = g @ du + 0.5 * du @ (h @ du)  # < 0 unless at a stationary point
    # The full step and three shorter ones, in one batched forward pass: where
    # the network's curvature makes the full step overshoot, a shorter one
    # still makes progress for the price of a forward pass, not a Jacobian.
    scales = jnp.asarray(_STEP_SCALES, out.dtype)
    values = jax.vmap(lambda c: output_loss(output_fn(
        jax.tree.map(lambda p, d: p + (c * d).astype(p.dtype), params, step))))(scales)
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values)
    # A near-singular system can give a finite loss from absurd parameters: a step
    # must be finite everywhere to be taken.
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(d)) for d in jax.tree.leaves(step)]))
    accept = finite & (values[best] <= value)
    # Damping follows the full step's agreement with the model.
    ratio = (values[0] - value) / jnp.minimum(predicted, -jnp.finfo(out.dtype).tiny)
    lam = jnp.where(finite & (ratio > 0.75), state.damping / 3,
                    jnp.where(finite & (ratio >= 0.25), state.damping, state.damping * 4))
    lam = jnp.clip(lam, floor(state.damping.dtype), max_damping).astype(state.damping.dtype)
    scale = jnp.where(accept, scales[best], 0.0)
    updates = jax.tree.map(lambda d: (scale * d).astype(d.dtype), step)
    new_value = jnp.where(accept, values[best], value).astype(state.value.dtype)
    return updates, GaussNewtonState(lam, new_value, grad_norm.astype(state.grad_norm.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.lru_cache(maxsize=None)
def default_gauss_newton() -> optax.GradientTransformationExtraArgs:
  """`gauss_newton()`, one shared instance (`solve_regression`'s executable cache keys on it)."""
  return gauss_newton()


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def _stores_value(state) -> bool:
  """Whether the state holds the line search's value and gradient (L-BFGS does)."""
  try:
    return optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None
  except (KeyError, ValueError):  # several "value" fields: ambiguous, recompute instead
    return False


def _reports_value(state) -> bool:
  """Whether the state holds a `GaussNewtonState`, which reports the loss and gradient norm."""
  is_gn = lambda node: isinstance(node, GaussNewtonState)
  return any(is_gn(node) for node in jax.tree.leaves(state, is_leaf=is_gn))


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "residual_fn",
                                             "output_fn", "output_jacobian"))
def _solve(loss_fn, optimizer, residual_fn, output_fn, output_jacobian, params, opt_state, args,
           tol, residual_tol, max_steps, stall_steps):
  opt = optax.with_extra_args_support(optimizer)
  extra = {}
  if output_fn is None:
    value_fn = lambda p: loss_fn(p, *args)
  else:
    extra = {"output_fn": lambda p: output_fn(p, *args),
             "output_loss": lambda o: loss_fn(o, *args)}
    value_fn = lambda p: loss_fn(output_fn(p, *args), *args)
    if output_jacobian is not None:
      extra["output_jacobian"] = lambda p: output_jacobian(p, *args)
  value_and_grad = jax.value_and_grad(value_fn)
  reports = _reports_value(opt_state)
  reuse = not reports and _stores_value(opt_state)
  if reuse:
    # The line search already evaluated the accepted point: reuse it.
    from_state = optax.value_and_grad_from_state(value_fn)
  if reports:  # the optimizer reports the gradient norm: only the loss is needed here,
    # and no backward pass is compiled outside the optimizer's own.
    value = value_fn(params)
    grad = jax.tree.map(jnp.zeros_like, params)  # never read by such an optimizer
    norm = jnp.full([], jnp.inf, jnp.result_type(value))  # not known before the first step
  else:
    value, grad = value_and_grad(params)
    norm = _global_norm(grad)
  nan = jnp.full([], jnp.nan, jnp.result_type(value))
  if residual_fn is None:
    residual = lambda p: nan
  elif output_fn is None:
    residual = lambda p: jnp.asarray(residual_fn(p, *args), nan.dtype)
  else:
    residual = lambda p: jnp.asarray(residual_fn(output_fn(p, *args), *args), nan.dtype)

  def done(norm, res):
    # NaN compares False: a NaN residual never stops the loop, a NaN gradient does.
    return (norm <= tol) | (res <= residual_tol) | jnp.isnan(norm)

  def cond(carry):
    _, _, _, _, norm, res, step, broke, stalled = carry
    # A reporting optimizer takes at least one step: its report is the gradient norm.
    go = ~done(norm, res) | (step == 0) if reports else ~done(norm, res)
    return (step < max_steps) & go & ~broke & (stalled < stall_steps)

  def body(carry):
    params, state, value, grad, norm, res, step, _, stalled = carry
    updates, new_state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=value_fn, **extra)
    new_params = optax.apply_updates(params, updates)
    if reports:
      # The optimizer evaluated the accepted point and, on its way, the gradient
      # norm where it started: the stopping rule sees that norm one step late,
      # which costs at most one step and saves a backward pass on every one.
      new_value = optax.tree.get(new_state, "value").astype(value.dtype)
      new_grad = grad
      new_norm = optax.tree.get(new_state, "grad_norm").astype(value.dtype)
    else:
      if reuse:
        new_value, new_grad = from_state(new_params, state=new_state)
      else:
        new_value, new_grad = value_and_grad(new_params)
      new_norm = _global_norm(new_grad)
    # A step into non-finite values is undone and ends the solve: the result is
    # the last finite iterate, reported as not converged.
    ok = jnp.isfinite(new_value) & jnp.isfinite(new_norm)
    keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(ok, x, y), new, old)
    params, state = keep(new_params, params), keep(new_state, state)
    # A step that lowers the loss by less than a few float ulps of it makes no
    # progress: at the precision's floor every further step is wasted work.
    gain = value - jnp.where(ok, new_value, value)
    floor = 4 * jnp.finfo(jnp.result_type(value)).eps * jnp.abs(value)
    stalled = jnp.where(gain > floor, 0, stalled + 1)
    value, grad, norm = keep(new_value, value), keep(new_grad, grad), keep(new_norm, norm)
    return params, state, value, grad, norm, residual(params), step + 1, ~ok, stalled

  zero = jnp.zeros([], jnp.int32)
  carry = (params, opt_state, value, grad, norm, residual(params), zero, jnp.zeros([], bool),
           zero)
  params, opt_state, value, grad, norm, res, steps, broke, _ = jax.lax.while_loop(
      cond, body, carry)
  converged = ((norm <= tol) | (res <= residual_tol)) & ~broke
  return SolveResult(params, opt_state, value, norm, res, steps, converged)


def _check(loss_fn, tol, max_steps, *, residual_fn=None, residual_tol=None, output_fn=None,
           output_jacobian=None, stall_steps=None) -> None:
  """Named errors for `solve_regression`'s arguments."""
  fn = "solve_regression"
  if not (isinstance(tol, (int, float)) and tol > 0):
    raise ValueError(f"{fn}: tol must be a number > 0, got {tol!r}")
  if not (isinstance(max_steps, int) and max_steps >= 1):
    raise ValueError(f"{fn}: max_steps must be an integer >= 1, got {max_steps!r}")
  if stall_steps is not None and not (isinstance(stall_steps, int) and stall_steps >= 1):
    raise ValueError(f"{fn}: stall_steps must be an integer >= 1 or None, got {stall_steps!r}")
  if not callable(loss_fn):
    raise ValueError(f"{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
  if output_fn is not None and not callable(output_fn):
    raise ValueError(f"{fn}: output_fn must be callable or None, got {type(output_fn).__name__}")
  if output_jacobian is not None and (output_fn is None or not callable(output_jacobian)):
    raise ValueError(f"{fn}: output_jacobian must be a callable given with output_fn, got "
                     f"output_jacobian={output_jacobian!r}, output_fn={output_fn!r}")
  if residual_fn is not None and not callable(residual_fn):
    raise ValueError(f"{fn}: residual_fn must be callable or None, got "
                     f"{type(residual_fn).__name__}")
  if (residual_fn is None) != (residual_tol is None):
    raise ValueError(f"{fn}: residual_fn and residual_tol go together; got residual_fn="
                     f"{residual_fn!r}, residual_tol={residual_tol!r}")
  if residual_tol is not None and not (isinstance(residual_tol, (int, float))
                                       and residual_tol > 0):
    raise ValueError(f"{fn}: residual_tol must be a number > 0, got {residual_tol!r}")


def solve_regression(loss_fn: Callable[..., jax.Array], params, *args, tol: float,
                     max_steps: int, optimizer: Optional[optax.GradientTransformation] = None,
                     opt_state=None, residual_fn: Optional[Callable[..., jax.Array]] = None,
                     residual_tol: Optional[float] = None,
                     output_fn: Optional[Callable[..., jax.Array]] = None,
                     output_jacobian: Optional[Callable[..., Any]] = None,
                     stall_steps: Optional[int] = None) -> SolveResult:
  """Minimises loss_fn(params, *args) full-batch to a stated tolerance, or max_steps.

  One jitted `lax.while_loop` of optimizer steps; each step calls
  `optimizer.update(grad, state, params, value=, grad=, value_fn=)`, so any
  optax transform works: L-BFGS (default; uses value and value_fn), Adam (the
  extra args are ignored), or `onpo_step(inner)` for ONPO's regressions
  (its update is a STEP event; call `onpo_begin_phase` before and
  `onpo_end_phase` after, passing the returned `opt_state`). The executable is
  cached on the identity of (loss_fn, optimizer, residual_fn): define them once
  and pass the round's data through `args`, so that every round reuses it.

  Stopping rule: ‖∇ loss‖₂ ≤ tol, or (when residual_fn is given) residual_fn ≤
  residual_tol. The residual is the natural tolerance of an exact-mode
  regression: `regression_residual` is the loss minus its exact minimum, so
  it says how far from solved the round is in the loss's own units, while a
  float32 network's gradient norm may stall well above any small tol. With
  `stall_steps`, the solve also ends (not converged) after that many steps
  in a row that lower the loss by no more than 4 ulps of it: where the
  precision's floor lies above a tolerance, a large step budget then costs
  only the steps that make progress.

  Args:
    loss_fn: scalar loss loss_fn(params, *args), jittable.
    params: starting parameters (any pytree).
    *args: data the loss depends on (pytrees of arrays), traced.
    tol: tolerance > 0 on the global L2 norm of the gradient.
    max_steps: step budget ≥ 1.
    optimizer: an optax transform; default `default_solver()`.
    opt_state: its state; default optimizer.init(params).
    residual_fn: optional scalar residual_fn(params, *args) ≥ 0, evaluated
      after every step (e.g. `regression_residual` of the policy's table).
    residual_tol: tolerance > 0 on it; required with residual_fn.
    output_fn: optional output_fn(params, *args) -> array. When given, the
      objective is loss_fn(output_fn(params, *args), *args) (loss_fn and
      residual_fn then take the output in place of params) and the optimizer
      also gets the extra args `output_fn` and `output_loss`: required by
      `gauss_newton`, refused by L-BFGS's line search.
    output_jacobian: optional output_jacobian(params, *args) -> ∂output/∂params
      with a leading axis over the flattened output (only with output_fn;
      passed on to the optimizer as the extra arg `output_jacobian`).
    stall_steps: optional count ≥ 1 of consecutive steps without progress
      that ends the solve (None: only the tolerances and max_steps do).

  Returns:
    `SolveResult` (params, opt_state, loss, grad_norm, residual, steps,
    converged).
  """
  _check(loss_fn, tol, max_steps, residual_fn=residual_fn, residual_tol=residual_tol,
         output_fn=output_fn, output_jacobian=output_jacobian, stall_steps=stall_steps)
  optimizer = default_solver() if optimizer is None else optimizer
  if opt_state is None:
    opt_state = optimizer.init(params)
  # -inf: no residual rule, the comparison is then always False.
  r_tol = -float("inf") if residual_tol is None else float(residual_tol)
  return _solve(loss_fn, optimizer, residual_fn, output_fn, output_jacobian, params, opt_state,
                tuple(args), tol, r_tol, max_steps, _stall_limit(stall_steps))


def _stall_limit(stall_steps) -> int:
  """The loop's stall limit: None never stops the loop (a count it cannot reach)."""
  return jnp.iinfo(jnp.int32).max if stall_steps is None else int(stall_steps)


def _batch_axes(opt_state):
  """vmap axes of an optimizer state over a batch of problems: 0 for arrays, None for scalars."""
  return jax.tree.map(lambda x: 0 if jnp.ndim(x) >= 1 else None, opt_state)


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "residual_fn",
                                             "output_fn", "output_jacobian"))
def _solve_batch(loss_fn, optimizer, residual_fn, output_fn, output_jacobian, params, opt_state,
                 args, tol, residual_tol, max_steps, stall_steps):
  axes = _batch_axes(opt_state)
  one = lambda p, s, a: _solve(loss_fn, optimizer, residual_fn, output_fn, output_jacobian, p,
                               s, a, tol, residual_tol, max_steps, stall_steps)
  res = jax.vmap(one, in_axes=(0, axes, 0))(params, opt_state, args)
  leaves, treedef = jax.tree.flatten(res.opt_state)
  flat_axes = jax.tree.flatten(axes, is_leaf=lambda x: x is None)[0]
  # A scalar shared by every problem on the way in goes back as one scalar.
  leaves = [x if ax == 0 else jnp.max(x, axis=0) for x, ax in zip(leaves, flat_axes)]
  return res._replace(opt_state=jax.tree.unflatten(treedef, leaves))


def solve_regression_batch(loss_fn: Callable[..., jax.Array], params, *args, tol: float,
                           max_steps: int, optimizer: optax.GradientTransformation,
                           opt_state, **kwargs) -> SolveResult:
  """B independent regressions in one vmapped `solve_regression` (e.g. one per seed).

  `params`, every leaf of `args` and every array leaf of `opt_state` carry a
  leading batch axis B. Scalar leaves of `opt_state` (step counters, a
  damping) are shared on the way in: each problem starts from them; on the
  way out they hold their maximum over the batch (for `onpo_step`'s
  counters all problems agree). Each problem stops by its own rule; the
  loop runs until the last one has (finished ones are left unchanged), so
  small problems batch well on a CPU where per-step overhead dominates.
  Optimizers whose state has array leaves without the batch axis (L-BFGS's
  memory is [m, ...]) are not supported: use `gauss_newton` or Adam.

  Args:
    loss_fn, params, *args, tol, max_steps, optimizer, opt_state: as for
      `solve_regression`, batched as above.
    **kwargs: residual_fn, residual_tol, output_fn, output_jacobian,
      stall_steps, as for `solve_regression` (functions of one problem).

  Returns:
    `SolveResult` with a leading batch axis on params, loss, grad_norm,
    residual, steps and converged.
  """
  _check(loss_fn, tol, max_steps, **kwargs)
  batch = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves((params, args))}
  if len(batch) != 1 or None in batch:
    raise ValueError(f"solve_regression_batch: params and args must share one leading batch "
                     f"axis; got leading sizes {sorted(map(str, batch))}")
  residual_tol = kwargs.get("residual_tol")
  r_tol = -float("inf") if residual_tol is None else float(residual_tol)
  return _solve_batch(loss_fn, optimizer, kwargs.get("residual_fn"), kwargs.get("output_fn"),
                      kwargs.get("output_jacobian"), params, opt_state, tuple(args), tol, r_tol,
                      max_steps, _stall_limit(kwargs.get("stall_steps")))
