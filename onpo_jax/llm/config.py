"""Checks and fixed tables of the `llm` job's config.

The values of the config (every field with its default, the paper settings and
the `:tiny` CPU variant) live in `configs/llm_common.py`; this module holds what
the library itself needs to read a config: `validate_config`, which names the
field that is wrong, `mesh_shape`, which resolves a -1 in `mesh.shape`, the
named device meshes `MESH_VARIANTS`, and the architectures of the paper's
checkpoints (`LLAMA3_8B_HF`, `MISTRAL_7B_HF`), so that memory plans and
`jax.eval_shape` checks need no download.
"""

from __future__ import annotations

import math
from typing import Any

from onpo_jax.llm import optim
from onpo_jax.selfplay import methods as methods_lib

MESH_VARIANTS = {
    # name: ((data, fsdp, tensor), devices) — FSDP first: an 8B policy with Adam
    # fits per device once sharded, and FSDP needs no model-specific rules.
    "gpu8": ((1, 8, 1), "1 node of 8 GPUs (the paper: 8×A100 40 GB)"),
    "v4-16": ((1, 8, 1), "TPU v4-16 slice: 8 chips × 32 GiB, 2 hosts"),
    "v4-32": ((2, 8, 1), "TPU v4-32 slice: 16 chips × 32 GiB, 4 hosts"),
    "v5p-8": ((1, 4, 1), "TPU v5p-8 slice: 4 chips × 95 GiB, 1 host"),
    "v5p-16": ((1, 8, 1), "TPU v5p-16 slice: 8 chips × 95 GiB, 2 hosts"),
    "v5p-64": ((4, 8, 1), "TPU v5p-64 slice: 32 chips × 95 GiB, 8 hosts"),
}

# config.json of the paper's checkpoints (architecture only).
LLAMA3_8B_HF = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128009],
    pad_token_id=None, hidden_act="silu")
MISTRAL_7B_HF = dict(
    model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
    sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=None, hidden_act="silu")


def _need(ok: bool, field: str, expected: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field} must be {expected}; got {got!r}")


def _validate_judge(judge, prefix: str) -> None:
  """Checks one judge section (`config.judge` or an entry of `config.eval.judges`)."""
  kinds = ("pairwise", "reward", "verifiable")
  _need(judge.kind in kinds, f"{prefix}.kind", f"one of {kinds}", judge.kind)
  # The verifiable judge is a program: it reads the prompts' constraints, no model.
  if judge.kind != "verifiable":
    _need(bool(judge.path), f"{prefix}.path", "a local path", judge.path)
  presets = ("rlhflow_pair_pm", "plain", "self_judge")  # onpo_jax.oracles.judge.JUDGE_PRESETS
  _need(judge.get("preset", "rlhflow_pair_pm") in presets, f"{prefix}.preset",
        f"one of {presets}", judge.get("preset"))
  _need(int(judge.micro_batch_size) >= 1, f"{prefix}.micro_batch_size", "an int >= 1",
        judge.micro_batch_size)


def validate_config(config) -> None:
  """Raises ValueError naming the config field that is missing or wrong.

  Args:
    config: the llm config (`configs/llm_common.py` lists its fields).

  Raises:
    ValueError: the message starts with `config.<section>.<field>`.
  """
  sp = config.selfplay
  for field in ("policy.path", "data.paths"):
    section, key = field.split(".")
    _need(bool(config[section][key]), field, "a local path", config[section][key])
  _validate_judge(config.judge, "judge")
  judges = config.eval.judges
  for name in judges:
    _validate_judge(judges[name], f"eval.judges.{name}")
  if judges:
    _need(bool(config.eval.prompt_file), "eval.prompt_file",
          "a local path when eval.judges is set (they judge its answers)", config.eval.prompt_file)
  methods_lib.validate_selfplay(sp, _need)
  methods = tuple(sp.methods)
  _need(sp.lr_schedule in ("cosine", "constant"), "selfplay.lr_schedule", "'cosine' or 'constant'",
        sp.lr_schedule)
  _need(0 <= sp.warmup_ratio < 1, "selfplay.warmup_ratio", "in [0, 1)", sp.warmup_ratio)
  for field in ("num_rounds", "prompts_per_round", "epochs", "global_batch_size",
                "minibatch_size"):
    _need(isinstance(sp[field], int) and sp[field] >= 1, f"selfplay.{field}", "an int >= 1",
          sp[field])
  optim.accumulation_steps(sp.global_batch_size, sp.minibatch_size)
  for m in methods:
    optim.updates_per_regression(config, m)
  if "nash_md" in methods:
    # One update per fresh sample set: the round's samples are one global batch.
    k_total = int(sp.prompts_per_round) * int(sp.num_samples)
    _need(k_total == int(sp.global_batch_size), "selfplay.global_batch_size",
          f"= prompts_per_round x num_samples = {k_total} when selfplay.methods has 'nash_md' "
          "(its REINFORCE gradient is unbiased only at the policy that sampled)",
          sp.global_batch_size)
  for field in ("sampling.micro_batch_size", "eval.micro_batch_size", "sampling.max_new_tokens",
                "data.max_prompt_length"):
    section, key = field.split(".")
    _need(int(config[section][key]) >= 1, field, "an int >= 1", config[section][key])
  _need(max(config.sampling.prompt_buckets) >= config.data.max_prompt_length,
        "sampling.prompt_buckets", f"a largest bucket >= data.max_prompt_length = "
        f"{config.data.max_prompt_length}", tuple(config.sampling.prompt_buckets))
  shape = tuple(config.mesh.shape)
  _need(len(shape) == 3 and sum(s == -1 for s in shape) <= 1
        and all(s == -1 or s >= 1 for s in shape), "mesh.shape",
        "(data, fsdp, tensor) positive ints with at most one -1", shape)
  _need(0 < config.eval.confidence < 1, "eval.confidence", "in (0, 1)", config.eval.confidence)
  shown = config.eval.show_examples
  _need(isinstance(shown, int) and shown >= 0, "eval.show_examples", "an int >= 0", shown)
  _need(0 <= config.inpo.tau < config.inpo.eta_inpo, "inpo.tau", "0 <= τ < inpo.eta_inpo",
        config.inpo.tau)


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """`config.mesh.shape` with its -1 resolved for `num_devices` devices.

  Args:
    config: the llm config.
    num_devices: devices the mesh must use exactly.

  Returns:
    (data, fsdp, tensor) with product `num_devices`.

  Raises:
    ValueError: the shape cannot cover exactly `num_devices` devices.
  """
  shape = list(config.mesh.shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)}: {num_devices} devices are "
                       f"not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices; "
                     f"{num_devices} are available")
  return tuple(shape)


def check_context(config, model_config, path: str) -> None:
  """Raises ValueError when a prompt and its answer cannot fit the policy's context.

  A prompt is left-padded to the smallest `sampling.prompt_buckets` entry that
  holds `data.max_prompt_length`; the sampler's cache then needs that many
  slots plus the new tokens, for the rounds and for the evaluation.

  Args:
    config: the llm config (validated).
    model_config: the policy's DecoderConfig (`loading.checkpoint_config`).
    path: the policy checkpoint, named in the message.
  """
  limit = int(model_config.max_position_embeddings)
  length = int(config.data.max_prompt_length)
  bucket = min(b for b in config.sampling.prompt_buckets if b >= length)
  fields = ("sampling.max_new_tokens",) + (("eval.max_new_tokens",) if config.eval.prompt_file
                                           else ())
  for field in fields:
    section, key = field.split(".")
    new = int(config[section][key])
    if bucket + new > limit:
      raise ValueError(
          f"config.data.max_prompt_length={length} (padded to the prompt bucket {bucket}) + "
          f"config.{field}={new} = {bucket + new} tokens exceeds the policy's context, "
          f"max_position_embeddings={limit} in {path}")
