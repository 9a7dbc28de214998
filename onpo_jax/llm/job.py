r"""Aligning a real checkpoint end to end: the `llm` experiment.

    python -m experiments.run --config=configs/llama3_8b_onpo.py:gpu8 --workdir=runs/llama3_onpo

From local checkpoints (Hugging Face directories or GGUF files: policy, judge),
local prompt files to an exported HF checkpoint and AlpacaEval-format outputs, on the same self-play engine as the
testbed (`onpo_jax.selfplay.engine.Engine`: sampling, pairs, anchors, losses,
`onpo_step`, fingerprints) with the real-checkpoint backend
(`onpo_jax.llm.backend.LLMBackend`: EOS-aware masks, micro-batches, a judge
that reads text). The inner optimizer is AdamW with the paper's linear-warm-up
cosine schedule, gradient clipping and `optax.MultiSteps` gradient
accumulation (`onpo_jax.llm.optim`).

Roles (`onpo_jax.selfplay.roles`): the policy π (trained, `policy.param_dtype`),
the auxiliary π' (inside `onpo_step`'s state), the reference π_ref = SFT
(frozen, `ref.dtype`, INPO / DPO anchor) and the judge (frozen, `judge.dtype`).
`ref.offload` and `judge.offload` keep those two in pinned host memory except
while they are used. With `lora.enabled` (docs/lora.md) π and π' are adapter
trees over the frozen base, which is π_ref itself (`onpo_jax.llm.adapted`);
checkpoints then hold the adapters and the base's fingerprint, and the export
adds the adapters in PEFT's format (`export/<method>/adapter/`).

Multi-host: `experiments/run.py` calls `jax.distributed.initialize` when
`config.distributed.enabled`. Every process computes the same prompt batches
(the order is a function of the seed) and passes them as replicated inputs;
parameters are sharded over the global mesh and activations over its batch
axes, so each process samples and scores its share of the rows; each process
judges its `data.host_shard` of every judged batch (`backend.ScopedOracle`;
`<method>/judge/rows_judged_per_process` in the metrics); host-side values are
gathered with `multihost_utils.process_allgather`. Only process 0 writes metrics,
AlpacaEval files and the exported checkpoint; orbax writes the arrays.

Units, checkpoints and resume come from `onpo_jax.selfplay.loop.UnitLoop`
(one unit = one round of one method); the per-round evaluation history is
kept in the checkpoint, so a resumed run ends with the same summary.

Outputs in `workdir`: metrics.jsonl (per round: losses, norms, oracle queries,
tokens/s, win rate vs SFT with its CI, constraint satisfaction when the
evaluation prompts carry constraints), memory.json, alpaca_eval/*.json,
checkpoints/, export/<method>/ (HF directory + tokenizer), summary.json.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from onpo_jax.llm import adapted as adapted_lib
from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import backend as backend_lib
from onpo_jax.llm import config as config_lib
from onpo_jax.llm import evaluation
from onpo_jax.llm import export as export_lib
from onpo_jax.llm import memory as memory_lib
from onpo_jax.llm import optim
from onpo_jax.models import lora as lora_lib
from onpo_jax.oracles import verifiable
from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay import roles
from onpo_jax.selfplay.engine import Engine


def build_oracle(config, policy_tokenizer, mesh, rules, judge=None, constraints=None):
  """An oracle from a judge section (frozen, `dtype`, optionally offloaded).

  Args:
    config: the llm config.
    policy_tokenizer: decodes the policy's token batches.
    mesh: should span this host's devices only (see `backend.ScopedOracle`).
    rules: logical -> mesh axis rules.
    judge: the judge section; None: `config.judge`, the rounds' oracle.
    constraints: the prompts' constraints for a 'verifiable' judge, already
      read (`verifiable.constraints_from_files`); None: read them here.
  """
  from onpo_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.oracles import judge as judge_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.oracles import reward_model as reward_lib  # pylint: disable=g-import-not-at-top
  jc = config.judge if judge is None else judge
  if jc.kind == "verifiable":
    return backend_lib.ScopedOracle(verifiable.VerifiableOracle(
        policy_tokenizer, _constraints(config) if constraints is None else constraints),
        mesh, rules)
  overrides = {"dtype": jc.dtype, "param_dtype": jc.dtype}
  tok_path = jc.tokenizer_path or jc.path
  if jc.kind == "pairwise":
    kw = dict(preset=jc.preset, use_chat_template=bool(jc.use_chat_template),
              labels=tuple(jc.labels), max_length=int(jc.max_length),
              micro_batch_size=int(jc.micro_batch_size))
    if jc.template:
      kw["template"] = jc.template
    oracle = judge_lib.load_pairwise_judge(jc.path, policy_tokenizer, tokenizer_path=tok_path,
                                           mesh=mesh, config_overrides=overrides, **kw)
  else:
    model = reward_lib.load_reward_model(jc.path, mesh=mesh, **overrides)
    oracle = reward_lib.RewardModelOracle(
        model, tok_lib.load_tokenizer(tok_path), policy_tokenizer,
        template=jc.template or None, max_length=int(jc.max_length),
        micro_batch_size=int(jc.micro_batch_size))
  return backend_lib.ScopedOracle(oracle, mesh, rules, offload=bool(jc.offload))


def _constraints(config) -> dict:
  """The checkable constraints of every prompt the verifiable judge will see (prompt files)."""
  paths = [config.data.paths] if isinstance(config.data.paths, str) else list(config.data.paths)
  if config.eval.prompt_file:
    paths.append(config.eval.prompt_file)
  return verifiable.constraints_from_files(paths)


def _mesh(config):
  """(mesh dims, mesh) of the run; a single host may plan on fewer devices than it has."""
  from onpo_jax.models import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  if -1 not in tuple(config.mesh.shape) and jax.process_count() == 1:
    dims = tuple(config.mesh.shape)
    return dims, sharding_lib.make_mesh(dims, devices=jax.devices()[:math.prod(dims)])
  dims = config_lib.mesh_shape(config, jax.device_count())
  return dims, sharding_lib.make_mesh(dims)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Aligns `config.policy.path` for `selfplay.num_rounds` rounds; returns the summary."""
  from onpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import loading  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate_config(config)
  methods = tuple(config.selfplay.methods)
  sp = config.selfplay
  # The inputs that are cheap to read come before the workdir: a bad prompt file,
  # tokenizer or checkpoint header is named before anything is written.
  tokenizer = tok_lib.load_tokenizer(config.policy.tokenizer_path or config.policy.path)
  header = loading.checkpoint_config(config.policy.path)
  config_lib.check_context(config, header, config.policy.path)
  config_lib.check_lora(config, header)
  constraints = None
  if "verifiable" in {config.judge.kind, *(j.kind for j in config.eval.judges.values())}:
    constraints = _constraints(config)  # a prompt without constraints is named here
  records = data_lib.load_prompt_records(
      config.data.source, config.data.paths, split=config.data.split,
      data_dir=config.data.tfds_data_dir or None)
  prompts = data_lib.PromptSet.from_records(
      records, tokenizer, max_prompt_length=int(config.data.max_prompt_length),
      overlong=config.data.overlong, use_chat_template=bool(config.data.use_chat_template))
  if prompts.num_rounds(int(sp.prompts_per_round)) < int(sp.num_rounds):
    raise ValueError(f"config.data.paths={config.data.paths!r} has {len(prompts)} usable prompts; "
                     f"selfplay.num_rounds={sp.num_rounds} x selfplay.prompts_per_round="
                     f"{sp.prompts_per_round} needs {sp.num_rounds * sp.prompts_per_round}")
  loop = loop_lib.UnitLoop(workdir, label="llm", total_units=int(sp.num_rounds) * len(methods),
                           max_to_keep=config.checkpoint.max_to_keep,
                           log_every_seconds=config.log_every_seconds, config=config)
  summary = loop.finished_summary()
  if summary is not None:
    return summary
  workdir = loop.workdir
  dims, mesh = _mesh(config)
  rules = sharding_lib.DEFAULT_RULES
  lora_on = adapted_lib.lora_enabled(config)
  # From config.json files alone: a plan that cannot fit stops the run before
  # any model is loaded (it is a lower bound; memory.json adds the compiled
  # train step's activations after the first round).
  plan = memory_lib.estimate_memory(
      config, dims, lora=adapted_lib.lora_config(config.lora) if lora_on else None,
      base_dtype=config.lora.base_dtype if lora_on else None)
  if config.get("check_memory", True):
    memory_lib.check_fits(plan, memory_lib.device_capacity())

  # Models are loaded outside the activation context (nnx.eval_shape inside
  # jax.set_mesh would resolve logical names as mesh axes).
  judge_mesh = mesh
  if jax.process_count() > 1:
    judge_mesh = sharding_lib.make_mesh((1, jax.local_device_count(), 1),
                                        devices=jax.local_devices())
  # The judges before the policy: a bad judge checkpoint fails before the big load.
  oracle = build_oracle(config, tokenizer, judge_mesh, rules, constraints=constraints)
  eval_judges = {name: build_oracle(config, tokenizer, judge_mesh, rules, judge=section,
                                    constraints=constraints)
                 for name, section in config.eval.judges.items()}
  policy = loading.load_checkpoint(
      config.policy.path, mesh=mesh, rules=rules,
      param_dtype=config.lora.base_dtype if lora_on else config.policy.param_dtype,
      dtype=config.policy.dtype, remat=bool(config.policy.remat))
  model_config = policy.config
  graphdef, sft_params = nnx.split(policy)
  eos_ids = tok_lib.eos_token_ids(tokenizer, model_config)
  pad_id = int(tokenizer.pad_token_id)
  # What the engine trains: the weights, or adapters over the frozen base
  # (`adapted`), whose fresh tree is π_SFT; with adapters π_ref is the base (None).
  adapted, init_params = adapted_lib.adapted_params(config, sft_params, mesh=mesh, rules=rules)
  ref_params = None
  if not lora_on:
    placements = roles.role_placements(config, mesh, judge_mesh)
    ref_params = roles.park(
        jax.tree.map(lambda x: x.astype(jnp.dtype(config.ref.dtype)), sft_params),
        placements[roles.Role.REF])
  if hasattr(oracle.oracle, "register_conversations"):
    # The judge reads each prompt's conversation, not the policy's chat-template text.
    messages = {r.id: r.messages for r in records}
    oracle.oracle.register_conversations(prompts.tokens, [messages[i] for i in prompts.ids])
  backend = backend_lib.LLMBackend(graphdef, model_config, oracle, config, eos_ids=eos_ids,
                                   pad_id=pad_id, adapted=adapted)
  engine = Engine(backend, config, mesh=mesh, inner_optimizer=lambda name: (
      optim.make_inner_optimizer(config, optim.updates_per_regression(config, name))))
  loop.log(f"llm: {len(prompts)} prompts ({prompts.stats}); eos {eos_ids}; memory "
           f"{plan.summary()}")

  state = {"methods": {m: engine.init_state(m, init_params) for m in methods}}
  state, unit, meta = loop.restore(state)
  # Adapters mean nothing on another base: a checkpoint records the one it trained on.
  base = {"lora_base_fingerprint": adapted.fingerprint()} if lora_on else {}
  if lora_on and unit and meta.get("lora_base_fingerprint") != base["lora_base_fingerprint"]:
    raise lora_lib.BaseMismatchError(
        f"{loop.workdir}/checkpoints: its adapters were trained on a base with fingerprint "
        f"{meta.get('lora_base_fingerprint')!r}; config.policy.path={config.policy.path!r} "
        f"now holds {base['lora_base_fingerprint']!r} (other weights at the same path)")

  evaluator = None
  run_key = jax.random.key(int(config.seed))
  eval_key = jax.random.fold_in(run_key, 2**20)
  if config.eval.prompt_file:
    evaluator = evaluation.Evaluator(config, tokenizer, graphdef, model_config, oracle,
                                     eos_ids=eos_ids, pad_id=pad_id, judges=eval_judges)
    with sharding_lib.activation_sharding(mesh, rules):
      sft_records = evaluator.set_reference(sft_params, eval_key)
    if sft_records is not None and loop.is_main:
      alpaca_eval.write_outputs(os.path.join(workdir, "alpaca_eval", "sft.json"), sft_records)

  loop.writer.write_json("memory.json", plan.as_dict())
  history: dict[str, list] = meta.get("history", {m: [] for m in methods})

  def judge_counts(judge, prefix: str) -> dict:
    """Since the last call: judge inputs cut to its max_length (both orders cut alike), rows judged."""
    return {prefix + k: v for k, v in judge.pop_counts().items()}

  # XLA's memory of each method's compiled train step, read after its first
  # round in this process: what the plan above leaves out (activations,
  # XLA's scratch) measured on the program that runs. memory.json only: a
  # resumed run that has no round left measures nothing, and summary.json
  # must not depend on where a run was resumed.
  step_memory: dict[str, dict | None] = {}

  def log_step_memory(name: str, stats: dict | None):
    if stats is None:
      return
    loop.log(f"{name}: compiled train step per device (GiB): " + ", ".join(
        f"{k} {v / memory_lib.GIB:.2f}" for k, v in stats.items()))
    loop.writer.write_json("memory.json", dict(plan.as_dict(), train_step_compiled=step_memory))

  def step(unit: int, state: dict):
    t, mi = divmod(unit, len(methods))
    name = methods[mi]
    batch = next(prompts.round_batches(t, batch_size=int(sp.prompts_per_round),
                                       prompts_per_round=int(sp.prompts_per_round),
                                       seed=int(config.data.shuffle_seed)))
    with sharding_lib.activation_sharding(mesh, rules):
      new_state, m = engine.run_round(name, state["methods"][name], ref_params,
                                      batch.prompt_tokens, batch.prompt_mask,
                                      loop_lib.round_key(run_key, t, mi), t + 1)
    state["methods"][name] = new_state
    if name not in step_memory:
      with sharding_lib.activation_sharding(mesh, rules):
        step_memory[name] = engine.train_step_memory(name)
      log_step_memory(name, step_memory[name])
    out = {f"{name}/{k}": float(v) for k, v in m.items()}
    out.update(judge_counts(oracle, f"{name}/judge/"))
    if evaluator is not None:
      generator = config.eval.generator or f"{name}-round{t + 1}"
      with sharding_lib.activation_sharding(mesh, rules):
        recs, win_rates, mean_len = evaluator.evaluate(adapted.materialize(new_state["params"]),
                                                       eval_key, generator)
      texts = [r["output"] for r in recs]
      if loop.is_main:
        alpaca_eval.write_outputs(
            os.path.join(workdir, "alpaca_eval", f"{name}_round{t + 1}.json"), recs)
      entry = dict(win_rates[""].as_dict(), mean_response_tokens=mean_len,
                   **evaluator.constraint_metrics(texts))
      for judge_name in eval_judges:
        entry.update({f"{judge_name}/{k}": v for k, v in win_rates[judge_name].as_dict().items()})
      out.update({f"{name}/eval/{k}": v for k, v in entry.items()})
      out.update(judge_counts(oracle, f"{name}/eval/judge/"))
      for judge_name, judge in eval_judges.items():
        out.update(judge_counts(judge, f"{name}/eval/{judge_name}/judge/"))
      history[name].append(entry)
      for line in evaluator.examples(texts):
        loop.log(line)
    loss = out.get(f"{name}/policy/loss", out.get(f"{name}/aux/loss", float("nan")))
    progress = (f"{name} round {t + 1}/{sp.num_rounds}: loss {loss:.4g}, win rate vs ref "
                f"{out.get(f'{name}/eval/win_rate', float('nan')):.3f}")
    for judge_name in eval_judges:
      progress += f" ({judge_name}: {out[f'{name}/eval/{judge_name}/win_rate']:.3f})"
    return state, out, t + 1, progress

  state = loop.run(state, unit, step, methods=list(methods), history=history, **base)
  exports, adapters = {}, {}
  for name in methods:
    params, path = state["methods"][name]["params"], os.path.join(workdir, "export", name)
    kw = dict(dtype=config.export.dtype, max_shard_size=config.export.max_shard_size,
              tokenizer=tokenizer)
    if lora_on:
      exports[name] = export_lib.export_merged_policy(graphdef, sft_params, params, adapted.lora,
                                                      path, **kw)
      adapters[name] = export_lib.export_peft_adapters(
          params, adapted.lora, os.path.join(path, "adapter"),
          base_model_name_or_path=config.policy.path)
    else:
      exports[name] = export_lib.export_policy(graphdef, params, path, **kw)
  summary = {"methods": list(methods), "export": exports, "memory": plan.as_dict(),
             "eval": history, "mesh": list(dims), "process_count": jax.process_count()}
  if lora_on:
    summary["export_adapters"] = adapters
  if evaluator is not None:
    summary["eval_reference"] = evaluator.reference_metrics()
  loop.finish(state, summary, methods=list(methods), history=history, **base)
  return summary
