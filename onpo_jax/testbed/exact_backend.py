"""Exact-mode rounds on the self-play engine: full-batch regressions on exact expectations.

In exact mode nothing is sampled: a round's data is `exact.ExactData` (every
enumerated response or ordered pair with its probability under π_t), an
anchor's "log-probs" are its whole table log π(y | x) [C, |Y|], and each
regression is solved to a tolerance by `solver.solve_regression` (L-BFGS by
default) instead of epochs of minibatches. Everything else, including ONPO's
two phases through `onpo_step`, the anchors' fingerprints and the method
table's losses, is the engine's own code path (`onpo_jax.selfplay.engine`).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from onpo_jax.testbed import exact
from onpo_jax.testbed import solver
from onpo_jax.testbed.world import policy_table


class ExactBackend:
  """The part of the backend protocol a full-batch round uses: anchor tables.

  Args:
    table_fn: params -> [C, |Y|] log π table of the current world.
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
  """`Engine(regression=...)`: solves a regression on `ExactData` to a gradient tolerance.

  The world (prompts and responses, `Testbed.inputs`) is an argument of the
  compiled solver, not a constant, so worlds of different seeds share it.

  Args:
    config: the run config (method hyperparameters).
    graphdef: the policy architecture.
    tol: tolerance on the global L2 norm of the loss gradient.
    max_steps: step budget of one regression.
  """

  def __init__(self, config, graphdef, *, tol: float, max_steps: int):
    self.config, self.graphdef = config, graphdef
    self.tol, self.max_steps = float(tol), int(max_steps)
    self.inputs = None  # (prompt_tokens, prompt_mask, responses) of the current world
    self._loss_fns = {}

  def table(self, params, inputs=None):
    """[C, |Y|] log π table of `params` in the current world (or in `inputs`)."""
    inputs = self.inputs if inputs is None else inputs
    if inputs is None:
      raise ValueError("ExactRegression.inputs is not set: assign a world's Testbed.inputs")
    return policy_table(self.graphdef, params, *inputs)

  def loss_fn(self, name: str):
    """loss(params, anchors, data, inputs) of method `name`, one function per method."""
    if name not in self._loss_fns:
      self._loss_fns[name] = lambda p, anchors, data, inputs: exact.exact_loss(
          name, self.config, self.table(p, inputs), anchors, data)[0]
    return self._loss_fns[name]

  def __call__(self, name, optimizer, params, opt_state, data, anchors, key, round_idx, phase):
    del key  # full batch: nothing is shuffled
    t0 = time.perf_counter()
    res = solver.solve_regression(self.loss_fn(name), params, anchors, data, self.inputs,
                                 tol=self.tol, max_steps=self.max_steps, optimizer=optimizer,
                                 opt_state=opt_state)
    metrics = {"loss": res.loss, "grad_norm": res.grad_norm, "steps": res.steps,
               "converged": res.converged}
    if name in exact.SOLVABLE:
      metrics["residual"] = exact.regression_residual(name, self.config, self.table(res.params),
                                                      anchors, data)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(np.isfinite(v) for v in metrics.values()):
      raise FloatingPointError(f"method {name!r}, round {round_idx}, phase {phase!r}: exact "
                               f"regression metrics are not finite: {metrics}")
    return res.params, res.opt_state, metrics, (time.perf_counter() - t0, 0)
