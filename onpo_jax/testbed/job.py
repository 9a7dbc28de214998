"""The main job: SFT, then T self-play rounds of every method, with exact evaluation.

    python -m experiments.run --config=configs/default.py --workdir=runs/default

`run(config, workdir)` (registered as experiment 'selfplay'):
  1. builds the testbed (`onpo_jax.testbed.env`): C prompts, all |Y| = V^L
     responses, the synthetic oracle (`onpo_jax.oracles`) and its full preference
     matrix [C, |Y|, |Y|], and the per-prompt exact Nash (LP) for reference;
  2. SFT: maximum likelihood on samples of the start distribution μ;
  3. for each round t = 1..T and each method (`onpo_jax.selfplay.methods.METHODS`):
     one round on the self-play engine with the testbed backend
     (`onpo_jax.testbed.backend`), then the exact duality gap and win rate vs
     SFT of the new policy;
     metrics go to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), and an
     orbax checkpoint of everything a resume needs goes to `workdir/checkpoints`;
  4. at the end: the head-to-head win-rate matrix of the final policies,
     `summary.json`, `gap_vs_round.png`, `win_rate_matrix.png`.

Units of work are numbered: unit 1 = SFT, unit 1 + t·M + m + 1 = round t + 1 of
method m (M methods). Checkpoints, resume and progress lines come from
`onpo_jax.selfplay.loop.UnitLoop`; all randomness is derived from the seed, the
round and the method, and the run key is also checkpointed.
"""

from __future__ import annotations

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
        f"V^L <= {MAX_RESPONSES} responses for exact evaluation (V = {tb.vocab_size})",
        tb.response_length)


def _finalize(config, setup, state, methods, workdir) -> dict:
  """Win-rate matrix, summary.json and the two PNGs."""
  t_rounds = int(config.selfplay.num_rounds)
  names = ["sft"] + list(methods)
  tables = jnp.concatenate([state["sft_table"][None], state["tables"]])
  wr = np.asarray(evaluation.win_rate_matrix(setup.pref, tables), np.float64)
  gap = np.asarray(state["history"]["gap"], np.float64)
  win = np.asarray(state["history"]["win_rate_vs_sft"], np.float64)
  summary = {
      "methods": list(methods),
      "gap": {m: gap[i].tolist() for i, m in enumerate(methods)},
      "win_rate_vs_sft": {m: win[i].tolist() for i, m in enumerate(methods)},
      "oracle_queries": {m: float(q) for m, q in zip(methods, np.asarray(
          state["history"]["oracle_queries"]))},
      "win_rate_matrix": {"labels": names, "matrix": wr.tolist()},
      "sft_gap": float(gap[0, 0]),
      "nash_gap": float(state["nash_gap"]),
  }
  rows = [[m] + [gap[i, t] for t in range(t_rounds + 1)] for i, m in enumerate(methods)]
  print("\nExact duality gap per round (round 0 = SFT):")
  print(metrics_lib.format_table(rows, ["method"] + [f"t={t}" for t in range(t_rounds + 1)]))
  print("\nHead-to-head win rate J(row, column) of the final policies:")
  print(metrics_lib.format_table([[names[i]] + list(wr[i]) for i in range(len(names))],
                                 ["policy"] + names))
  xs = list(range(t_rounds + 1))
  plots.line_plot({m: (xs, gap[i].tolist()) for i, m in enumerate(methods)},
                  os.path.join(workdir, "gap_vs_round.png"), "exact duality gap", "round",
                  "duality gap")
  plots.heatmap(wr, names, os.path.join(workdir, "win_rate_matrix.png"),
                "win rate J(row, column)")
  return summary


def _initial_state(setup: Testbed, engine: Engine, methods, t_rounds: int) -> dict:
  """The checkpointed state of a run before SFT (shapes fixed by the config)."""
  num_m = len(methods)
  n_y, c = setup.responses.shape[0], setup.prompt_tokens.shape[0]
  return {
      "sft_params": setup.init_params,
      "methods": {m: engine.init_state(m, setup.init_params) for m in methods},
      "sft_table": jnp.zeros((c, n_y), jnp.float32),
      "tables": jnp.zeros((num_m, c, n_y), jnp.float32),
      "history": {k: np.zeros((num_m, t_rounds + 1), np.float32)
                  for k in ("gap", "win_rate_vs_sft")} | {
                      "oracle_queries": np.zeros((num_m,), np.float32)},
      "nash_gap": np.zeros((), np.float32),
      "run_key": jax.random.key_data(setup.k_run),
      "data_cursor": np.zeros((), np.int64),
  }


def _sft_unit(config, setup: Testbed, engine: Engine, methods, state: dict):
  """Unit 1: SFT from the initial policy; every method starts from its result."""
  num_m = len(methods)
  params, nll = sft_fit(setup.graphdef, setup.init_params, setup.prompt_tokens,
                        setup.prompt_mask, setup.responses, setup.logp_start, setup.k_sft,
                        num_steps=config.sft.num_steps, batch_size=config.sft.batch_size,
                        learning_rate=config.sft.learning_rate)
  sft_table = setup.table_fn(params)
  m = jax.device_get(setup.metrics_fn(sft_table, sft_table))
  start_m = jax.device_get(setup.metrics_fn(setup.logp_start, sft_table))
  mu = jnp.exp(setup.logp_start)
  kl = float(jnp.mean(jnp.sum(mu * (setup.logp_start - sft_table), -1)))
  nash_gap = 0.0
  if config.eval.nash_reference:
    nash_gap = evaluation.nash_reference(setup.pref)["gap"]
  state["sft_params"] = params
  state["methods"] = {name: engine.init_state(name, params) for name in methods}
  state["sft_table"] = sft_table
  state["tables"] = jnp.broadcast_to(sft_table, (num_m,) + sft_table.shape)
  state["history"]["gap"][:, 0] = m["gap"]
  state["history"]["win_rate_vs_sft"][:, 0] = 0.5
  state["nash_gap"] = np.asarray(nash_gap, np.float32)
  n_y, c = setup.responses.shape[0], setup.prompt_tokens.shape[0]
  print(f"selfplay: |Y| = {n_y} responses x {c} prompts; SFT gap {float(m['gap']):.4f} "
        f"(start μ gap {float(start_m['gap']):.4f}, KL(μ‖π_SFT) {kl:.4f}, "
        f"Σπ = {float(m['mass']):.6f}); exact Nash gap {nash_gap:.2e}")
  metrics = {"sft/nll": float(nll[-1]), "sft/kl_start_to_sft": kl, "sft/gap": float(m["gap"]),
             "sft/mass": float(m["mass"]), "start/gap": float(start_m["gap"]),
             "nash/gap": nash_gap}
  return state, metrics, 0, "sft"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the self-play experiment; returns the summary dict."""
  validate_config(config)
  if config.get("compilation_cache_dir", ""):
    enable_compilation_cache(config.compilation_cache_dir)
  methods = tuple(config.selfplay.methods)
  num_m, t_rounds = len(methods), int(config.selfplay.num_rounds)
  loop = loop_lib.UnitLoop(workdir, label="selfplay", total_units=1 + t_rounds * num_m,
                           max_to_keep=config.checkpoint.max_to_keep,
                           log_every_seconds=config.log_every_seconds)
  summary = loop.finished_summary()
  if summary is not None:
    return summary

  setup = Testbed(config)
  tb = config.testbed
  backend = TestbedBackend(
      setup.graphdef, setup.model_config, setup.oracle, response_length=tb.response_length,
      prompt_length=tb.prompt_length, temperature=config.selfplay.temperature,
      reduction=config.selfplay.logp_reduction,
      tournament_mode=config.selfplay.tournament_mode)
  engine = Engine(backend, config)
  state, unit, _ = loop.restore(_initial_state(setup, engine, methods, t_rounds))
  if unit:
    for k in ("sft_params", "methods", "sft_table", "tables"):
      state[k] = jax.tree.map(jnp.asarray, state[k])
  run_key = None

  def step(unit: int, state: dict):
    nonlocal run_key
    if unit == 0:
      return _sft_unit(config, setup, engine, methods, state)
    if run_key is None:
      run_key = jax.random.wrap_key_data(jnp.asarray(state["run_key"]))
    t, mi = divmod(unit - 1, num_m)  # round t + 1 of method mi
    name = methods[mi]
    prompts, mask = setup.round_prompts(t, int(config.selfplay.prompts_per_round))
    new_state, metrics = engine.run_round(name, state["methods"][name], state["sft_params"],
                                          prompts, mask, loop_lib.round_key(run_key, t, mi),
                                          t + 1)
    table = setup.table_fn(new_state["params"])
    ev = jax.device_get(setup.metrics_fn(table, state["sft_table"]))
    history = state["history"]
    state["methods"][name] = new_state
    state["tables"] = state["tables"].at[mi].set(table)
    history["gap"][mi, t + 1] = ev["gap"]
    history["win_rate_vs_sft"][mi, t + 1] = ev["win_rate_vs_sft"]
    history["oracle_queries"][mi] += metrics["oracle_queries"]
    state["data_cursor"] = np.asarray((t + 1) * int(config.selfplay.prompts_per_round), np.int64)
    out = {f"{name}/{k}": float(v) for k, v in metrics.items()}
    out.update({f"{name}/{k}": float(v) for k, v in ev.items()})
    out[f"{name}/oracle_queries_total"] = float(history["oracle_queries"][mi])
    if mi == num_m - 1:
      row = "  ".join(f"{m}: gap {history['gap'][i, t + 1]:.4f} "
                      f"win {history['win_rate_vs_sft'][i, t + 1]:.3f}"
                      for i, m in enumerate(methods))
      print(f"round {t + 1}/{t_rounds}  {row}", flush=True)
    progress = (f"{name} round {t + 1}; sample {metrics['sample_tokens_per_s']:.0f} tok/s, "
                f"train {metrics['train_tokens_per_s']:.0f} tok/s")
    return state, out, t + 1, progress

  state = loop.run(state, unit, step, methods=list(methods))
  summary = _finalize(config, setup, state, methods, loop.workdir)
  loop.finish(state, summary, methods=list(methods))
  return summary
