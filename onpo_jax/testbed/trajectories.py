"""One method's T rounds on the testbed, for one seed: sampled or exact.

A trajectory is the unit of the testbed job (`onpo_jax.testbed.job`): it starts
from the seed's SFT policy, runs T rounds of one method on the self-play engine
and returns per-round exact metrics (the policy's duality gap, the gap of the
average iterate, the win rate vs SFT), so that means and intervals over seeds
can be taken. Exact trajectories also return the tabular shadow's metrics and
the tracking KL between the neural iterate and its shadow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay.engine import Engine
from onpo_jax.tabular import exact as tabular_exact
from onpo_jax.testbed import exact
from onpo_jax.testbed import solver
from onpo_jax.testbed import shadow
from onpo_jax.testbed.exact_backend import ExactBackend
from onpo_jax.testbed.exact_backend import ExactRegression
from onpo_jax.testbed.world import Testbed


class Start:
  """A seed's starting point: world, SFT parameters and SFT table."""

  def __init__(self, world: Testbed, sft_params, sft_table):
    self.world, self.sft_params, self.sft_table = world, sft_params, sft_table


def _average_gap(pref, prob_sum, count: int) -> float:
  """Duality gap of the average iterate (the mixture of the first `count` policies)."""
  avg = prob_sum / count
  return float(jnp.mean(tabular_exact.duality_gap(pref, avg)))


def sampled(engine: Engine, start: Start, name: str, method_index: int, run_key: jax.Array,
            num_rounds: int, prompts_per_round: int) -> dict:
  """T sampled rounds of `name`; returns per-round arrays [T+1] (round 0 = SFT) and the final table.

  Args:
    engine: the engine (testbed backend) of the world.
    start: the seed's SFT start.
    name: a method.
    method_index: its position in the job's method list (key derivation).
    run_key: the seed's run key.
    num_rounds: T.
    prompts_per_round: prompts drawn per round.
  """
  w = start.world
  state = engine.init_state(name, start.sft_params)
  out = {k: np.zeros(num_rounds + 1) for k in ("gap", "avg_gap", "win_rate_vs_sft",
                                               "oracle_queries")}
  m0 = jax.device_get(w.metrics_fn(start.sft_table, start.sft_table))
  out["gap"][0] = out["avg_gap"][0] = m0["gap"]
  out["win_rate_vs_sft"][0] = 0.5
  prob_sum = jnp.exp(start.sft_table)
  table = start.sft_table
  out["rounds"] = []  # per round: the engine's training metrics and the exact evaluation
  for t in range(num_rounds):
    prompts, mask = w.round_prompts(t, prompts_per_round, key=run_key)
    state, metrics = engine.run_round(name, state, start.sft_params, prompts, mask,
                                      loop_lib.round_key(run_key, t, method_index), t + 1)
    table = w.table_fn(state["params"])
    ev = jax.device_get(w.metrics_fn(table, start.sft_table))
    prob_sum = prob_sum + jnp.exp(table)
    out["gap"][t + 1] = ev["gap"]
    out["avg_gap"][t + 1] = _average_gap(w.pref, prob_sum, t + 2)
    out["win_rate_vs_sft"][t + 1] = ev["win_rate_vs_sft"]
    out["oracle_queries"][t + 1] = out["oracle_queries"][t] + metrics["oracle_queries"]
    out["rounds"].append({**metrics, **{k: float(v) for k, v in ev.items()},
                          "avg_gap": out["avg_gap"][t + 1],
                          "oracle_queries_total": out["oracle_queries"][t + 1]})
  out["final_table"] = np.asarray(table)
  return out


class ExactRounds:
  """The engine in exact mode, shared by every seed's world (compiled once).

  Args:
    config: the run config with `selfplay.methods` = the exact methods and the
      method hyperparameters (`onpo.eta`, ...).
    graphdef: the policy architecture (the same in every seed's world).
    tol: gradient-norm tolerance of each regression.
    max_steps: step budget of each regression.
  """

  def __init__(self, config, graphdef, *, tol: float, max_steps: int):
    self.config = config
    self.regression = ExactRegression(config, graphdef, tol=tol, max_steps=max_steps)
    self.backend = ExactBackend(self.regression.table)
    self.engine = Engine(self.backend, config, inner_optimizer=solver.default_solver(),
                         regression=self.regression)

  def run(self, start: Start, name: str, num_rounds: int, *, with_shadow: bool = True) -> dict:
    """T exact rounds of `name` from the seed's SFT; per-round arrays [T+1] (round 0 = SFT)."""
    w = start.world
    self.regression.inputs = w.inputs
    state = self.engine.init_state(name, start.sft_params)
    tables = [start.sft_table]
    per_round = {k: np.zeros(num_rounds) for k in ("residual", "grad_norm", "steps")}
    rounds = []
    for t in range(num_rounds):
      data = exact.exact_data(name, self.config, tables[-1], w.pref)
      state, metrics = self.engine.train(name, state, start.sft_params, data,
                                         jax.random.key(0), t + 1)
      tables.append(w.table_fn(state["params"]))
      # The worst of the round's regressions (ONPO two_step has two).
      per_round["residual"][t] = max(v for k, v in metrics.items() if k.endswith("/residual"))
      per_round["grad_norm"][t] = max(v for k, v in metrics.items() if k.endswith("/grad_norm"))
      per_round["steps"][t] = sum(v for k, v in metrics.items() if k.endswith("/steps"))
      rounds.append(metrics)
    logp = jnp.stack(tables)
    neural = shadow.shadow_metrics(w.pref, logp, start.sft_table)
    out = {"gap": np.asarray(neural["gap"]), "avg_gap": np.asarray(neural["avg_gap"]),
           "win_rate_vs_sft": np.asarray(neural["win_rate_vs_sft"]), **per_round}
    if with_shadow:
      tab = shadow.shadow_iterates(name, self.config, w.pref, start.sft_table, num_rounds)
      ref = shadow.shadow_metrics(w.pref, tab, start.sft_table)
      out["shadow_gap"] = np.asarray(ref["gap"])
      out["shadow_avg_gap"] = np.asarray(ref["avg_gap"])
      out["tracking_kl"] = np.asarray(shadow.tracking_kl(logp, tab))
    out["rounds"] = [{**m, **{k: float(out[k][t + 1]) for k in out if k in (
        "gap", "avg_gap", "win_rate_vs_sft", "shadow_gap", "shadow_avg_gap", "tracking_kl")}}
                     for t, m in enumerate(rounds)]
    return out
