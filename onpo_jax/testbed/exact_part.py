"""The testbed job's exact part: exact-expectation rounds next to their tabular shadows.

The exact rounds run on a smaller world than the sampled ones (the `exact`
sizes of the config), each seed on a game of its own (`world.game_config`),
in the precision `exact.dtype` (`exact_precision`). One unit of the job is one
method's T rounds for every seed at once (part 'exact': the seeds'
regressions are one vmapped solve) or one (η, method) point of the η sweep
(part 'sweep'). The results live in the job's checkpointed state, so a resumed
run reports the same numbers. docs/testbed.md §5–8 explains the method and the
tracking bound.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onpo_jax.infra import checks
from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.selfplay import methods as methods_lib
from onpo_jax.testbed import report
from onpo_jax.testbed import shadow
from onpo_jax.testbed import trajectories
from onpo_jax.testbed import world as world_lib

KEYS = ("gap", "avg_gap", "win_rate_vs_sft", "shadow_gap", "shadow_avg_gap", "tracking_kl")
ROUND_KEYS = ("residual", "grad_norm", "steps")
# The η sweep keeps, per (η, seed, method), the final gaps and the worst tracking KL.
SWEEP_KEYS = ("gap", "avg_gap", "shadow_avg_gap", "tracking_kl")
# Methods whose neural exact iterates must stay within exact.tracking_kl_bound of
# their shadows (ONPO extrapolate's step is an approximation for a network).
TRACKED = ("onpo_two_step", "omd", "inpo", "online_ipo")
SWEEPABLE = ("onpo_two_step", "onpo_extrapolate", "omd")  # the methods whose step is η


def num_responses(vocab_size: int, length: int, cap: int) -> int:
  """|Y| = V^L, or `cap + 1` once it exceeds `cap`.

  A corrupt length (say 2**31 - 1) must not make validation compute a power
  with billions of digits.
  """
  if vocab_size <= 1:
    return 1
  n = 1
  for _ in range(length):
    n *= vocab_size
    if n > cap:
      return cap + 1
  return n


def validate(config: ml_collections.ConfigDict, need: Callable, max_responses: int) -> None:
  """Checks the `exact` fields (when enabled); `need(cond, field, expected, value)` raises."""
  ex = config.exact
  need(isinstance(ex.enabled, bool), "exact.enabled", "True or False", ex.enabled)
  if not ex.enabled:
    return
  is_int, is_real, is_names = methods_lib.is_int, checks.is_real, methods_lib.is_names
  need(is_names(ex.methods) and len(ex.methods) >= 1 and len(set(ex.methods)) == len(ex.methods)
       and all(m in shadow.SHADOW_METHODS for m in ex.methods),
       "exact.methods", f"a non-empty tuple of {shadow.SHADOW_METHODS} without duplicates",
       ex.methods)
  for field in ("num_rounds", "max_steps", "vocab_size", "response_length", "num_prompts",
                "stall_steps"):
    need(is_int(ex[field], 1), f"exact.{field}", "an integer >= 1 (below 2**31)", ex[field])
  need(ex.dtype in ("float32", "float64"), "exact.dtype", "'float32' or 'float64'", ex.dtype)
  need(is_real(ex.tol) and ex.tol > 0, "exact.tol", "a gradient-norm tolerance > 0", ex.tol)
  need(is_real(ex.residual_tol) and ex.residual_tol > 0, "exact.residual_tol",
       "a residual tolerance > 0", ex.residual_tol)
  need(is_real(ex.tracking_kl_bound) and 0 < ex.tracking_kl_bound < 1, "exact.tracking_kl_bound",
       "a KL bound in (0, 1) nats (KL of 1 nat is no tracking at all)", ex.tracking_kl_bound)
  grid = ex.eta_grid
  need(isinstance(grid, (tuple, list)) and all(is_real(e) and 0 < e <= 100 for e in grid)
       and len(set(grid)) == len(grid), "exact.eta_grid",
       "distinct step sizes η in (0, 100] (an empty tuple: no sweep)", grid)
  need(is_names(ex.sweep_methods) and len(ex.sweep_methods) >= 1
       and len(set(ex.sweep_methods)) == len(ex.sweep_methods)
       and all(m in SWEEPABLE for m in ex.sweep_methods),
       "exact.sweep_methods", f"a non-empty tuple of {SWEEPABLE} without duplicates (the "
       "methods whose step is η)", ex.sweep_methods)
  need(num_responses(ex.vocab_size, ex.response_length, max_responses) <= max_responses,
       "exact.response_length", f"V^L <= {max_responses} enumerable responses",
       ex.response_length)


def exact_config(config: ml_collections.ConfigDict, seed: int, eta=None
                 ) -> ml_collections.ConfigDict:
  """The config of seed `seed`'s exact-mode world: the `exact` sizes, its own game.

  Exact rounds draw nothing, so their seeds always vary the game. `eta` (the
  sweep) sets ONPO's η and OMD's step 1/η_I to the same η.
  """
  c = world_lib.game_config(config, seed)
  if eta is not None:
    c.onpo.eta, c.omd.eta_inpo = float(eta), 1.0 / float(eta)
  ex = config.exact
  c.testbed.vocab_size = c.oracle.vocab_size = c.model.vocab_size = ex.vocab_size
  c.testbed.response_length = ex.response_length
  c.testbed.num_prompts = ex.num_prompts
  c.model.dtype = ex.dtype
  c.selfplay.methods = tuple(dict.fromkeys(tuple(ex.methods) + tuple(ex.sweep_methods)))
  return c


def exact_precision(config):
  """The exact rounds' numerical context: JAX's x64 mode when `exact.dtype` is float64.

  Build and run everything of the exact rounds (`exact_starts`, `exact_rounds`)
  inside it.
  """
  return jax.enable_x64(True) if config.exact.dtype == "float64" else contextlib.nullcontext()


def exact_starts(config) -> list[world_lib.Start]:
  """Every seed's exact-mode game and SFT start (deterministic: rebuilt on resume).

  The SFT fit runs in float32, as in sampled mode, and its parameters are then
  cast to `exact.dtype`: a fit in float64 lands elsewhere, and on the default
  games some of its later regressions are far harder to solve.
  """
  starts = []
  for seed in range(int(config.seeds)):
    ec = exact_config(config, seed)
    fit = ec.copy_and_resolve_references()
    fit.model.dtype = "float32"
    params = world_lib.sft_start(fit, world_lib.Testbed(fit)).sft_params
    world = world_lib.Testbed(ec)
    params = jax.tree.map(lambda x: jnp.asarray(x, world.model_config.jnp_param_dtype), params)
    starts.append(world_lib.Start(world, params, world.table_fn(params)))
  return starts


def exact_rounds(config, graphdef, eta=None) -> trajectories.ExactRounds:
  """The exact rounds of the config's methods (at step size `eta` for the sweep)."""
  ex = config.exact
  return trajectories.ExactRounds(exact_config(config, 0, eta=eta), graphdef, tol=ex.tol,
                                  max_steps=ex.max_steps, residual_tol=ex.residual_tol,
                                  stall_steps=ex.stall_steps)


def units(config) -> list[tuple[str, int, int]]:
  """(part, η index or -1, method index) of every exact unit of the job."""
  if not config.exact.enabled:
    return []
  ex = config.exact
  return ([("exact", -1, mi) for mi in range(len(ex.methods))]
          + [("sweep", ei, mi) for ei in range(len(ex.eta_grid))
             for mi in range(len(ex.sweep_methods))])


def initial_state(config) -> dict:
  """The exact part's entries of the job's checkpointed state (shapes fixed by the config)."""
  if not config.exact.enabled:
    return {}
  ex, s = config.exact, int(config.seeds)
  me, te = len(ex.methods), int(ex.num_rounds)
  state = {"exact": {k: np.zeros((s, me, te + 1)) for k in KEYS}}
  state["exact"].update({k: np.zeros((s, me, te)) for k in ROUND_KEYS})
  ne, ms = len(ex.eta_grid), len(ex.sweep_methods)
  if ne:  # orbax stores no zero-size arrays
    state["sweep"] = {k: np.zeros((ne, s, ms)) for k in SWEEP_KEYS}
  return state


class ExactPart:
  """Runs the job's exact units; every seed's start and each η's rounds are built once.

  Args:
    config: the job's config.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._starts = []
    self._rounds = {}  # η of the sweep (None: the config's own) -> ExactRounds

  def _rounds_for(self, eta):
    cfg = self.config
    if eta is not None and eta == float(cfg.onpo.eta) and 1.0 / eta == float(cfg.omd.eta_inpo):
      eta = None  # the config's own step sizes: the compiled main engine serves
    if eta not in self._rounds:
      self._rounds[eta] = exact_rounds(cfg, self._starts[0].world.graphdef, eta=eta)
    return self._rounds[eta]

  def __call__(self, writer, unit: int, part: str, eta_index: int, mi: int, state: dict):
    """Runs unit `unit`; returns (state, final metrics, metric lines written, message)."""
    cfg = self.config
    with exact_precision(cfg):
      if not self._starts:
        self._starts = exact_starts(cfg)
      eta = float(cfg.exact.eta_grid[eta_index]) if part == "sweep" else None
      name = (cfg.exact.sweep_methods if part == "sweep" else cfg.exact.methods)[mi]
      outs = self._rounds_for(eta).run(self._starts, name, int(cfg.exact.num_rounds))
    if part == "sweep":
      for i, out in enumerate(outs):
        for k in SWEEP_KEYS:
          state["sweep"][k][eta_index, i, mi] = (out[k][-1] if k != "tracking_kl"
                                                 else np.max(np.abs(out[k])))
      name = f"{name}/eta{eta:g}"
    else:
      for i, out in enumerate(outs):
        for k in KEYS + ROUND_KEYS:
          state["exact"][k][i, mi] = out[k]
    metrics = {}
    for i, out in enumerate(outs):
      metrics.update(report.write_rounds(writer, f"{part}/{name}/seed{i}/", out["rounds"], unit))
    gaps = [out["avg_gap"][-1] for out in outs]
    kl = max(float(np.max(np.abs(out["tracking_kl"]))) for out in outs)
    message = (f"{part} {name}, {len(outs)} seeds: final average-iterate gap "
               f"{np.mean(gaps):.4f} (mean), max |KL(neural ‖ shadow)| {kl:.1e}")
    return state, metrics, len(outs[0]["rounds"]) * len(outs), message


def summarize(config, state: dict, workdir: str, writer, after_unit: int) -> dict:
  """The exact part's summary entries; prints its tables, writes its PNGs and curves."""
  methods = list(config.exact.methods)
  arrays = state["exact"]
  per_method = report.curves(arrays, methods, KEYS)
  avg_slopes = report.slopes(arrays, methods, "avg_gap")
  last_slopes = report.slopes(arrays, methods, "gap")
  shadow_slopes = report.slopes(arrays, methods, "shadow_avg_gap")
  bound = float(config.exact.tracking_kl_bound)
  for i, m in enumerate(methods):
    e = per_method[m]
    e["slope_avg"], e["slope_last"] = avg_slopes[m], last_slopes[m]
    e["shadow_slope_avg"] = shadow_slopes[m]
    for k in ROUND_KEYS:
      e[f"{k}_max"] = float(np.max(arrays[k][:, i]))
    e["tracking_kl_max"] = float(np.max(np.abs(arrays["tracking_kl"][:, i])))
    e["tracking_bound"] = bound if m in TRACKED else None
  summary = {"exact": per_method,
             # Seed s of every method plays game s from its SFT table: paired.
             "exact_comparisons": {"avg_gap": report.comparisons(arrays, methods, "avg_gap",
                                                                 methods[0], paired=True)}}
  te = int(config.exact.num_rounds)
  shown = sorted({1, te // 2, te})
  report.print_table(f"Exact rounds (|Y| = {config.exact.vocab_size ** config.exact.response_length}"
                     f", {config.exact.num_prompts} prompts, a game per seed), average-iterate "
                     "gap:", per_method, "avg_gap", shown)
  report.print_table("Exact rounds, KL(neural ‖ tabular shadow):", per_method, "tracking_kl",
                     shown)
  print("\nExact rounds, fitted log-log slopes over rounds 1..T (mean ± 95% CI):")
  ci = lambda s: f"{s['mean']:.3f} ± {s['ci95']:.3f}"
  print(metrics_lib.format_table(
      [[m, ci(e["slope_avg"]), ci(e["shadow_slope_avg"]), ci(e["slope_last"]),
        f"{e['residual_max']:.2e}"] for m, e in per_method.items()],
      ["method", "slope avg (neural)", "slope avg (tabular)", "slope last (neural)",
       "max residual"]))
  print(f"\nFinal average-iterate gap, {methods[0]} vs each method (paired t-test over the "
        f"{config.seeds} games, 95%):")
  print("\n".join(report.describe(summary["exact_comparisons"]["avg_gap"], "avg_gap",
                                  methods[0])))
  print(f"\nTracking: max |KL(neural ‖ shadow)| over {te} rounds and {config.seeds} seeds "
        f"(bound {bound:g} for {', '.join(TRACKED)}):")
  for m, e in per_method.items():
    kl = e["tracking_kl_max"]
    verdict = ("within the bound" if kl <= bound else "ABOVE the bound") if m in TRACKED else (
        "no bound: a parameter-space extrapolation, not the tabular step")
    print(f"  {m}: {kl:.2e} ({verdict})")
  report.plot_exact(per_method, workdir)
  if len(config.exact.eta_grid):
    summary["eta_sweep"] = report.sweep(state["sweep"], config.exact.eta_grid,
                                        list(config.exact.sweep_methods))
    report.print_sweep(summary["eta_sweep"], te)
    report.plot_sweep(summary["eta_sweep"], workdir, te)
  report.write_curves(writer, "exact", per_method, after_unit)
  return summary
