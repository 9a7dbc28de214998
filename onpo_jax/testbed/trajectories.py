"""One method's T rounds on the testbed: sampled (one seed) or exact (every seed at once).

A trajectory starts from the seed's SFT policy, runs T rounds of one method on
the self-play engine and returns per-round exact metrics (the policy's duality
gap, the gap of the average iterate, the win rate vs SFT), so that the testbed
job (`onpo_jax.testbed.job`) can take means and intervals over seeds. Exact
rounds run the seeds' trajectories together (their regressions are one
vmapped solve) and also return the tabular shadow's metrics and the tracking
KL between each neural iterate and its shadow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay.engine import Engine
from onpo_jax.tabular import exact as tabular_exact
from onpo_jax.testbed import exact
from onpo_jax.testbed import shadow
from onpo_jax.testbed import solver
from onpo_jax.testbed.exact_backend import ExactBackend
from onpo_jax.testbed.exact_backend import ExactRegression
from onpo_jax.testbed.world import Start


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


def stack_trees(trees):
  """The seeds' trees stacked leaf by leaf on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


class ExactRounds:
  """The engine in exact mode over a batch of seeds (compiled once, vmapped over seeds).

  Args:
    config: the run config with `selfplay.methods` = the exact methods and the
      method hyperparameters (`onpo.eta`, ...).
    graphdef: the policy architecture (the same in every seed's world).
    tol: gradient-norm tolerance of each regression.
    max_steps: step budget of each regression.
    residual_tol: residual tolerance of each regression (None: gradient only).
    stall_steps: steps in a row without progress that end a regression (None:
      never).
    param_map: another parameterisation of the policy (`ExactRegression`'s;
      LoRA: `testbed.lora_exact`); None: the network's own parameters.
  """

  def __init__(self, config, graphdef, *, tol: float, max_steps: int, residual_tol=None,
               stall_steps=None, param_map=None):
    self.config = config
    self.regression = ExactRegression(config, graphdef, tol=tol, max_steps=max_steps,
                                      residual_tol=residual_tol, stall_steps=stall_steps,
                                      param_map=param_map)
    self.backend = ExactBackend(self.regression.table)
    self.engine = Engine(self.backend, config, inner_optimizer=solver.default_gauss_newton(),
                         regression=self.regression)
    self._data = {}

  def data_fn(self, name: str):
    """Stacked tables [S, C, |Y|] and games -> the seeds' stacked `exact.ExactData`."""
    if name not in self._data:
      cfg = self.config
      self._data[name] = jax.jit(jax.vmap(lambda lp, pref: exact.exact_data(name, cfg, lp, pref)))
    return self._data[name]

  def train_rounds(self, name: str, params, table, pref, num_rounds: int):
    """T rounds of `name` from the stacked trained trees `params` (`regression.inputs` set).

    The reference of every round is the start, `params` (b = 0 for LoRA: the base).

    Args:
      name: the method.
      params: stacked trained trees of the seeds at round 0.
      table: [S, C, |Y|] their log π tables.
      pref: [S, C, |Y|, |Y|] the seeds' games.
      num_rounds: T.

    Returns:
      (T+1 stacked tables, {'residual', 'grad_norm', 'steps'}: [S, T] the worst
      regression's residual and gradient norm and the total steps of each round,
      the T rounds' engine metrics).
    """
    self.regression.reset()
    state = self.engine.init_state(name, params)
    tables = [table]
    per_round = {k: np.zeros((pref.shape[0], num_rounds)) for k in ("residual", "grad_norm",
                                                                     "steps")}
    rounds = []
    for t in range(num_rounds):
      data = self.data_fn(name)(tables[-1], pref)
      state, metrics = self.engine.train(name, state, params, data, jax.random.key(0), t + 1)
      tables.append(self.regression.table(state["params"]))
      # The worst of the round's regressions (ONPO two_step has two), per seed.
      pick = lambda suffix: [v for k, v in metrics.items() if k.endswith(suffix)]
      per_round["residual"][:, t] = np.max(pick("/residual"), axis=0)
      per_round["grad_norm"][:, t] = np.max(pick("/grad_norm"), axis=0)
      per_round["steps"][:, t] = np.sum(pick("/steps"), axis=0)
      rounds.append(metrics)
    return tables, per_round, rounds

  def run(self, starts: list[Start], name: str, num_rounds: int, *,
          with_shadow: bool = True) -> list[dict]:
    """T exact rounds of `name` from each seed's SFT, all seeds at once.

    Returns:
      One dict per seed of per-round arrays: [T+1] for 'gap', 'avg_gap',
      'win_rate_vs_sft' (round 0 = SFT) and the shadow's curves, [T] for the
      regressions' worst 'residual', 'grad_norm' and total 'steps' per round,
      and 'rounds' (per-round metrics).
    """
    sft_params = stack_trees([s.sft_params for s in starts])
    sft_table = jnp.stack([s.sft_table for s in starts])
    pref = jnp.stack([s.world.pref for s in starts])
    self.regression.inputs = stack_trees([s.world.inputs for s in starts])
    tables, per_round, rounds = self.train_rounds(name, sft_params, sft_table, pref, num_rounds)
    logp = jnp.stack(tables, axis=1)  # [S, T+1, C, |Y|]
    outs = []
    for i, start in enumerate(starts):
      neural = shadow.shadow_metrics(pref[i], logp[i], sft_table[i])
      out = {"gap": np.asarray(neural["gap"]), "avg_gap": np.asarray(neural["avg_gap"]),
             "win_rate_vs_sft": np.asarray(neural["win_rate_vs_sft"]),
             **{k: v[i] for k, v in per_round.items()}}
      if with_shadow:
        tab = shadow.shadow_iterates(name, self.config, pref[i], sft_table[i], num_rounds)
        ref = shadow.shadow_metrics(pref[i], tab, sft_table[i])
        out["shadow_gap"] = np.asarray(ref["gap"])
        out["shadow_avg_gap"] = np.asarray(ref["avg_gap"])
        out["tracking_kl"] = np.asarray(shadow.tracking_kl(logp[i], tab))
      curves = ("gap", "avg_gap", "win_rate_vs_sft", "shadow_gap", "shadow_avg_gap",
                "tracking_kl")
      out["rounds"] = [{**{k: float(np.ravel(v)[i] if np.ndim(v) else v) for k, v in m.items()},
                        **{k: float(out[k][t + 1]) for k in curves if k in out}}
                       for t, m in enumerate(rounds)]
      outs.append(out)
    return outs
