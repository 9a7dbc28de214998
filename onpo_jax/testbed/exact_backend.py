"""Exact-mode rounds on the self-play engine: full-batch regressions on exact expectations.

In exact mode nothing is sampled: a round's data is `exact.ExactData` (every
enumerated response or ordered pair with its probability under π_t), an
anchor's "log-probs" are its whole table log π(y | x) [C, |Y|], and each
regression is solved to a tolerance (`solver.gauss_newton` in table space, the
seeds' regressions batched) instead of epochs of minibatches. Everything else, including ONPO's
two phases through `onpo_step`, the anchors' fingerprints and the method
table's losses, is the engine's own code path (`onpo_jax.selfplay.engine`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax.testbed import evaluation
from onpo_jax.testbed import exact
from onpo_jax.testbed import solver
from onpo_jax.testbed.world import policy_table


def table_jacobian(graphdef, params, prompt_tokens, prompt_mask, responses, *,
                   to_network=None):
  """∂ log π(y | x_c)/∂θ for every table entry: a params tree with a leading [C·|Y|] axis.

  Row c·|Y| + y is the gradient of one sequence's log-probability (entries of
  the table do not share sequences), so the Jacobian is a batch of
  per-sequence gradients: one batched backward pass, not C·|Y| of them.

  `to_network` (default: the identity) maps `params` to the network's
  parameters, so that the Jacobian is taken with respect to another
  parameterisation of the same network (LoRA factors, `testbed.lora_exact`).
  """
  net = (lambda p: p) if to_network is None else to_network
  prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
  responses = jnp.asarray(responses)
  c, n_y = prompt_tokens.shape[0], responses.shape[0]
  ci, yi = jnp.repeat(jnp.arange(c), n_y), jnp.tile(jnp.arange(n_y), c)

  def one(p, i, j):
    return evaluation.policy_table(graphdef, net(p), prompt_tokens[i][None],
                                   prompt_mask[i][None], responses[j][None])[0, 0]

  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, ci, yi)


@functools.partial(jax.jit, static_argnums=0)
def batched_table(graphdef, params, prompt_tokens, prompt_mask, responses):
  """[S, C, |Y|] policy tables of S stacked parameter trees in S stacked worlds."""
  one = lambda p, pt, pm, ys: evaluation.policy_table(graphdef, p, pt, pm, ys)
  return jax.vmap(one)(params, prompt_tokens, prompt_mask, responses)


@functools.partial(jax.jit, static_argnums=(0, 1))
def batched_mapped_table(graphdef, param_map, params, inputs):
  """[S, C, |Y|] tables of S stacked trees, each mapped to the network by `param_map`.

  `inputs` are the stacked worlds, (prompt_tokens, prompt_mask, responses, ...):
  `param_map(params, inputs)` of one seed may read the entries after the three a
  table reads (e.g. the seed's frozen base, `ExactRegression(param_map=...)`).
  """
  one = lambda p, i: evaluation.policy_table(graphdef, param_map(p, i), *i[:3])
  return jax.vmap(one)(params, inputs)


class ExactBackend:
  """The part of the backend protocol a full-batch round uses: anchor tables.

  Args:
    table_fn: stacked params -> [S, C, |Y|] log π tables of the seeds' worlds.
  """

  def __init__(self, table_fn):
    self.table_fn = table_fn

  def anchor_logprobs(self, params, data):
    del data  # the anchor's whole table serves every example
    return self.table_fn(params)

  def sample(self, *args, **kwargs):
    raise TypeError("exact mode samples nothing: build exact.ExactData and call Engine.train")

  sample_mixture = build_examples = sample


class ExactRegression:
  """`Engine(regression=...)`: solves S seeds' regressions on `ExactData` at once.

  Parameters, anchors, data and worlds carry a leading seed axis S; the S
  regressions run in one vmapped `solver.solve_regression_batch` with
  `solver.gauss_newton` in table space: the loss is a function of the policy's
  table (`exact.exact_loss`), the table a function of the parameters, its
  Jacobian a batch of per-sequence gradients (`table_jacobian`). A regression
  stops when its gradient norm is ≤ tol or, for methods with a closed-form
  minimiser, when `exact.regression_residual` is ≤ residual_tol.

  The worlds (prompts and responses, stacked `Testbed.inputs`) are an argument
  of the compiled solver, not a constant, so games of different seeds share it.

  Args:
    config: the run config (method hyperparameters).
    graphdef: the policy architecture.
    tol: tolerance on the global L2 norm of the loss gradient.
    max_steps: step budget of one regression.
    residual_tol: tolerance on the residual (None: gradient norm only).
    stall_steps: steps in a row without progress that end a regression
      (None: only the tolerances and max_steps do; `solver.solve_regression`).
    param_map: None (the trained parameters are the network's), or a hashable
      pure function (params, inputs) -> the network's parameters of one seed,
      for another parameterisation of the policy (LoRA, `testbed.lora_exact`):
      the regression then trains `params` through it. `inputs` are then the
      three arrays a table reads followed by whatever per-seed values the map
      needs (stacked like them), so that one compiled solve serves every seed.
  """

  def __init__(self, config, graphdef, *, tol: float, max_steps: int, residual_tol=None,
               stall_steps=None, param_map=None):
    self.config, self.graphdef, self.param_map = config, graphdef, param_map
    self.tol, self.max_steps = float(tol), int(max_steps)
    self.stall_steps = None if stall_steps is None else int(stall_steps)
    self.residual_tol = None if residual_tol is None else float(residual_tol)
    self.inputs = None  # stacked (prompt_tokens, prompt_mask, responses) of the seeds' worlds
    self._fns = {}
    self._solutions = {}  # (method, phase) -> the last two solutions (stacked params)
    if param_map is None:
      self._table = lambda p, anchors, data, inputs: policy_table(graphdef, p, *inputs)
      self._jacobian = lambda p, anchors, data, inputs: table_jacobian(graphdef, p, *inputs)
    else:
      self._table = lambda p, anchors, data, inputs: policy_table(
          graphdef, param_map(p, inputs), *inputs[:3])
      self._jacobian = lambda p, anchors, data, inputs: table_jacobian(
          graphdef, p, *inputs[:3], to_network=lambda q: param_map(q, inputs))

  def table(self, params, inputs=None):
    """[S, C, |Y|] log π tables of stacked `params` in the seeds' worlds (or `inputs`)."""
    inputs = self.inputs if inputs is None else inputs
    if inputs is None:
      raise ValueError("ExactRegression.inputs is not set: assign the seeds' stacked "
                       "Testbed.inputs")
    if self.param_map is not None:
      return batched_mapped_table(self.graphdef, self.param_map, params, tuple(inputs))
    return batched_table(self.graphdef, params, *inputs)

  def _functions(self, name: str):
    """Method `name`'s functions, built once so that each compiles once.

    Returns:
      (loss, residual) of one seed's table (residual None without a closed-form
      minimiser or residual_tol), the seeds' residuals of stacked tables (jitted)
      and the seeds' losses of stacked parameters (jitted).
    """
    if name not in self._fns:
      cfg = self.config
      loss = lambda table, anchors, data, inputs: exact.exact_loss(
          name, cfg, table, anchors, data)[0]
      residual = None
      if name in exact.SOLVABLE and self.residual_tol is not None:
        residual = lambda table, anchors, data, inputs: exact.regression_residual(
            name, cfg, table, anchors, data)
      batch_residual = jax.jit(jax.vmap(lambda table, anchors, data: exact.regression_residual(
          name, cfg, table, anchors, data))) if name in exact.SOLVABLE else None
      table = self._table
      batch_loss = jax.jit(jax.vmap(lambda p, a, d, i: loss(table(p, a, d, i), a, d, i)))
      self._fns[name] = (loss, residual, batch_residual, batch_loss)
    return self._fns[name]

  def reset(self) -> None:
    """Forgets the previous solutions (call before a new trajectory)."""
    self._solutions = {}

  def _warm_start(self, name, phase, params, batch_loss, anchors, data):
    """The start of a regression: the engine's, or the extrapolation of the last two solutions.

    Consecutive rounds move the table by similar amounts (r_t changes slowly), so
    2·θ*_{t} − θ*_{t−1} of the same phase often starts next to the solution. It
    is used, per seed, only where its loss is lower than the engine's start; the
    solve still runs to the same tolerance, so only the work changes. Not for
    ONPO `extrapolate`, whose policy is defined by the parameters the aux
    regression reaches from its anchor.
    """
    past = self._solutions.get((name, phase), [])
    if name == "onpo_extrapolate" or len(past) < 2:
      return params
    guess = jax.tree.map(lambda a, b: 2 * a - b, past[-1], past[-2])
    better = batch_loss(guess, anchors, data, self.inputs) < batch_loss(params, anchors, data,
                                                                        self.inputs)
    pick = lambda g, p: jnp.where(better.reshape((-1,) + (1,) * (g.ndim - 1)), g, p)
    return jax.tree.map(pick, guess, params)

  def __call__(self, name, optimizer, params, opt_state, data, anchors, key, round_idx, phase):
    del key  # full batch: nothing is shuffled
    t0 = time.perf_counter()
    loss, residual, batch_residual, batch_loss = self._functions(name)
    params = self._warm_start(name, phase, params, batch_loss, anchors, data)
    res = solver.solve_regression_batch(
        loss, params, anchors, data, self.inputs, tol=self.tol, max_steps=self.max_steps,
        optimizer=optimizer, opt_state=opt_state, residual_fn=residual,
        residual_tol=self.residual_tol if residual is not None else None,
        output_fn=self._table, output_jacobian=self._jacobian, stall_steps=self.stall_steps)
    # A copy: the engine donates the returned params to its next update.
    self._solutions[(name, phase)] = self._solutions.get((name, phase), [])[-1:] + [
        jax.tree.map(jnp.copy, res.params)]
    metrics = {"loss": res.loss, "grad_norm": res.grad_norm, "steps": res.steps,
               "converged": res.converged}
    if batch_residual is not None:
      metrics["residual"] = batch_residual(self.table(res.params), anchors, data)
    metrics = {k: np.asarray(v, np.float64) for k, v in jax.device_get(metrics).items()}
    if not all(np.all(np.isfinite(v)) for v in metrics.values()):
      raise FloatingPointError(f"method {name!r}, round {round_idx}, phase {phase!r}: exact "
                               f"regression metrics are not finite: {metrics}")
    return res.params, res.opt_state, metrics, (time.perf_counter() - t0, 0)
