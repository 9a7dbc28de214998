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
     t-tests of ONPO against each method (Welch; paired over the games in
     exact mode; `report`), `summary.json`,
     PNGs (gap vs round and vs oracle queries with interval bands, exact
     log-log curves with their shadows, the win-rate matrix) and TensorBoard.

One unit of work is one trajectory (a method's T rounds for one seed): after
each the loop (`onpo_jax.selfplay.loop.UnitLoop`) writes metrics and an orbax
checkpoint of the per-seed results, so a killed run resumes after its last
finished trajectory and ends with the same summary. All randomness derives from
`config.seed`, the seed index, the round and the method.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onpo_jax.infra import checks
from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import plots
from onpo_jax.infra.compilation_cache import enable_compilation_cache
from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay import methods as methods_lib
from onpo_jax.selfplay.engine import Engine
from onpo_jax.testbed import evaluation
from onpo_jax.testbed import exact_part
from onpo_jax.testbed import report
from onpo_jax.testbed import trajectories
from onpo_jax.testbed import world as world_lib
from onpo_jax.testbed.backend import TestbedBackend
from onpo_jax.testbed.world import Start
from onpo_jax.testbed.world import Testbed

MAX_RESPONSES = 4096  # |Y| = V^L above this makes exact evaluation too slow on CPU


def _need(cond: bool, field: str, expected: str, value: Any) -> None:
  if not cond:
    raise ValueError(f"config.{field}: expected {expected}; got {value!r:.200}")


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
  """The value of the dotted field `name` (e.g. 'model.vocab_size')."""
  for key in name.split("."):
    config = config[key]
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field before any work; ValueError names the offending field.

  Types first (a wrong one is named here, not by a comparison or deep in JAX),
  then ranges, then the fields that constrain each other.
  """
  is_int, is_real = methods_lib.is_int, checks.is_real
  _need(config.get("experiment") == "selfplay", "experiment", "'selfplay'",
        config.get("experiment"))
  tb, mc, oc, sp = config.testbed, config.model, config.oracle, config.selfplay
  _need(is_int(config.seed), "seed", "an integer in [0, 2**31) (the PRNG seed)", config.seed)
  for field in ("testbed.vocab_size", "testbed.response_length", "testbed.prompt_length",
                "testbed.num_prompts", "sft.num_steps", "sft.batch_size", "oracle.vocab_size",
                "oracle.feature_dim", "model.vocab_size", "model.hidden_size",
                "model.intermediate_size", "model.num_layers", "model.num_heads",
                "model.num_kv_heads", "model.head_dim", "model.max_position_embeddings",
                "checkpoint.max_to_keep"):
    _need(is_int(_field(config, field), 1), field, "an integer >= 1 (below 2**31)",
          _field(config, field))
  methods_lib.validate_selfplay(sp, _need,
                           num_samples_expected="K >= 2 responses per prompt (pairs need two)")
  methods_lib.validate_method_params(config, _need)
  _need(mc.dtype == "float32", "model.dtype",
        "'float32' (the exact rounds have their own precision, exact.dtype)", mc.dtype)
  for field in ("selfplay.vary_game", "eval.nash_reference"):
    _need(isinstance(_field(config, field), bool), field, "True or False",
          _field(config, field))
  _need(isinstance(config.get("allow_config_change", False), bool), "allow_config_change",
        "True or False", config.get("allow_config_change"))
  for field in ("sft.learning_rate", "testbed.start_temperature", "oracle.strength"):
    _need(is_real(_field(config, field)) and _field(config, field) > 0, field,
          "a finite number > 0", _field(config, field))
  _need(oc.kind in ("synthetic", "bt"), "oracle.kind", "'synthetic' or 'bt'", oc.kind)
  _need(is_real(oc.cyclic) and 0 <= oc.cyclic <= 1, "oracle.cyclic", "κ in [0, 1]", oc.cyclic)
  _need(is_real(oc.cyclic_spread) and oc.cyclic_spread >= 0, "oracle.cyclic_spread",
        "a finite number >= 0", oc.cyclic_spread)
  _need(is_real(config.log_every_seconds) and config.log_every_seconds >= 0,
        "log_every_seconds", "a finite number of seconds >= 0", config.log_every_seconds)
  _need(isinstance(config.get("compilation_cache_dir", ""), str), "compilation_cache_dir",
        "a directory path ('' = no cache)", config.get("compilation_cache_dir"))
  _need(mc.num_heads % mc.num_kv_heads == 0, "model.num_kv_heads",
        f"a divisor of model.num_heads = {mc.num_heads}", mc.num_kv_heads)
  _need(mc.head_dim % 2 == 0, "model.head_dim", "an even integer (RoPE rotates pairs)",
        mc.head_dim)
  _need(oc.vocab_size == mc.vocab_size, "oracle.vocab_size",
        f"the policy's vocabulary size model.vocab_size = {mc.vocab_size}", oc.vocab_size)
  _need(tb.vocab_size == mc.vocab_size, "testbed.vocab_size",
        f"the policy's vocabulary size model.vocab_size = {mc.vocab_size} (the policy can "
        "only emit response tokens)", tb.vocab_size)
  _need(tb.prompt_length + tb.response_length <= mc.max_position_embeddings,
        "model.max_position_embeddings",
        f">= prompt_length + response_length = {tb.prompt_length + tb.response_length}",
        mc.max_position_embeddings)
  n_y = exact_part.num_responses(tb.vocab_size, tb.response_length, MAX_RESPONSES)
  _need(n_y <= MAX_RESPONSES, "testbed.response_length",
        f"V^L <= {MAX_RESPONSES} responses for exact evaluation (V = {tb.vocab_size}; "
        f"the exact tables and P[C, |Y|, |Y|] would need more than "
        f"{4 * tb.num_prompts * n_y ** 2 / 2**30:.1f} GiB)", tb.response_length)
  _need(is_int(config.seeds, 2), "seeds",
        "an integer >= 2 (a mean over seeds with a 95% interval needs two)", config.seeds)
  exact_part.validate(config, _need, MAX_RESPONSES)


def _units(config) -> list[tuple[str, int, int]]:
  """(part, seed or η index, method index) of every unit after unit 1 (the SFT)."""
  units = [("sampled", s, mi) for s in range(int(config.seeds))
           for mi in range(len(config.selfplay.methods))]
  return units + exact_part.units(config)


SAMPLED_KEYS = ("gap", "avg_gap", "win_rate_vs_sft", "oracle_queries")


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
  return state | exact_part.initial_state(config)


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
  report.write_curves(writer, "sampled", per_method, total_units)
  plots.heatmap(wr, names, os.path.join(workdir, "win_rate_matrix.png"),
                "win rate J(row, column), mean over seeds")
  if config.exact.enabled:
    summary |= exact_part.summarize(config, state, workdir, writer, total_units)
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
                           log_every_seconds=config.log_every_seconds, config=config)
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
  exact_units = exact_part.ExactPart(config)
  vary = bool(config.selfplay.vary_game)
  games = {}  # vary_game: seed -> (its SFT start, the engine judging with its oracle)

  def sampled_game(s: int, state: dict):
    """Seed s's sampled-mode start and engine: the shared game, or its own."""
    if not vary:
      return Start(world, state["sft_params"], state["sft_table"]), engine
    if s not in games:  # rebuilt deterministically on resume, as the exact starts are
      gc = world_lib.game_config(config, s)
      start = world_lib.sft_start(gc, Testbed(gc))
      games[s] = (start, engine.with_backend(backend.with_oracle(start.world.oracle)))
    return games[s]

  def sft_unit(state: dict):
    """Unit 1: the SFT start (of every seed's game with vary_game) and the exact Nash gap."""
    if vary:  # the state keeps seed 0's start; the others are rebuilt when needed
      starts = [sampled_game(s, state)[0] for s in range(int(config.seeds))]
    else:
      starts = [world_lib.sft_start(config, world)]
    gaps = [float(jax.device_get(st.world.metrics_fn(st.sft_table, st.sft_table))["gap"])
            for st in starts]
    nash_gap = max(evaluation.nash_reference(st.world.pref)["gap"] for st in starts) \
        if config.eval.nash_reference else 0.0
    state["sft_params"], state["sft_table"] = starts[0].sft_params, starts[0].sft_table
    state["nash_gap"] = np.asarray(nash_gap, np.float32)
    print(f"selfplay: |Y| = {world.responses.shape[0]} responses x "
          f"{world.prompt_tokens.shape[0]} prompts; SFT gap {np.mean(gaps):.4f}"
          + (" (mean over the games)" if vary else "") + f"; exact Nash gap {nash_gap:.2e}; "
          f"{config.seeds} seeds" + (", each its own game" if vary else ""), flush=True)
    return state, {"sft/gap": float(np.mean(gaps)), "nash/gap": nash_gap}, 0, "sft"

  def step(unit: int, state: dict):
    if unit == 0:
      return sft_unit(state)
    part, s, mi = units[unit - 1]
    if part != "sampled":
      return exact_units(loop.writer, unit, part, s, mi, state)
    name = methods[mi]
    start, seed_engine = sampled_game(s, state)
    run_key = jax.random.fold_in(world.k_run, s)
    out = trajectories.sampled(seed_engine, start, name, mi, run_key,
                               int(config.selfplay.num_rounds),
                               int(config.selfplay.prompts_per_round))
    for k in SAMPLED_KEYS:
      state["sampled"][k][s, mi] = out[k]
    state["final_tables"][s, mi] = out["final_table"]
    metrics = report.write_rounds(loop.writer, f"{part}/{name}/seed{s}/", out["rounds"], unit)
    return state, metrics, len(out["rounds"]), (f"{part} {name} seed {s}: final gap "
                                                f"{out['gap'][-1]:.4f}")

  state = loop.run(state, unit, step, methods=list(methods))
  summary = _finalize(config, lambda s: sampled_game(s, state)[0], state, loop.workdir,
                      loop.writer, loop.total_units)
  loop.finish(state, summary, methods=list(methods))
  return summary
