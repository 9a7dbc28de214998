"""The main job: ONPO and its baselines on the exact-evaluation testbed, over seeds.

    python -m experiments.run --config=configs/default.py --workdir=runs/default

`run(config, workdir)` (registered as experiment 'selfplay'):
  1. builds the testbed world (`onpo_jax.testbed.world`): C prompts, all
     |Y| = V^L responses, the synthetic oracle and its full preference matrix
     [C, |Y|, |Y|], the per-prompt exact Nash (LP) for reference; then SFT
     (unit 1), the start of every method;
  2. sampled rounds: for each of `seeds` seeds and each method, T rounds on the
     self-play engine with the testbed backend (sampling, oracle, pairs,
     losses, `onpo_step`), with the exact gap, average-iterate gap, win rate vs
     SFT and cumulative oracle queries after every round
     (`trajectories.sampled`);
  3. exact rounds (`config.exact`): for each seed (a game of its own) and each
     method, T rounds whose loss is the exact expectation over the enumerated
     responses, solved full batch, next to the tabular shadow of the same game
     (`trajectories.ExactRounds`);
  4. at the end: means and 95% intervals over seeds, fitted log-log slopes,
     Welch tests of ONPO against each method (`report`), `summary.json`,
     PNGs (gap vs round and vs oracle queries with interval bands, exact
     log-log curves with their shadows, the win-rate matrix) and TensorBoard.

One unit of work is one trajectory (a method's T rounds for one seed): after
each the loop (`onpo_jax.selfplay.loop.UnitLoop`) writes metrics and an orbax
checkpoint of the per-seed results, so a killed run resumes after its last
finished trajectory and ends with the same summary. All randomness derives from
`config.seed`, the seed index, the round and the method.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import plots
from onpo_jax.infra.compilation_cache import enable_compilation_cache
from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay import methods as methods_lib
from onpo_jax.selfplay.engine import Engine
from onpo_jax.testbed import evaluation
from onpo_jax.testbed import report
from onpo_jax.testbed import shadow
from onpo_jax.testbed import trajectories
from onpo_jax.testbed.backend import TestbedBackend
from onpo_jax.testbed.world import sft_fit
from onpo_jax.testbed.world import Testbed

MAX_RESPONSES = 4096  # |Y| = V^L above this makes exact evaluation too slow on CPU


def _need(cond: bool, field: str, expected: str, value: Any) -> None:
  if not cond:
    raise ValueError(f"config.{field}: expected {expected}; got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field before any work; ValueError names the offending field."""
  _need(config.get("experiment") == "selfplay", "experiment", "'selfplay'",
        config.get("experiment"))
  tb, mc, oc, sp = config.testbed, config.model, config.oracle, config.selfplay
  for field, val in (("testbed.vocab_size", tb.vocab_size),
                     ("testbed.response_length", tb.response_length),
                     ("testbed.prompt_length", tb.prompt_length),
                     ("testbed.num_prompts", tb.num_prompts),
                     ("sft.num_steps", config.sft.num_steps),
                     ("sft.batch_size", config.sft.batch_size),
                     ("selfplay.num_rounds", sp.num_rounds),
                     ("selfplay.prompts_per_round", sp.prompts_per_round),
                     ("selfplay.epochs", sp.epochs),
                     ("selfplay.minibatch_size", sp.minibatch_size)):
    _need(isinstance(val, int) and val >= 1, field, "an integer >= 1", val)
  methods_lib.validate_selfplay(sp, _need,
                           num_samples_expected="K >= 2 responses per prompt (pairs need two)")
  _need(mc.dtype == "float32", "model.dtype",
        "'float32' (the exact rounds have their own precision, exact.dtype)", mc.dtype)
  _need(isinstance(sp.vary_game, bool), "selfplay.vary_game", "True or False", sp.vary_game)
  _need(sp.logp_reduction in ("sum", "mean"), "selfplay.logp_reduction", "'sum' or 'mean'",
        sp.logp_reduction)
  _need(sp.init_from in ("anchor", "policy"), "selfplay.init_from", "'anchor' or 'policy'",
        sp.init_from)
  for field, val in (("selfplay.learning_rate", sp.learning_rate),
                     ("selfplay.temperature", sp.temperature),
                     ("sft.learning_rate", config.sft.learning_rate),
                     ("testbed.start_temperature", tb.start_temperature),
                     ("onpo.eta", config.onpo.eta), ("omd.eta_inpo", config.omd.eta_inpo),
                     ("inpo.eta_inpo", config.inpo.eta_inpo), ("sppo.beta", config.sppo.beta),
                     ("dpo.beta", config.dpo.beta), ("online_ipo.beta", config.online_ipo.beta),
                     ("oracle.strength", oc.strength)):
    _need(val > 0, field, "a value > 0", val)
  _need(0 <= config.inpo.tau < config.inpo.eta_inpo, "inpo.tau",
        f"0 <= τ < inpo.eta_inpo = {config.inpo.eta_inpo}", config.inpo.tau)
  _need(0 <= config.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "ε in [0, 0.5)",
        config.dpo.label_smoothing)
  _need(0 <= config.nash_md.alpha <= 1, "nash_md.alpha", "α in [0, 1]", config.nash_md.alpha)
  _need(config.nash_md.beta >= 0, "nash_md.beta", "β >= 0", config.nash_md.beta)
  _need(oc.kind in ("synthetic", "bt"), "oracle.kind", "'synthetic' or 'bt'", oc.kind)
  _need(0 <= oc.cyclic <= 1, "oracle.cyclic", "κ in [0, 1]", oc.cyclic)
  _need(oc.vocab_size == mc.vocab_size, "oracle.vocab_size",
        f"the policy's vocabulary size model.vocab_size = {mc.vocab_size}", oc.vocab_size)
  _need(tb.vocab_size == mc.vocab_size, "testbed.vocab_size",
        f"the policy's vocabulary size model.vocab_size = {mc.vocab_size} (the policy can "
        "only emit response tokens)", tb.vocab_size)
  _need(tb.prompt_length + tb.response_length <= mc.max_position_embeddings,
        "model.max_position_embeddings",
        f">= prompt_length + response_length = {tb.prompt_length + tb.response_length}",
        mc.max_position_embeddings)
  _need(tb.vocab_size ** tb.response_length <= MAX_RESPONSES, "testbed.response_length",
        f"V^L <= {MAX_RESPONSES} responses for exact evaluation (V = {tb.vocab_size}; "
        f"the exact tables and P[C, |Y|, |Y|] would need "
        f"{4 * tb.num_prompts * (tb.vocab_size ** tb.response_length) ** 2 / 2**30:.1f} GiB)",
        tb.response_length)
  _need(isinstance(config.seeds, int) and config.seeds >= 2, "seeds",
        "an integer >= 2 (a mean over seeds with a 95% interval needs two)", config.seeds)
  ex = config.exact
  if ex.enabled:
    _need(len(ex.methods) >= 1 and all(m in shadow.SHADOW_METHODS for m in ex.methods),
          "exact.methods", f"a non-empty tuple of {shadow.SHADOW_METHODS}", tuple(ex.methods))
    for field in ("num_rounds", "max_steps", "vocab_size", "response_length", "num_prompts"):
      _need(isinstance(ex[field], int) and ex[field] >= 1, f"exact.{field}", "an integer >= 1",
            ex[field])
    _need(isinstance(ex.stall_steps, int) and ex.stall_steps >= 1, "exact.stall_steps",
          "an integer >= 1", ex.stall_steps)
    _need(ex.dtype in ("float32", "float64"), "exact.dtype", "'float32' or 'float64'", ex.dtype)
    _need(ex.tol > 0, "exact.tol", "a gradient-norm tolerance > 0", ex.tol)
    _need(ex.residual_tol > 0, "exact.residual_tol", "a residual tolerance > 0",
          ex.residual_tol)
    _need(0 < ex.tracking_kl_bound < 1, "exact.tracking_kl_bound",
          "a KL bound in (0, 1) nats (KL of 1 nat is no tracking at all)", ex.tracking_kl_bound)
    grid = tuple(ex.eta_grid)
    _need(all(isinstance(e, (int, float)) and 0 < e <= 100 for e in grid)
          and len(set(grid)) == len(grid), "exact.eta_grid",
          "distinct step sizes η in (0, 100] (an empty tuple: no sweep)", grid)
    _need(len(ex.sweep_methods) >= 1 and all(m in ("onpo_two_step", "onpo_extrapolate", "omd")
                                             for m in ex.sweep_methods),
          "exact.sweep_methods", "a non-empty tuple of 'onpo_two_step', 'onpo_extrapolate', "
          "'omd' (the methods whose step is η)", tuple(ex.sweep_methods))
    _need(ex.vocab_size ** ex.response_length <= MAX_RESPONSES, "exact.response_length",
          f"V^L <= {MAX_RESPONSES} enumerable responses", ex.response_length)


def game_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The config of seed `seed`'s own game: oracle, prompts and SFT start from its own key."""
  c = config.copy_and_resolve_references()
  c.seed = int(config.seed) + 1 + seed
  return c


def exact_config(config: ml_collections.ConfigDict, seed: int, eta=None
                 ) -> ml_collections.ConfigDict:
  """The config of seed `seed`'s exact-mode world: the `exact` sizes, its own game.

  Exact rounds draw nothing, so their seeds always vary the game. `eta` (the
  sweep) sets ONPO's η and OMD's step 1/η_I to the same η.
  """
  c = game_config(config, seed)
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


def _sft_start(config, world: Testbed) -> trajectories.Start:
  params, _ = sft_fit(world.graphdef, world.init_params, world.prompt_tokens, world.prompt_mask,
                      world.responses, world.logp_start, world.k_sft,
                      num_steps=config.sft.num_steps, batch_size=config.sft.batch_size,
                      learning_rate=config.sft.learning_rate)
  return trajectories.Start(world, params, world.table_fn(params))


def exact_starts(config) -> list[trajectories.Start]:
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
    params = _sft_start(fit, Testbed(fit)).sft_params
    world = Testbed(ec)
    params = jax.tree.map(lambda x: jnp.asarray(x, world.model_config.jnp_param_dtype), params)
    starts.append(trajectories.Start(world, params, world.table_fn(params)))
  return starts


def exact_rounds(config, graphdef, eta=None) -> trajectories.ExactRounds:
  """The exact rounds of the config's methods (at step size `eta` for the sweep)."""
  ex = config.exact
  return trajectories.ExactRounds(exact_config(config, 0, eta=eta), graphdef, tol=ex.tol,
                                  max_steps=ex.max_steps, residual_tol=ex.residual_tol,
                                  stall_steps=ex.stall_steps)


def _units(config) -> list[tuple[str, int, int]]:
  """(part, seed or η index, method index) of every unit after unit 1 (the SFT)."""
  seeds = range(int(config.seeds))
  units = [("sampled", s, mi) for s in seeds for mi in range(len(config.selfplay.methods))]
  if config.exact.enabled:  # exact trajectories run every seed at once (vmapped)
    units += [("exact", -1, mi) for mi in range(len(config.exact.methods))]
    units += [("sweep", ei, mi) for ei in range(len(config.exact.eta_grid))
              for mi in range(len(config.exact.sweep_methods))]
  return units


SAMPLED_KEYS = ("gap", "avg_gap", "win_rate_vs_sft", "oracle_queries")
EXACT_KEYS = ("gap", "avg_gap", "win_rate_vs_sft", "shadow_gap", "shadow_avg_gap",
              "tracking_kl")
EXACT_ROUND_KEYS = ("residual", "grad_norm", "steps")
# The η sweep keeps, per (η, seed, method), the final gaps and the worst tracking KL.
SWEEP_KEYS = ("gap", "avg_gap", "shadow_avg_gap", "tracking_kl")
# Methods whose neural exact iterates must stay within exact.tracking_kl_bound of
# their shadows (ONPO extrapolate's step is an approximation for a network).
TRACKED = ("onpo_two_step", "omd", "inpo", "online_ipo")


def _write_rounds(loop, prefix: str, rounds: list[dict], unit: int) -> dict:
  """Writes a trajectory's per-round lines but the last; returns the last round's metrics.

  The lines carry the unit: a resume that redoes it drops them first.
  """
  for t, m in enumerate(rounds[:-1]):
    loop.writer.write(t + 1, {prefix + k: float(v) for k, v in m.items()} | {"unit": unit + 1})
  return {prefix + k: float(v) for k, v in rounds[-1].items()}


def _exact_unit_metrics(loop, part: str, name: str, outs: list[dict], unit: int) -> tuple:
  """Per-round lines of every seed, the unit's final metrics, rounds and message."""
  metrics = {}
  for i, out in enumerate(outs):
    metrics.update(_write_rounds(loop, f"{part}/{name}/seed{i}/", out["rounds"], unit))
  gaps = [out["avg_gap"][-1] for out in outs]
  kl = max(float(np.max(np.abs(out["tracking_kl"]))) for out in outs)
  message = (f"{part} {name}, {len(outs)} seeds: final average-iterate gap "
             f"{np.mean(gaps):.4f} (mean), max |KL(neural ‖ shadow)| {kl:.1e}")
  return metrics, len(outs[0]["rounds"]) * len(outs), message


def _initial_state(config, world: Testbed) -> dict:
  """The checkpointed state of a run before SFT (shapes fixed by the config)."""
  s, m, t = int(config.seeds), len(config.selfplay.methods), int(config.selfplay.num_rounds)
  n_y, c = world.responses.shape[0], world.prompt_tokens.shape[0]
  state = {
      "sft_params": world.init_params,
      "sft_table": jnp.zeros((c, n_y), jnp.float32),
      "sampled": {k: np.zeros((s, m, t + 1)) for k in SAMPLED_KEYS},
      "final_tables": np.zeros((s, m, c, n_y), np.float32),
      "nash_gap": np.zeros((), np.float32),
  }
  if config.exact.enabled:
    me, te = len(config.exact.methods), int(config.exact.num_rounds)
    state["exact"] = {k: np.zeros((s, me, te + 1)) for k in EXACT_KEYS}
    state["exact"].update({k: np.zeros((s, me, te)) for k in EXACT_ROUND_KEYS})
    ne, ms = len(config.exact.eta_grid), len(config.exact.sweep_methods)
    if ne:  # orbax stores no zero-size arrays
      state["sweep"] = {k: np.zeros((ne, s, ms)) for k in SWEEP_KEYS}
  return state


def _write_curves(writer, part: str, per_method: dict, after_unit: int) -> None:
  """The mean and interval curves as metrics (TensorBoard), one step per round.

  Tagged with a unit past the last trajectory, so a resume drops and redoes them.
  """
  num = len(next(iter(per_method.values()))["gap_mean"])
  for t in range(num):
    writer.write(t, {f"{part}/{m}/{k}": float(v[t]) for m, e in per_method.items()
                     for k, v in e.items() if isinstance(v, list) and len(v) == num}
                 | {"unit": after_unit + 1})


def _finalize(config, games, state: dict, workdir: str, writer, total_units: int) -> dict:
  """summary.json content, printed tables, PNGs and the curves in TensorBoard.

  `games(s)` is seed s's sampled-mode start (its world and SFT table).
  """
  methods = list(config.selfplay.methods)
  t_rounds = int(config.selfplay.num_rounds)
  sampled = state["sampled"]
  per_method = report.curves(sampled, methods, SAMPLED_KEYS)
  for m, e in per_method.items():  # the budget axis: cumulative oracle queries per round
    e["oracle_queries"] = e.pop("oracle_queries_mean")
    del e["oracle_queries_ci95"]
  names = ["sft"] + methods
  wr = np.mean([np.asarray(evaluation.win_rate_matrix(games(s).world.pref, jnp.concatenate(
      [games(s).sft_table[None], jnp.asarray(state["final_tables"][s])])))
                for s in range(int(config.seeds))], axis=0)
  summary = {
      "seeds": int(config.seeds),
      "vary_game": bool(config.selfplay.vary_game),
      "methods": methods,
      "gap": {m: e["gap_mean"] for m, e in per_method.items()},
      "win_rate_vs_sft": {m: e["win_rate_mean"] for m, e in per_method.items()},
      "oracle_queries": {m: e["oracle_queries"][-1] for m, e in per_method.items()},
      "win_rate_matrix": {"labels": names, "matrix": wr.tolist()},
      "sft_gap": float(np.mean(sampled["gap"][:, 0, 0])),  # mean over the seeds' games
      "nash_gap": float(state["nash_gap"]),
      "sampled": per_method,
      "sampled_comparisons": {
          "gap": report.comparisons(sampled, methods, "gap", methods[0]),
          "win_rate_vs_sft": report.comparisons(sampled, methods, "win_rate_vs_sft", methods[0])},
  }
  rounds = sorted({0, t_rounds // 2, t_rounds})
  report.print_table(f"Sampled rounds, exact duality gap (mean ± 95% CI over {config.seeds} "
                     "seeds):", per_method, "gap", rounds)
  report.print_table("Sampled rounds, win rate vs SFT:", per_method, "win_rate", rounds)
  print("\nFinal gap, " + methods[0] + " vs each method (Welch t-test, 95%):")
  print("\n".join(report.describe(summary["sampled_comparisons"]["gap"], "gap", methods[0])))
  print("\nHead-to-head win rate J(row, column) of the final policies (mean over seeds):")
  print(metrics_lib.format_table([[names[i]] + list(wr[i]) for i in range(len(names))],
                                 ["policy"] + names))
  report.plot_sampled(per_method, workdir)
  _write_curves(writer, "sampled", per_method, total_units)
  plots.heatmap(wr, names, os.path.join(workdir, "win_rate_matrix.png"),
                "win rate J(row, column), mean over seeds")
  if config.exact.enabled:
    ex_methods = list(config.exact.methods)
    exact_arrays = state["exact"]
    per_exact = report.curves(exact_arrays, ex_methods, EXACT_KEYS)
    avg_slopes = report.slopes(exact_arrays, ex_methods, "avg_gap")
    last_slopes = report.slopes(exact_arrays, ex_methods, "gap")
    shadow_slopes = report.slopes(exact_arrays, ex_methods, "shadow_avg_gap")
    for i, m in enumerate(ex_methods):
      e = per_exact[m]
      e["slope_avg"], e["slope_last"] = avg_slopes[m], last_slopes[m]
      e["shadow_slope_avg"] = shadow_slopes[m]
      for k in EXACT_ROUND_KEYS:
        e[f"{k}_max"] = float(np.max(exact_arrays[k][:, i]))
    summary["exact"] = per_exact
    summary["exact_comparisons"] = {
        "avg_gap": report.comparisons(exact_arrays, ex_methods, "avg_gap", ex_methods[0])}
    te = int(config.exact.num_rounds)
    report.print_table(f"Exact rounds (|Y| = {config.exact.vocab_size ** config.exact.response_length}"
                       f", {config.exact.num_prompts} prompts, a game per seed), average-iterate "
                       "gap:", per_exact, "avg_gap", sorted({1, te // 2, te}))
    report.print_table("Exact rounds, KL(neural ‖ tabular shadow):", per_exact, "tracking_kl",
                       sorted({1, te // 2, te}))
    print("\nExact rounds, fitted log-log slopes over rounds 1..T (mean ± 95% CI):")
    print(metrics_lib.format_table(
        [[m, f"{e['slope_avg']['mean']:.3f} ± {e['slope_avg']['ci95']:.3f}",
          f"{e['shadow_slope_avg']['mean']:.3f} ± {e['shadow_slope_avg']['ci95']:.3f}",
          f"{e['slope_last']['mean']:.3f} ± {e['slope_last']['ci95']:.3f}",
          f"{e['residual_max']:.2e}"] for m, e in per_exact.items()],
        ["method", "slope avg (neural)", "slope avg (tabular)", "slope last (neural)",
         "max residual"]))
    print("\n".join(report.describe(summary["exact_comparisons"]["avg_gap"], "avg_gap",
                                    ex_methods[0])))
    bound = float(config.exact.tracking_kl_bound)
    print(f"\nTracking: max |KL(neural ‖ shadow)| over {te} rounds and {config.seeds} seeds "
          f"(bound {bound:g} for {', '.join(TRACKED)}):")
    for i, m in enumerate(ex_methods):
      kl = float(np.max(np.abs(exact_arrays["tracking_kl"][:, i])))
      e = per_exact[m]
      e["tracking_kl_max"] = kl
      e["tracking_bound"] = bound if m in TRACKED else None
      verdict = ("within the bound" if kl <= bound else "ABOVE the bound") if m in TRACKED else (
          "no bound: a parameter-space extrapolation, not the tabular step")
      print(f"  {m}: {kl:.2e} ({verdict})")
    report.plot_exact(per_exact, workdir)
    if len(config.exact.eta_grid):
      summary["eta_sweep"] = report.sweep(state["sweep"], config.exact.eta_grid,
                                          list(config.exact.sweep_methods))
      report.print_sweep(summary["eta_sweep"], te)
      report.plot_sweep(summary["eta_sweep"], workdir, te)
    _write_curves(writer, "exact", per_exact, total_units)
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the self-play experiment; returns the summary dict."""
  validate_config(config)
  if config.get("compilation_cache_dir", ""):
    enable_compilation_cache(config.compilation_cache_dir)
  methods = tuple(config.selfplay.methods)
  units = _units(config)
  loop = loop_lib.UnitLoop(workdir, label="selfplay", total_units=1 + len(units),
                           max_to_keep=config.checkpoint.max_to_keep,
                           log_every_seconds=config.log_every_seconds)
  summary = loop.finished_summary()
  if summary is not None:
    return summary

  world = Testbed(config)
  tb = config.testbed
  backend = TestbedBackend(
      world.graphdef, world.model_config, world.oracle, response_length=tb.response_length,
      prompt_length=tb.prompt_length, temperature=config.selfplay.temperature,
      reduction=config.selfplay.logp_reduction, tournament_mode=config.selfplay.tournament_mode)
  engine = Engine(backend, config)
  state, unit, _ = loop.restore(_initial_state(config, world))
  state["sft_params"] = jax.tree.map(jnp.asarray, state["sft_params"])
  state["sft_table"] = jnp.asarray(state["sft_table"])
  starts = []  # exact-mode SFT starts per seed
  rounds_by_eta = {}  # exact rounds per η of the sweep (None: the config's η)
  vary = bool(config.selfplay.vary_game)
  games = {}  # vary_game: seed -> (its SFT start, the engine judging with its oracle)

  def sampled_game(s: int, state: dict):
    """Seed s's sampled-mode start and engine: the shared game, or its own."""
    if not vary:
      return trajectories.Start(world, state["sft_params"], state["sft_table"]), engine
    if s not in games:  # rebuilt deterministically on resume, as the exact starts are
      gc = game_config(config, s)
      start = _sft_start(gc, Testbed(gc))
      games[s] = (start, engine.with_backend(backend.with_oracle(start.world.oracle)))
    return games[s]

  def exact_unit(unit: int, part: str, s: int, mi: int, state: dict):
    """An exact-mode trajectory (part 'exact') or η-sweep point ('sweep') of every seed."""
    if not starts:
      starts.extend(exact_starts(config))
    eta = float(config.exact.eta_grid[s]) if part == "sweep" else None
    names = config.exact.sweep_methods if part == "sweep" else config.exact.methods
    name = names[mi]
    if eta == float(config.onpo.eta) and 1.0 / eta == float(config.omd.eta_inpo):
      eta_key = None  # the config's own step sizes: the compiled main engine serves
    else:
      eta_key = eta
    if eta_key not in rounds_by_eta:
      rounds_by_eta[eta_key] = exact_rounds(config, starts[0].world.graphdef, eta=eta_key)
    outs = rounds_by_eta[eta_key].run(starts, name, int(config.exact.num_rounds))
    if part == "sweep":
      for i, out in enumerate(outs):
        for k in SWEEP_KEYS:
          state["sweep"][k][s, i, mi] = out[k][-1] if k != "tracking_kl" else np.max(
              np.abs(out[k]))
      name = f"{name}/eta{eta:g}"
    else:
      for i, out in enumerate(outs):
        for k in EXACT_KEYS + EXACT_ROUND_KEYS:
          state["exact"][k][i, mi] = out[k]
    return state, *_exact_unit_metrics(loop, part, name, outs, unit)

  def step(unit: int, state: dict):
    if unit == 0:
      start = _sft_start(config, world)
      m = jax.device_get(world.metrics_fn(start.sft_table, start.sft_table))
      nash_worlds = ([Testbed(game_config(config, s)) for s in range(int(config.seeds))]
                     if vary else [world])
      nash_gap = max(evaluation.nash_reference(w.pref)["gap"] for w in nash_worlds) \
          if config.eval.nash_reference else 0.0
      state["sft_params"], state["sft_table"] = start.sft_params, start.sft_table
      state["nash_gap"] = np.asarray(nash_gap, np.float32)
      print(f"selfplay: |Y| = {world.responses.shape[0]} responses x "
            f"{world.prompt_tokens.shape[0]} prompts; SFT gap {float(m['gap']):.4f}; exact Nash "
            f"gap {nash_gap:.2e}; {config.seeds} seeds"
            + (", each its own game" if vary else ""), flush=True)
      return state, {"sft/gap": float(m["gap"]), "nash/gap": nash_gap}, 0, "sft"
    part, s, mi = units[unit - 1]
    if part != "sampled":
      with exact_precision(config):
        return exact_unit(unit, part, s, mi, state)
    name = methods[mi]
    start, seed_engine = sampled_game(s, state)
    run_key = jax.random.fold_in(world.k_run, s)
    out = trajectories.sampled(seed_engine, start, name, mi, run_key,
                               int(config.selfplay.num_rounds),
                               int(config.selfplay.prompts_per_round))
    for k in SAMPLED_KEYS:
      state["sampled"][k][s, mi] = out[k]
    state["final_tables"][s, mi] = out["final_table"]
    metrics = _write_rounds(loop, f"{part}/{name}/seed{s}/", out["rounds"], unit)
    return state, metrics, len(out["rounds"]), (f"{part} {name} seed {s}: final gap "
                                                f"{out['gap'][-1]:.4f}")

  state = loop.run(state, unit, step, methods=list(methods))
  summary = _finalize(config, lambda s: sampled_game(s, state)[0], state, loop.workdir,
                      loop.writer, loop.total_units)
  loop.finish(state, summary, methods=list(methods))
  return summary
