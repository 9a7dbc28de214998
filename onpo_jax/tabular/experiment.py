"""Tabular experiment: exact duality gaps of ONPO and baselines versus T.

Reproduces the rates of ONPO (arXiv 2502.16852): average-iterate gap O(1/T)
for ONPO (Theorem 2) versus O(1/√T) for OMD (Theorem 1). Entry point
`run(config, workdir)`, dispatched by `experiments/run.py` for
`config.experiment == 'tabular'` (see configs/tabular.py).
"""

import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import plots
from onpo_jax.tabular import dynamics
from onpo_jax.tabular import exact
from onpo_jax.tabular import games

METHODS = ("onpo", "omd", "inpo", "nash_md", "extragradient")
_TABLE_T = (10, 100, 1000, 10_000)


def eval_rounds(num_rounds: int, num_points: int) -> np.ndarray:
  """Log-spaced horizons in [1, T], always including T and powers of ten ≤ T."""
  if num_rounds < 1 or num_points < 2:
    raise ValueError(f"need num_rounds >= 1 and num_eval_points >= 2, got {num_rounds}, "
                     f"{num_points}")
  grid = np.round(np.logspace(0, math.log10(num_rounds), num_points)).astype(int)
  tens = [t for t in _TABLE_T if t <= num_rounds]
  return np.unique(np.concatenate([grid, tens, [num_rounds]]).astype(int))


def fit_loglog_slope(ts, gaps, min_t: int) -> float:
  """Least-squares slope of log gap against log T over T ≥ min_t.

  Gaps are floored at 1e-300 so an exact zero gives a finite log; fewer than two
  points give NaN. Gaps at round-off level (≲1e-14 in float64, e.g. when π_1 is
  already a Nash equilibrium) make the slope meaningless.
  """
  ts, gaps = np.asarray(ts, float), np.asarray(gaps, float)
  keep = ts >= min_t
  if keep.sum() < 2:
    return float("nan")
  return float(np.polyfit(np.log(ts[keep]), np.log(np.maximum(gaps[keep], 1e-300)), 1)[0])


def _build_game(config: ml_collections.ConfigDict, dtype) -> jax.Array:
  kwargs = dict(config.game_params)
  kwargs["num_contexts"] = config.num_contexts
  if config.game == "ties":
    if sum(kwargs.get("block_sizes", ())) != config.num_actions:
      raise ValueError(f"config.game_params.block_sizes must sum to num_actions="
                       f"{config.num_actions}, got {kwargs.get('block_sizes')}")
  else:
    kwargs["num_actions"] = config.num_actions
  return games.make_game(config.game, jax.random.key(config.seed), dtype=dtype, **kwargs)


def _initial_logp(config: ml_collections.ConfigDict, dtype) -> jax.Array:
  """log π_1: uniform (theory) or a Dirichlet(1) draw per context from seed + 1."""
  if config.init == "uniform":
    return dynamics.uniform_logp(config.num_contexts, config.num_actions, dtype)
  if config.init == "random":
    key = jax.random.key(config.seed + 1)
    alpha = jnp.ones((config.num_contexts, config.num_actions), dtype)
    return jnp.log(jax.random.dirichlet(key, alpha, dtype=dtype))
  raise ValueError(f"config.init must be 'uniform' or 'random', got {config.init!r}")


def _method_gaps(name: str, config, p, logp_init, ts: np.ndarray):
  """(average-iterate gaps, last-iterate gaps) at the horizons `ts`, mean over contexts."""
  num_rounds = config.num_rounds
  idx = ts - 1
  if name == "omd" and config.omd.horizon_tuned:
    # D = log n is the theory's D only for uniform π_1; kept as the scale for any init.
    d = math.log(config.num_actions)
    etas = jnp.asarray(np.sqrt(d / ts), p.dtype)
    # One run per horizon T with η_T = √(D/T); each is read off at round T.
    pis = jax.vmap(lambda eta: dynamics.run_omd(p, logp_init, eta, num_rounds))(etas)
    avg = jax.vmap(dynamics.average_iterate_gaps, in_axes=(None, 0))(p, pis)
    last = jax.vmap(dynamics.last_iterate_gaps, in_axes=(None, 0))(p, pis)
    k = np.arange(len(ts))
    return np.asarray(avg[k, idx].mean(-1)), np.asarray(last[k, idx].mean(-1))
  if name == "omd":
    pis = dynamics.run_omd(p, logp_init, config.omd.eta, num_rounds)
  elif name == "onpo":
    pis = dynamics.run_onpo(p, logp_init, config.onpo.eta, num_rounds)
  elif name == "inpo":
    pis = dynamics.run_inpo(p, logp_init, logp_init, config.inpo.tau, config.inpo.eta_inpo,
                            num_rounds)
  elif name == "nash_md":
    pis = dynamics.run_nash_md(p, logp_init, logp_init, config.nash_md.tau, config.nash_md.eta,
                               num_rounds)
  elif name == "extragradient":
    pis = dynamics.run_extragradient(p, logp_init, logp_init, config.extragradient.tau,
                                     config.extragradient.eta, num_rounds)
  else:
    raise ValueError(f"config.methods has unknown method {name!r}; expected one of {METHODS}")
  avg = dynamics.average_iterate_gaps(p, pis)[idx].mean(-1)
  last = dynamics.last_iterate_gaps(p, pis)[idx].mean(-1)
  return np.asarray(avg), np.asarray(last)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every configured dynamics on the configured game and writes results.

  Writes into `workdir`: metrics.jsonl and tb/ (per logged T: `<method>/avg_gap`,
  `<method>/last_gap`), summary.json (slopes, gaps at powers of ten), game.npz
  (P, LP Nash, game value), gap_vs_T.png and last_gap_vs_T.png.

  Args:
    config: see configs/tabular.py.
    workdir: output directory.

  Returns:
    The summary dict (also in summary.json).
  """
  for m in config.methods:
    if m not in METHODS:
      raise ValueError(f"config.methods has unknown method {m!r}; expected one of {METHODS}")
  if config.dtype not in ("float32", "float64"):
    raise ValueError(f"config.dtype must be 'float32' or 'float64', got {config.dtype!r}")
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with jax.enable_x64(config.dtype == "float64"):
    dtype = jnp.dtype(config.dtype)
    p = _build_game(config, dtype)
    nash_pi, nash_value = exact.nash_lp(p)
    logp_init = _initial_logp(config, dtype)
    ts = eval_rounds(config.num_rounds, config.num_eval_points)
    curves = {m: _method_gaps(m, config, p, logp_init, ts) for m in config.methods}
  np.savez(os.path.join(workdir, "game.npz"), preference=np.asarray(p), nash_policy=nash_pi,
           game_value=nash_value)

  summary: dict[str, Any] = {
      "game": config.game, "num_actions": config.num_actions,
      "num_contexts": config.num_contexts, "num_rounds": config.num_rounds,
      "seed": config.seed, "dtype": config.dtype, "init": config.init, "fit_min_rounds": config.fit_min_rounds,
      "game_value": float(np.mean(nash_value)), "methods": {},
  }
  enabled = jax.process_index() == 0
  with metrics_lib.MetricWriter(workdir, enabled=enabled) as writer:
    for i, t in enumerate(ts):
      row = {}
      for m, (avg, last) in curves.items():
        row[f"{m}/avg_gap"] = float(avg[i])
        row[f"{m}/last_gap"] = float(last[i])
      writer.write(int(t), row)
    for m, (avg, last) in curves.items():
      summary["methods"][m] = {
          "slope_avg": fit_loglog_slope(ts, avg, config.fit_min_rounds),
          "slope_last": fit_loglog_slope(ts, last, config.fit_min_rounds),
          "avg_gap": {str(t): float(avg[list(ts).index(t)]) for t in _TABLE_T if t in ts},
          "last_gap": {str(t): float(last[list(ts).index(t)]) for t in _TABLE_T if t in ts},
          "final_avg_gap": float(avg[-1]), "final_last_gap": float(last[-1]),
      }
    summary["seconds"] = time.time() - start
    writer.write_json("summary.json", summary)

  if enabled:
    title = f"{config.game} game, n={config.num_actions}, C={config.num_contexts}"
    plots.loglog_plot({m: (ts, c[0]) for m, c in curves.items()},
                      os.path.join(workdir, "gap_vs_T.png"), f"average iterate: {title}")
    plots.loglog_plot({m: (ts, c[1]) for m, c in curves.items()},
                      os.path.join(workdir, "last_gap_vs_T.png"), f"last iterate: {title}")
  table_t = [t for t in _TABLE_T if t in ts]
  columns = ["method"] + [f"avg@{t}" for t in table_t] + ["slope_avg", "slope_last"]
  rows = [[m] + [s["avg_gap"][str(t)] for t in table_t] + [s["slope_avg"], s["slope_last"]]
          for m, s in summary["methods"].items()]
  table = metrics_lib.format_table(rows, columns)
  print(table, flush=True)
  logging.info("tabular summary written to %s", os.path.join(workdir, "summary.json"))
  return summary
