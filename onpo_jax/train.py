"""The main job: SFT, then T self-play rounds of every method, with exact evaluation.

    python -m experiments.run --config=configs/default.py --workdir=runs/default

`run(config, workdir)` (registered as experiment 'selfplay'):
  1. builds the testbed (`onpo_jax.testbed`): C prompts, all |Y| = V^L
     responses, the synthetic oracle (`onpo_jax.oracle`) and its full preference
     matrix [C, |Y|, |Y|], and the per-prompt exact Nash (LP) for reference;
  2. SFT: maximum likelihood on samples of the start distribution μ;
  3. for each round t = 1..T and each method (`onpo_jax.rounds.METHODS`): one
     round, then the exact duality gap and win rate vs SFT of the new policy;
     metrics go to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), and an
     orbax checkpoint of everything a resume needs goes to `workdir/checkpoints`;
  4. at the end: the head-to-head win-rate matrix of the final policies,
     `summary.json`, `gap_vs_round.png`, `win_rate_matrix.png`.

Units of work are numbered: unit 1 = SFT, unit 1 + t·M + m + 1 = round t + 1 of
method m (M methods). A checkpoint is saved after every unit; a run killed at
any moment and started again with the same command resumes after its last
checkpoint and ends with the same results (all randomness is derived from the
seed, the round and the method, and is also checkpointed). On resume,
metrics.jsonl lines newer than the checkpoint are dropped before they are
redone (TensorBoard may show those points twice). A finished run started again
does nothing and says so.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from onpo_jax import checkpoint as checkpoint_lib
from onpo_jax import evaluation
from onpo_jax import metrics as metrics_lib
from onpo_jax import oracle as oracle_lib
from onpo_jax import plots
from onpo_jax import rounds
from onpo_jax import testbed

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
  rounds.validate_selfplay(sp, _need,
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


def sft_fit(graphdef, params, prompt_tokens, prompt_mask, responses, logp_start, key, *,
            num_steps: int, batch_size: int, learning_rate: float):
  """Maximum likelihood on samples of μ (one `lax.scan`); returns (params, step losses)."""
  opt = optax.adam(learning_rate)
  prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
  responses = jnp.asarray(responses)

  def step(carry, k):
    p, st = carry
    kp, ky = jax.random.split(k)
    pi = jax.random.randint(kp, (batch_size,), 0, prompt_tokens.shape[0])
    yi = jax.random.categorical(ky, logp_start[pi])
    tok, attn, resp = testbed.full_sequences(prompt_tokens[pi], prompt_mask[pi], responses[yi])
    nll, grads = jax.value_and_grad(lambda q: -jnp.mean(
        testbed.sequence_logprobs(graphdef, q, tok, attn, resp, "sum")))(p)
    updates, st = opt.update(grads, st, p)
    return (optax.apply_updates(p, updates), st), nll

  @jax.jit
  def fit(p, k):
    (p, _), nll = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k, num_steps))
    return p, nll

  return fit(params, key)


class _Setup:
  """Everything derived deterministically from the config (rebuilt on resume)."""

  def __init__(self, config):
    tb = config.testbed
    keys = jax.random.split(jax.random.key(config.seed), 6)
    self.k_oracle, self.k_prompts, self.k_style, self.k_sft, self.k_data, self.k_run = keys
    self.responses = testbed.enumerate_responses(tb.vocab_size, tb.response_length)
    self.prompt_tokens, self.prompt_mask = testbed.make_prompts(
        self.k_prompts, tb.num_prompts, tb.prompt_length, tb.vocab_size)
    oc = config.oracle
    synthetic = oracle_lib.make_synthetic_oracle(
        self.k_oracle, vocab_size=oc.vocab_size, max_prompt_length=tb.prompt_length,
        max_response_length=tb.response_length, feature_dim=oc.feature_dim,
        strength=oc.strength, cyclic=oc.cyclic, cyclic_spread=oc.cyclic_spread)
    self.oracle = (synthetic if oc.kind == "synthetic"
                   else oracle_lib.synthetic_reward_oracle(synthetic))
    self.pref = jax.jit(lambda pt, pm, ys: oracle_lib.preference_matrix(
        self.oracle, pt, pm, ys, jnp.ones(ys.shape, bool)))(
            self.prompt_tokens, self.prompt_mask, self.responses)
    self.logp_start = testbed.start_logprobs(self.k_style, tb.num_prompts, self.responses,
                                             tb.vocab_size, tb.start_temperature)
    mc = config.model
    self.model_config = testbed.model_config(
        mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers, mc.num_heads,
        mc.num_kv_heads, mc.head_dim, mc.max_position_embeddings)
    self.graphdef, self.init_params = testbed.init_policy(self.model_config, config.seed)
    self.table_fn = jax.jit(lambda p: evaluation.policy_table(
        self.graphdef, p, self.prompt_tokens, self.prompt_mask, self.responses))
    self.metrics_fn = jax.jit(lambda lp, lp_sft: evaluation.exact_metrics(self.pref, lp, lp_sft))

  def round_prompts(self, round_idx: int, n: int):
    """Prompts of round `round_idx` (the same for every method): a seeded draw from the C."""
    c = self.prompt_tokens.shape[0]
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(self.k_data, round_idx))).ravel()
    rng = np.random.default_rng([int(x) for x in seed])
    ids = np.concatenate([rng.permutation(c) for _ in range(-(-n // c))])[:n]
    return self.prompt_tokens[ids], self.prompt_mask[ids]


def _truncate_jsonl(path: str, last_unit: int) -> None:
  """Drops metric lines written after the restored checkpoint (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [ln for ln in f if ln.strip()]
  keep = [ln for ln in lines if json.loads(ln).get("unit", 0) <= last_unit]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _finalize(config, setup, state, methods, workdir, writer) -> dict:
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
  writer.write_json("summary.json", summary)
  return summary


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache in `path` (process-wide JAX setting).

  Compilation dominates a CPU run of this size; with the cache a resumed or
  repeated run reuses the compiled executables (bit-identical results).
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(path)
  # JAX decides once per process whether the cache is used; re-decide now.
  compilation_cache.reset_cache()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the self-play experiment; returns the summary dict."""
  validate_config(config)
  if config.get("compilation_cache_dir", ""):
    enable_compilation_cache(config.compilation_cache_dir)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  methods = tuple(config.selfplay.methods)
  num_m, t_rounds = len(methods), int(config.selfplay.num_rounds)
  total_units = 1 + t_rounds * num_m
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.checkpoint.max_to_keep)
  latest = ckpt.latest_step()
  if latest is not None and ckpt.restore_meta(latest).get("done", False):
    msg = f"selfplay: run in {workdir} already finished ({total_units} units); nothing to do"
    print(msg)
    logging.info(msg)
    ckpt.close()
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      return json.load(f)

  setup = _Setup(config)
  engine = rounds.Engine(setup.graphdef, setup.model_config, setup.oracle, config)
  n_y, c = setup.responses.shape[0], setup.prompt_tokens.shape[0]
  zeros_table = jnp.zeros((c, n_y), jnp.float32)
  state = {
      "sft_params": setup.init_params,
      "methods": {m: engine.init_state(m, setup.init_params) for m in methods},
      "sft_table": zeros_table,
      "tables": jnp.zeros((num_m, c, n_y), jnp.float32),
      "history": {k: np.zeros((num_m, t_rounds + 1), np.float32)
                  for k in ("gap", "win_rate_vs_sft")} | {
                      "oracle_queries": np.zeros((num_m,), np.float32)},
      "nash_gap": np.zeros((), np.float32),
      "run_key": jax.random.key_data(setup.k_run),
      "data_cursor": np.zeros((), np.int64),
  }
  unit = 0
  if latest is not None:
    state, meta = ckpt.restore(latest, state)
    unit = int(meta["unit"])
    for k in ("sft_params", "methods", "sft_table", "tables"):
      state[k] = jax.tree.map(jnp.asarray, state[k])
    print(f"selfplay: resuming from checkpoint unit {unit}/{total_units} in {workdir}")
  _truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), unit)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  start = time.perf_counter()
  last_log = -1e9
  start_unit = unit

  def save(u, done=False):
    ckpt.save(u if not done else u + 1, state, {"unit": u, "done": done, "methods": list(methods)})

  if unit == 0:
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
    state["tables"] = jnp.broadcast_to(sft_table, (num_m, c, n_y))
    state["history"]["gap"][:, 0] = m["gap"]
    state["history"]["win_rate_vs_sft"][:, 0] = 0.5
    state["nash_gap"] = np.asarray(nash_gap, np.float32)
    unit = 1
    writer.write(0, {"unit": unit, "sft/nll": float(nll[-1]), "sft/kl_start_to_sft": kl,
                     "sft/gap": float(m["gap"]), "sft/mass": float(m["mass"]),
                     "start/gap": float(start_m["gap"]), "nash/gap": nash_gap})
    print(f"selfplay: |Y| = {n_y} responses x {c} prompts; SFT gap {float(m['gap']):.4f} "
          f"(start μ gap {float(start_m['gap']):.4f}, KL(μ‖π_SFT) {kl:.4f}, "
          f"Σπ = {float(m['mass']):.6f}); exact Nash gap {nash_gap:.2e}")
    save(unit)

  run_key = jax.random.wrap_key_data(jnp.asarray(state["run_key"]))
  while unit < total_units:
    t, mi = divmod(unit - 1, num_m)  # round t + 1 of method mi
    name = methods[mi]
    prompts, mask = setup.round_prompts(t, int(config.selfplay.prompts_per_round))
    key = jax.random.fold_in(jax.random.fold_in(run_key, t), mi)
    new_state, metrics = engine.run_round(name, state["methods"][name], state["sft_params"],
                                          prompts, mask, key, t + 1)
    table = setup.table_fn(new_state["params"])
    ev = jax.device_get(setup.metrics_fn(table, state["sft_table"]))
    state["methods"][name] = new_state
    state["tables"] = state["tables"].at[mi].set(table)
    state["history"]["gap"][mi, t + 1] = ev["gap"]
    state["history"]["win_rate_vs_sft"][mi, t + 1] = ev["win_rate_vs_sft"]
    state["history"]["oracle_queries"][mi] += metrics["oracle_queries"]
    state["data_cursor"] = np.asarray((t + 1) * int(config.selfplay.prompts_per_round), np.int64)
    unit += 1
    out = {f"{name}/{k}": float(v) for k, v in metrics.items()}
    out.update({f"{name}/{k}": float(v) for k, v in ev.items()})
    out[f"{name}/oracle_queries_total"] = float(state["history"]["oracle_queries"][mi])
    out["unit"] = unit
    writer.write(t + 1, out)
    save(unit)
    now = time.perf_counter()
    if mi == num_m - 1:
      row = "  ".join(f"{m}: gap {state['history']['gap'][i, t + 1]:.4f} "
                      f"win {state['history']['win_rate_vs_sft'][i, t + 1]:.3f}"
                      for i, m in enumerate(methods))
      print(f"round {t + 1}/{t_rounds}  {row}", flush=True)
    if now - last_log >= config.log_every_seconds or unit == total_units:
      done_units = unit - start_unit
      rate = done_units / max(now - start, 1e-9)
      eta = (total_units - unit) / max(rate, 1e-9)
      print(f"[selfplay] unit {unit}/{total_units} ({name} round {t + 1}) "
            f"{now - start:.1f}s elapsed, {rate:.2f} units/s, ETA {eta:.0f}s; "
            f"sample {metrics['sample_tokens_per_s']:.0f} tok/s, "
            f"train {metrics['train_tokens_per_s']:.0f} tok/s", flush=True)
      last_log = now

  summary = _finalize(config, setup, state, methods, workdir, writer)
  writer.close()
  save(unit, done=True)
  ckpt.close()
  return summary
