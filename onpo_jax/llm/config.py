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
import os
import re
from typing import Any, Mapping

import ml_collections

from onpo_jax.infra import checks
from onpo_jax.llm import optim
from onpo_jax.models import lora as lora_lib
from onpo_jax.sampling_config import CACHE_DTYPES, DECODE_LAYOUTS, SamplingConfig
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


# The job runs without JAX's x64 mode, so float64 (which DecoderConfig allows) is out.
RUN_DTYPES = ("float32", "bfloat16")
PROMPT_SOURCES = ("files", "hf_dir", "tfds")  # onpo_jax.data.sources.PROMPT_SOURCES
OVERLONG_POLICIES = ("drop", "truncate")  # onpo_jax.data.prompts.OVERLONG_POLICIES
JUDGE_KINDS = ("pairwise", "reward", "verifiable")
JUDGE_PRESETS = ("rlhflow_pair_pm", "plain", "self_judge")  # onpo_jax.oracles.judge.JUDGE_PRESETS
# What hf_io.save_hf_checkpoint's max_shard_size parses: bytes, or e.g. '5GB'.
_SHARD_SIZE = re.compile(r"\s*(\d+(\.\d*)?)\s*(KB|MB|GB)?\s*", re.IGNORECASE)

_is_int, _is_real = methods_lib.is_int, checks.is_real


def _need(ok: bool, field: str, expected: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field} must be {expected}; got {got!r:.200}")


def _is_mapping(value: Any) -> bool:
  # A dict assigned to a ConfigDict field becomes a ConfigDict, which is no Mapping.
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _shard_size_ok(value: Any) -> bool:
  if checks.is_int(value):
    return value >= 1  # bytes; 5 GB exceeds int32, so no INT_MAX bound here
  m = _SHARD_SIZE.fullmatch(value) if isinstance(value, str) else None
  return m is not None and float(m.group(1)) > 0


# (check, what the message says is expected) of the field kinds below.
_INT0 = (lambda v: _is_int(v, 0), "an int >= 0 (below 2**31)")
_INT1 = (lambda v: _is_int(v, 1), "an int >= 1 (below 2**31)")
_BOOL = (lambda v: isinstance(v, bool), "True or False")
_STR = (lambda v: isinstance(v, str), "a string")
_POSITIVE = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
_NONNEG = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")
_HF_CONFIG = (lambda v: v is None or _is_mapping(v), "None or a config.json dict")
_OPT_INT0 = (lambda v: v is None or _is_int(v, 0), "None or an int >= 0")


def _choice(options: tuple[str, ...]) -> tuple:
  return (lambda v: isinstance(v, str) and v in options, f"one of {options}")


def _check(section, prefix: str, checks: Mapping[str, tuple]) -> None:
  """`_need` over a section's fields: {key: (check, expected)}."""
  for key, (ok, expected) in checks.items():
    _need(ok(section[key]), f"{prefix}.{key}", expected, section[key])


def _need_path(path: Any, field: str, *, checkpoint: bool = False, directory: bool = False,
               optional: bool = False, expected: str = "a local path") -> None:
  """A path field: a string, and (unless empty and `optional`) an existing one.

  Checked here so that a missing file stops the job before it writes its
  workdir or loads a model. `checkpoint`: a .gguf file or an HF directory.
  """
  _need(isinstance(path, str) and (optional or bool(path)), field, expected, path)
  if not path:
    return
  if checkpoint:
    directory = not path.endswith(".gguf")
  exists = os.path.isdir(path) if directory else os.path.isfile(path)
  if not exists:
    raise FileNotFoundError(f"config.{field}: {path!r} is not an existing "
                            f"{'directory' if directory else 'file'}")


def _validate_judge(judge, prefix: str) -> None:
  """Checks one judge section (`config.judge` or an entry of `config.eval.judges`)."""
  _need(_is_mapping(judge), prefix, "a judge section (llm_common.judge_section())", judge)
  _need(judge.kind in JUDGE_KINDS, f"{prefix}.kind", f"one of {JUDGE_KINDS}", judge.kind)
  # The verifiable judge is a program: it reads the prompts' constraints, no model.
  if judge.kind != "verifiable":
    _need_path(judge.path, f"{prefix}.path", checkpoint=True)
    _need_path(judge.get("tokenizer_path", ""), f"{prefix}.tokenizer_path", checkpoint=True,
               optional=True, expected="a local path ('' = the judge's path)")
  else:
    _need(isinstance(judge.path, str), f"{prefix}.path", "a string ('' for 'verifiable')",
          judge.path)
    _need(isinstance(judge.get("tokenizer_path", ""), str), f"{prefix}.tokenizer_path",
          "a string", judge.get("tokenizer_path"))
  _need(judge.get("preset", "rlhflow_pair_pm") in JUDGE_PRESETS, f"{prefix}.preset",
        f"one of {JUDGE_PRESETS}", judge.get("preset"))
  labels = judge.get("labels", ("A", "B"))
  _need(isinstance(labels, (tuple, list)) and len(labels) == 2
        and all(isinstance(x, str) and x for x in labels) and labels[0] != labels[1],
        f"{prefix}.labels", "two different non-empty strings (the judge's answer tokens)", labels)
  optional = {"dtype": _choice(RUN_DTYPES), "template": _STR, "use_chat_template": _BOOL,
              "max_length": _INT1, "offload": _BOOL, "hf_config": _HF_CONFIG}
  _check(judge, prefix, {"micro_batch_size": _INT1} | {
      k: v for k, v in optional.items() if k in judge})


def _validate_lora(config) -> None:
  """Checks the `lora` section (optional: configs older than it train full weights).

  What depends on the model (a module it lacks, a rank above a kernel's
  min(in, out)) is checked against the checkpoint's shapes in `check_lora`.
  """
  lo = config.get("lora")
  if lo is None:
    return
  _check(lo, "lora", {
      "enabled": _BOOL, "rank": _INT1, "alpha": _POSITIVE,
      "target_modules": (lambda v: v == "all-linear" or (
          isinstance(v, (tuple, list)) and len(v) >= 1 and len(set(v)) == len(v)
          and all(isinstance(m, str) and m in lora_lib.ALL_LINEAR for m in v)),
                         f"'all-linear' or distinct names among {lora_lib.ALL_LINEAR}"),
      "dropout": (lambda v: _is_real(v) and v == 0,
                  "0.0: adapters are merged into the weights (W0 + (α/r)·a@b), which never see "
                  "the adapter's input activations that dropout acts on"),
      "adapter_dtype": _choice(RUN_DTYPES), "base_dtype": _choice(RUN_DTYPES)})
  _need(not (lo.enabled and config.ref.offload), "ref.offload",
        "False when lora.enabled (π_ref is the frozen base, which the policy's adapters read "
        "in every pass)", config.ref.offload)


def check_lora(config, model_config) -> None:
  """Raises `lora.LoraConfigError` (a ValueError) when `config.lora` cannot apply to the model.

  On abstract shapes only (`nnx.eval_shape`), so it runs before any weight loads.

  Args:
    config: the llm config (validated).
    model_config: the policy's DecoderConfig (`loading.checkpoint_config`).
  """
  from onpo_jax.llm import adapted  # pylint: disable=g-import-not-at-top
  if not adapted.lora_enabled(config):
    return
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from onpo_jax.models.decoder import Decoder  # pylint: disable=g-import-not-at-top
  abstract = nnx.state(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(params=0))))
  lora_lib.targets(abstract, adapted.lora_config(config.lora))


def validate_config(config) -> None:
  """Raises ValueError naming the config field that is missing or wrong.

  Every field the job reads is checked, types before ranges and ranges before
  the fields that constrain each other, so that nothing reaches a comparison,
  the workdir or JAX unchecked.

  Args:
    config: the llm config (`configs/llm_common.py` lists its fields).

  Raises:
    ValueError: the message starts with `config.<section>.<field>`.
    FileNotFoundError: a path field names no existing file or directory
      (`config.<section>.<field>` and the path).
  """
  sp = config.selfplay
  _need(config.get("experiment") == "llm", "experiment", "'llm'", config.get("experiment"))
  _need(_is_int(config.seed), "seed", "an int in [0, 2**31) (the PRNG seed)", config.seed)
  _check(config.policy, "policy", {
      "param_dtype": _choice(RUN_DTYPES), "dtype": _choice(RUN_DTYPES), "remat": _BOOL,
      "logprob_chunk_size": _INT0, "hf_config": _HF_CONFIG})
  _need_path(config.policy.path, "policy.path", checkpoint=True)
  _need_path(config.policy.tokenizer_path, "policy.tokenizer_path", checkpoint=True,
             optional=True, expected="a local path ('' = policy.path)")
  _check(config.ref, "ref", {"dtype": _choice(RUN_DTYPES), "offload": _BOOL})
  _validate_lora(config)
  data = config.data
  _check(data, "data", {
      "source": _choice(PROMPT_SOURCES), "split": (lambda v: isinstance(v, str) and bool(v),
                                                   "a split name"),
      "tfds_data_dir": _STR, "max_prompt_length": _INT1, "overlong": _choice(OVERLONG_POLICIES),
      "use_chat_template": _BOOL, "shuffle_seed": _INT0})
  paths = [data.paths] if isinstance(data.paths, str) else data.paths
  _need(isinstance(paths, (tuple, list)) and len(paths) >= 1
        and (data.source != "hf_dir" or len(paths) == 1), "data.paths",
        "a local path" + (" (one HF dataset directory)" if data.source == "hf_dir" else
                          " or a list of them"), data.paths)
  for path in paths:
    _need_path(path, "data.paths", directory=data.source == "hf_dir")
  _need(data.source != "tfds" or bool(data.tfds_data_dir), "data.tfds_data_dir",
        "a directory for the array_record files when data.source is 'tfds'", data.tfds_data_dir)
  _validate_judge(config.judge, "judge")
  judges = config.eval.judges
  _need(_is_mapping(judges), "eval.judges", "a section of named judge sections", judges)
  for name in judges:
    _validate_judge(judges[name], f"eval.judges.{name}")
  _check(config.sampling, "sampling", {
      "max_new_tokens": _INT1, "micro_batch_size": _INT1,
      "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "in (0, 1]"),
      "prompt_buckets": (lambda v: isinstance(v, (tuple, list)) and len(v) >= 1
                         and all(_is_int(b, 1) for b in v),
                         "a non-empty tuple of prompt lengths (ints >= 1)"),
      "cache_dtype": _choice(CACHE_DTYPES), "eos_check_every": _INT0,
      "cache_segments": _INT1, "decode_layout": _choice(DECODE_LAYOUTS),
      "share_prefill": _BOOL})
  methods_lib.validate_selfplay(sp, _need)
  methods_lib.validate_method_params(config, _need)
  _check(sp, "selfplay", {
      "global_batch_size": _INT1, "lr_schedule": _choice(("cosine", "constant")),
      "warmup_ratio": (lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
      "weight_decay": _NONNEG, "max_grad_norm": (_NONNEG[0], "a finite number >= 0 (0 = off)")})
  ev = config.eval
  _check(ev, "eval", {
      "max_prompts": (_INT0[0], "an int >= 0 (0 = all)"), "max_new_tokens": _INT1,
      "temperature": (_NONNEG[0], "a finite number >= 0 (0 = greedy)"),
      "micro_batch_size": _INT1, "confidence": (lambda v: _is_real(v) and 0 < v < 1, "in (0, 1)"),
      "generator": _STR, "show_examples": _INT0})
  _need_path(ev.prompt_file, "eval.prompt_file", optional=not judges,
             expected="a local path when eval.judges is set (they judge its answers)"
             if judges else "a local path ('' = no evaluation)")
  _need_path(ev.reference_outputs, "eval.reference_outputs", optional=True,
             expected="a local path ('' = the SFT policy)")
  shape = config.mesh.shape
  _need(isinstance(shape, (tuple, list)) and len(shape) == 3
        and all(_is_int(s, -1) and s != 0 for s in shape)
        and sum(s == -1 for s in shape) <= 1, "mesh.shape",
        "(data, fsdp, tensor) positive ints with at most one -1", shape)
  _check(config.mesh, "mesh", {"variant": _STR})
  _check(config.export, "export", {
      "dtype": _choice(RUN_DTYPES),
      "max_shard_size": (_shard_size_ok, "bytes (an int >= 1) or a size such as '5GB'")})
  dist = config.get("distributed")
  if dist is not None:  # optional: experiments/run.py reads it with get
    _check(dist, "distributed", {
        "enabled": _BOOL,
        "coordinator_address": (lambda v: v is None or (isinstance(v, str) and bool(v)),
                                "None or 'host:port'"),
        "num_processes": (lambda v: v is None or _is_int(v, 1), "None or an int >= 1"),
        "process_id": _OPT_INT0,
        "local_device_ids": (lambda v: v is None or _is_int(v) or (
            isinstance(v, (tuple, list)) and all(_is_int(i) for i in v)),
                             "None, a device id or a tuple of device ids (ints >= 0)")})
  _need(_is_int(config.checkpoint.max_to_keep, 1), "checkpoint.max_to_keep",
        "an int >= 1 (below 2**31)", config.checkpoint.max_to_keep)
  _need(_is_real(config.log_every_seconds) and config.log_every_seconds >= 0,
        "log_every_seconds", "a finite number of seconds >= 0", config.log_every_seconds)
  _need(isinstance(config.get("allow_config_change", False), bool), "allow_config_change",
        "True or False", config.get("allow_config_change"))
  _need(isinstance(config.get("check_memory", True), bool), "check_memory",
        "True or False", config.get("check_memory"))

  # The fields that constrain each other, now that each has its type.
  optim.accumulation_steps(sp.global_batch_size, sp.minibatch_size)
  for m in sp.methods:
    optim.updates_per_regression(config, m)
  if "nash_md" in sp.methods:
    # One update per fresh sample set: the round's samples are one global batch.
    k_total = sp.prompts_per_round * sp.num_samples
    _need(k_total == sp.global_batch_size, "selfplay.global_batch_size",
          f"= prompts_per_round x num_samples = {k_total} when selfplay.methods has 'nash_md' "
          "(its REINFORCE gradient is unbiased only at the policy that sampled)",
          sp.global_batch_size)
  _need(max(config.sampling.prompt_buckets) >= data.max_prompt_length,
        "sampling.prompt_buckets", f"a largest bucket >= data.max_prompt_length = "
        f"{data.max_prompt_length}", tuple(config.sampling.prompt_buckets))


def sampling_config(config, **fields) -> SamplingConfig:
  """A `SamplingConfig` with the run's decoding settings from `config.sampling`.

  The prompt buckets, the KV cache's dtype and segments, the EOS-check period,
  the decoding steps' layout and the shared prefill of repeated prompts, alike
  for the rounds' samplers, the evaluation's and the memory plan; `fields`
  give the rest (max_new_tokens, temperature, EOS and pad ids, ...).
  """
  sc = config.sampling
  return SamplingConfig(
      prompt_buckets=tuple(sc.prompt_buckets), cache_dtype=sc.cache_dtype,
      eos_check_every=int(sc.eos_check_every) or None, cache_segments=int(sc.cache_segments),
      decode_layout=str(sc.decode_layout), share_prefill=bool(sc.share_prefill), **fields)


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
