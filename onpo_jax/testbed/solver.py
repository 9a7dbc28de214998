"""Full-batch solver of exact-mode regressions: any optax transform to a gradient tolerance.

Each exact round (`testbed.exact`) regresses the policy on the exact expected
loss; `solve_regression` runs the optimizer's steps in one jitted
`lax.while_loop` until the gradient's global L2 norm (or an optional residual)
falls below its tolerance, L-BFGS by default, `onpo_step(...)` included.
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
    grad_norm: global L2 norm of the gradient at `params`.
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


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def _stores_value(state) -> bool:
  """Whether the state holds the line search's value and gradient (L-BFGS does)."""
  try:
    return optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None
  except (KeyError, ValueError):  # several "value" fields: ambiguous, recompute instead
    return False


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "residual_fn"))
def _solve(loss_fn, optimizer, residual_fn, params, opt_state, args, tol, residual_tol,
           max_steps):
  opt = optax.with_extra_args_support(optimizer)
  value_fn = lambda p: loss_fn(p, *args)
  value_and_grad = jax.value_and_grad(value_fn)
  reuse = _stores_value(opt_state)
  if reuse:
    # The line search already evaluated the accepted point: reuse it.
    from_state = optax.value_and_grad_from_state(value_fn)
  value, grad = value_and_grad(params)
  nan = jnp.full([], jnp.nan, jnp.result_type(value))
  residual = (lambda p: jnp.asarray(residual_fn(p, *args), nan.dtype)) if residual_fn else (
      lambda p: nan)

  def done(grad, res):
    # NaN compares False: a NaN residual never stops the loop, a NaN gradient does.
    return (_global_norm(grad) <= tol) | (res <= residual_tol) | jnp.isnan(_global_norm(grad))

  def cond(carry):
    _, _, _, grad, res, step = carry
    return (step < max_steps) & ~done(grad, res)

  def body(carry):
    params, state, value, grad, _, step = carry
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
    value, grad = from_state(params, state=state) if reuse else value_and_grad(params)
    return params, state, value, grad, residual(params), step + 1

  carry = (params, opt_state, value, grad, residual(params), jnp.zeros([], jnp.int32))
  params, opt_state, value, grad, res, steps = jax.lax.while_loop(cond, body, carry)
  norm = _global_norm(grad)
  converged = (norm <= tol) | (res <= residual_tol)
  return SolveResult(params, opt_state, value, norm, res, steps, converged)


def solve_regression(loss_fn: Callable[..., jax.Array], params, *args, tol: float,
                     max_steps: int, optimizer: Optional[optax.GradientTransformation] = None,
                     opt_state=None, residual_fn: Optional[Callable[..., jax.Array]] = None,
                     residual_tol: Optional[float] = None) -> SolveResult:
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
  float32 network's gradient norm may stall well above any small tol.

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

  Returns:
    `SolveResult` (params, opt_state, loss, grad_norm, residual, steps,
    converged).
  """
  fn = "solve_regression"
  if not (isinstance(tol, (int, float)) and tol > 0):
    raise ValueError(f"{fn}: tol must be a number > 0, got {tol!r}")
  if not (isinstance(max_steps, int) and max_steps >= 1):
    raise ValueError(f"{fn}: max_steps must be an integer >= 1, got {max_steps!r}")
  if not callable(loss_fn):
    raise ValueError(f"{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
  if residual_fn is not None and not callable(residual_fn):
    raise ValueError(f"{fn}: residual_fn must be callable or None, got "
                     f"{type(residual_fn).__name__}")
  if (residual_fn is None) != (residual_tol is None):
    raise ValueError(f"{fn}: residual_fn and residual_tol go together; got residual_fn="
                     f"{residual_fn!r}, residual_tol={residual_tol!r}")
  if residual_tol is not None and not (isinstance(residual_tol, (int, float))
                                       and residual_tol > 0):
    raise ValueError(f"{fn}: residual_tol must be a number > 0, got {residual_tol!r}")
  optimizer = default_solver() if optimizer is None else optimizer
  if opt_state is None:
    opt_state = optimizer.init(params)
  # -inf: no residual rule, the comparison is then always False.
  r_tol = -float("inf") if residual_tol is None else float(residual_tol)
  return _solve(loss_fn, optimizer, residual_fn, params, opt_state, tuple(args), tol, r_tol,
                max_steps)
