"""Per-device memory of an alignment run, from shapes alone (`jax.eval_shape`).

Nothing is allocated: parameter shapes come from `nnx.eval_shape` of the
decoder, optimizer-state shapes from `jax.eval_shape(opt.init, params)`, and
the KV cache from `jax.eval_shape(init_cache, ...)`. Each leaf's per-device
share follows the same logical-axis rules the run uses
(`onpo_jax.models.sharding`), on a mesh given only by its axis sizes, so a
TPU v5p-64 or an 8×GPU node can be planned on a laptop.

What one device holds during an ONPO round (ONPO arXiv 2502.16852, Alg. 1):
  * policy π_θ: trained parameters (`policy.param_dtype`, f32 master weights);
  * optimizer state: Adam moments, the `onpo_step` copy of the auxiliary
    policy π' (and of π_t with `init_from='policy'`), and the gradient
    accumulator of `optax.MultiSteps` when micro-batching;
  * frozen roles in their own dtype (bf16 in the paper configs): the reference
    π_ref (SFT, for INPO / DPO anchors) and the judge (pairwise preference
    model); 0 when offloaded to host memory between phases;
  * gradients of one train step: a tree shaped like the trained parameters,
    alive from the backward pass to the optimizer update;
  * KV cache of one sampling micro-batch (K responses per prompt): the largest
    prompt bucket + N slots, or with `sampling.cache_segments` > 1 the caches
    of several lengths alive at once (`SamplingConfig.peak_cache_slots`);
  * with feature-major decoding steps (`sampling.decode_layout`, by default
    on CPU) a transposed copy of the kernels of each model decoded at once,
    in the compute dtype, while the sampler runs.
Activations and XLA's other temporaries are not counted (they depend on remat
and XLA's scheduling); the job reads them from the compiled train step after
its first round (`Engine.train_step_memory`, memory.json's
`train_step_compiled`).

With LoRA (`estimate(..., lora=...)`; `onpo_jax.models.lora`) one frozen base
in `base_dtype` serves every role: the policy is an adapter tree (the
`LoraConfig`'s dtype), π' is `onpo_step`'s copy of it, the optimizer holds
Adam moments of the adapters only, and π_ref is the base itself (no copy; a
fixed reference adapter adds one adapter tree). The forward pass runs on merged
kernels W0 + (α/r)·a@b in the base dtype; `merged_params` counts all of them at
once, the upper bound when XLA keeps every layer's merged kernels alive.

Leaf by leaf, the bytes are those of the largest shard, as XLA pads
(`onpo_jax.llm.device_bytes`).

`estimate_memory(config, mesh_dims)` plans a whole `llm` config: the decoders
come from config.json (`policy.path`, `judge.path`) or, when those directories
are absent, from `policy.hf_config` / `judge.hf_config`, and the optimizer is
the one the run builds (`onpo_jax.llm.optim`). The job checks its plan with
`check_fits(plan, device_capacity())` before it loads any model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from onpo_jax.llm import config as llm_config
from onpo_jax.llm import optim
from onpo_jax.llm.device_bytes import GIB, abstract_params, check_mesh_shape
from onpo_jax.llm.device_bytes import kv_cache_bytes_per_device, optimizer_bytes_per_device
from onpo_jax.llm.device_bytes import path_key, shard_bytes, specs_by_path, tree_bytes_per_device
from onpo_jax.models import loading
from onpo_jax.models import lora as lora_lib
from onpo_jax.models import sharding as sharding_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.onpo_step import onpo_step
from onpo_jax.sampling_config import SamplingConfig
from onpo_jax.selfplay import methods as methods_lib



@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Per-device bytes of each part of a run (module docstring)."""
  mesh_shape: dict
  num_params: int
  policy_params: int
  optimizer: int
  ref_params: int
  judge_params: int
  kv_cache: int
  # LoRA only (0 otherwise): the policy's adapters, and the merged kernels of a
  # forward pass (upper bound); `policy_params` is then the frozen base.
  num_adapter_params: int = 0
  adapter_params: int = 0
  merged_params: int = 0
  # One gradient of every trained leaf (the adapters with LoRA).
  gradients: int = 0
  # The transposed copies of the kernels that feature-major decoding steps
  # read (`SamplingConfig.decode_layout`), for the models decoded at once.
  decode_kernels: int = 0

  @property
  def total(self) -> int:
    return (self.policy_params + self.adapter_params + self.merged_params + self.optimizer
            + self.gradients + self.ref_params + self.judge_params + self.kv_cache
            + self.decode_kernels)

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["total"] = self.total
    return d

  def summary(self) -> str:
    keys = ("policy_params", "optimizer", "gradients", "ref_params", "judge_params", "kv_cache")
    if self.num_adapter_params:
      keys = ("policy_params", "adapter_params", "merged_params") + keys[1:]
    if self.decode_kernels:
      keys += ("decode_kernels",)
    parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in keys)
    lora = (f" (LoRA: {self.num_adapter_params / 1e6:.1f}M adapter params)"
            if self.num_adapter_params else "")
    return (f"mesh {self.mesh_shape}: {self.num_params / 1e9:.2f}B params{lora}; per device "
            f"(GiB): {parts}; total {self.total / GIB:.2f}")


def estimate(policy_config: DecoderConfig, opt, mesh_shape: Mapping[str, int], *,
             rules=sharding_lib.DEFAULT_RULES, ref_config: DecoderConfig | None = None,
             judge_config: DecoderConfig | None = None,
             eval_judge_configs: Sequence[DecoderConfig] = (), kv_batch_size: int = 1,
             kv_length: int = 1, kv_dtype=None, lora: lora_lib.LoraConfig | None = None,
             base_dtype=None, ref_adapter: bool = False, decode_copies: int = 0
             ) -> MemoryEstimate:
  """Per-device memory of the policy, its optimizer, the frozen roles and a KV cache.

  Args:
    policy_config: the trained policy.
    opt: its optax optimizer (as the run builds it).
    mesh_shape: {axis: size}, e.g. {'data': 1, 'fsdp': 8, 'tensor': 1}.
    rules: logical -> mesh axis rules.
    ref_config: the frozen reference (None: not resident, e.g. offloaded).
    judge_config: the judge's decoder (None: not resident).
    eval_judge_configs: decoders of further judges kept for the evaluation
      (counted in `judge_params`).
    kv_batch_size: rows of one sampling micro-batch (prompts × K).
    kv_length: cache slots (max prompt length + max new tokens).
    kv_dtype: cache dtype (None: the policy's compute dtype).
    lora: adapters over a frozen base instead of full fine-tuning (`ref_config`
      is then ignored: the reference is the base).
    base_dtype: the frozen base's dtype with `lora` (None: policy.param_dtype).
    ref_adapter: with `lora`, the reference is the base plus a fixed adapter.
    decode_copies: models whose kernels the sampler copies transposed at once
      for feature-major decoding steps (0: tokens-major steps, no copy).
  """
  mesh_shape = check_mesh_shape(mesh_shape)
  decode_kernels = (decode_copies * _kernel_bytes(policy_config, rules, mesh_shape)
                    if decode_copies else 0)
  if lora is not None:
    return dataclasses.replace(
        _estimate_lora(policy_config, opt, mesh_shape, rules, lora, base_dtype, ref_adapter,
                       judge_config, eval_judge_configs, kv_batch_size, kv_length, kv_dtype),
        decode_kernels=decode_kernels)
  params, specs = abstract_params(policy_config, rules, mesh_shape)

  frozen = functools.partial(_frozen_bytes, rules=rules, mesh_shape=mesh_shape)
  policy_bytes = tree_bytes_per_device(params, specs, mesh_shape)
  return MemoryEstimate(
      mesh_shape=mesh_shape,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
      policy_params=policy_bytes,
      gradients=policy_bytes,
      optimizer=optimizer_bytes_per_device(opt, params, specs, mesh_shape),
      ref_params=frozen(ref_config),
      judge_params=frozen(judge_config) + sum(frozen(c) for c in eval_judge_configs),
      kv_cache=kv_cache_bytes_per_device(policy_config, kv_batch_size, kv_length, mesh_shape,
                                         rules, kv_dtype),
      decode_kernels=decode_kernels)


# The projections `feature_major.decode_weights` copies (the tied embedding is
# read in place, norms and biases as they are).
_DECODE_KERNELS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def _kernel_bytes(cfg: DecoderConfig, rules, mesh_shape) -> int:
  """Per-device bytes of one copy of a decoder's kernels in its compute dtype."""
  # The parameters' shapes and specs at their own dtype (the plan's cached
  # trace), counted at the compute dtype.
  params, specs = abstract_params(cfg, rules, mesh_shape)
  spec_of = specs_by_path(specs)
  return sum(shard_bytes(x.shape, cfg.dtype, spec_of[path_key(p)], mesh_shape)
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if path_key(p)[-1] in _DECODE_KERNELS)


def _frozen_bytes(cfg, *, rules, mesh_shape) -> int:
  """Per-device bytes of a frozen decoder (0 for None: not resident)."""
  if cfg is None:
    return 0
  p, s = abstract_params(cfg, rules, mesh_shape)
  return tree_bytes_per_device(p, s, mesh_shape)


def _estimate_lora(policy_config, opt, mesh_shape, rules, lora, base_dtype, ref_adapter,
                   judge_config, eval_judge_configs, kv_batch_size, kv_length, kv_dtype):
  """`estimate` with a frozen base and adapters (module docstring)."""
  base_cfg = policy_config.replace(param_dtype=base_dtype or policy_config.param_dtype)
  base, base_specs = abstract_params(base_cfg, rules, mesh_shape)
  adapters = jax.eval_shape(lambda: lora_lib.init_adapters(base, lora, jax.random.key(0)))
  specs = lora_lib.adapter_axes(base_specs, base, lora)
  adapter_bytes = tree_bytes_per_device(adapters, specs, mesh_shape)
  spec_of = specs_by_path(base_specs)
  merged = sum(shard_bytes(t.in_shape + t.out_shape, base_cfg.param_dtype, spec_of[t.path],
                           mesh_shape)
               for t in lora_lib.targets(base, lora).values())
  return MemoryEstimate(
      mesh_shape=mesh_shape,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(base)),
      policy_params=tree_bytes_per_device(base, base_specs, mesh_shape),
      optimizer=optimizer_bytes_per_device(opt, adapters, specs, mesh_shape),
      ref_params=adapter_bytes if ref_adapter else 0,
      judge_params=(_frozen_bytes(judge_config, rules=rules, mesh_shape=mesh_shape)
                    + sum(_frozen_bytes(c, rules=rules, mesh_shape=mesh_shape)
                          for c in eval_judge_configs)),
      kv_cache=kv_cache_bytes_per_device(policy_config, kv_batch_size, kv_length, mesh_shape,
                                         rules, kv_dtype),
      num_adapter_params=sum(math.prod(x.shape) for x in jax.tree.leaves(adapters)),
      adapter_params=adapter_bytes, merged_params=merged, gradients=adapter_bytes)


# ------------------------------------------------------------ llm config plans


def decoder_configs(config) -> tuple[DecoderConfig, DecoderConfig | None]:
  """(policy, judge) DecoderConfigs of an llm config, from the checkpoints when they exist.

  A checkpoint is an HF directory (its config.json) or a GGUF file (its
  metadata); without one the plan uses `hf_config`. The verifiable judge
  (`judge.kind = 'verifiable'`) has no model: its config is None.

  Args:
    config: the llm config (`policy` and `judge` sections).

  Raises:
    ValueError: a role has neither a checkpoint nor `hf_config`.
  """

  policy = _section_config(config.policy, param_dtype=config.policy.param_dtype,
                           dtype=config.policy.dtype, remat=bool(config.policy.remat))
  return policy, judge_decoder_config(config.judge)


def _section_config(section, **overrides) -> DecoderConfig:
  """The DecoderConfig of a policy or judge section: its checkpoint, else `hf_config`."""
  path = section.path
  if path and (os.path.isdir(path) or (loading.is_gguf(path) and os.path.isfile(path))):
    return loading.checkpoint_config(path, **overrides)
  src = section.hf_config
  if src is None:
    raise ValueError(f"no checkpoint at {path!r} and no hf_config to plan from")
  if isinstance(src, ml_collections.ConfigDict):
    src = src.to_dict()
  return DecoderConfig.from_hf(src, **overrides)


def judge_decoder_config(judge) -> DecoderConfig | None:
  """The decoder of a judge section; None for the verifiable judge (a program)."""
  if judge.kind == "verifiable":
    return None
  return _section_config(judge, param_dtype=judge.dtype, dtype=judge.dtype)


def _kv_slots(sampling: SamplingConfig, backend: str) -> int:
  """KV-cache slots alive at once while the largest prompt bucket decodes.

  `SamplingConfig.peak_cache_slots` without EOS ids: with them the segments'
  ends move by less than the steps between two checks.
  """
  return sampling.peak_cache_slots(max(sampling.prompt_buckets), backend)


def _decode_copies(sampling: SamplingConfig, needs_ref: bool, backend: str) -> int:
  """Models whose kernels are copied transposed at once while sampling (0: none).

  Feature-major decoding (`sampling.decode_layout`, 'auto' on CPU) copies the
  kernels of each model it decodes; the mixture sampler decodes the policy and
  π_ref together, so 2 when a method anchors on π_ref.
  """
  if not sampling.feature_major(backend):
    return 0
  return 2 if needs_ref else 1


def estimate_memory(config, mesh_dims: tuple[int, int, int] | None = None, *,
                    lora: lora_lib.LoraConfig | None = None, base_dtype: str | None = None,
                    ref_adapter: bool = False, backend: str | None = None) -> MemoryEstimate:
  """Per-device bytes of an llm config on its mesh, nothing allocated.

  The optimizer is the one the run builds for the first method; π_ref counts
  only when some method anchors on it and it is not offloaded, each judge (the
  rounds' and `eval.judges`) when it is not offloaded; the KV cache is one
  sampling micro-batch at the longest prompt bucket plus N new tokens. With
  `lora` the policy is adapters over a frozen base (module docstring).

  Args:
    config: the llm config.
    mesh_dims: (data, fsdp, tensor); None: `config.mesh.shape`, which must
      then have no -1.
    lora, base_dtype, ref_adapter: as `estimate`.
    backend: the platform the run samples on, a `jax.default_backend()` name
      ('cpu', 'gpu', 'tpu'; None: this process's). It sets what
      `sampling.decode_layout='auto'` and the EOS check period become, so a
      GPU or TPU run planned on a laptop passes its own.

  Raises:
    ValueError: no mesh without -1 to plan on, or no architecture to plan from.
  """
  backend = backend or jax.default_backend()
  policy, judge = decoder_configs(config)
  if mesh_dims is None:
    if -1 in tuple(config.mesh.shape):
      raise ValueError("config.mesh.shape has a -1; pass mesh_dims for a memory plan")
    mesh_dims = tuple(config.mesh.shape)
  name = config.selfplay.methods[0]
  spec = methods_lib.METHODS[name]
  inner = optim.make_inner_optimizer(config, optim.updates_per_regression(config, name))
  opt = (onpo_step(inner, variant=spec.variant, init_from=config.selfplay.init_from)
         if spec.variant else inner)
  needs_ref = any("ref" in methods_lib.METHODS[m].anchors for m in config.selfplay.methods)
  # No EOS ids: `_kv_slots`.
  sampling = llm_config.sampling_config(config,
                                        max_new_tokens=int(config.sampling.max_new_tokens))
  return estimate(
      policy, opt, dict(zip(("data", "fsdp", "tensor"), mesh_dims)),
      ref_config=(policy.replace(param_dtype=config.ref.dtype)
                  if needs_ref and not config.ref.offload else None),
      judge_config=None if config.judge.offload else judge,
      eval_judge_configs=[c for j in config.eval.judges.values()
                          if not j.offload and (c := judge_decoder_config(j)) is not None],
      kv_batch_size=int(config.sampling.micro_batch_size),
      kv_length=_kv_slots(sampling, backend),
      kv_dtype=config.sampling.cache_dtype, lora=lora, base_dtype=base_dtype,
      ref_adapter=lora is not None and needs_ref and ref_adapter,
      decode_copies=_decode_copies(sampling, needs_ref, backend))


class MemoryPlanError(ValueError):
  """A plan's per-device bytes exceed what one device holds."""


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
  """The host's available RAM (`MemAvailable`), None where it cannot be read."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          value, unit = line.split()[1:3]
          return int(value) * {"kB": 1024}[unit]
  except (OSError, ValueError, KeyError, IndexError):
    pass
  return None


def device_capacity(devices: Sequence[Any] | None = None, *, meminfo: str = "/proc/meminfo"
                    ) -> tuple[int, str] | None:
  """Bytes one of `devices` can hold, and where the number comes from.

  An accelerator reports its allocator's limit (`memory_stats()['bytes_limit']`,
  the smallest over `devices`); CPU devices share the host's RAM, so each gets
  the available RAM divided by their number.

  Args:
    devices: default this process's devices (`jax.local_devices()`).
    meminfo: the host's memory table (Linux).

  Returns:
    (bytes, description), or None where no device reports a limit.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if devices and all(d.platform == "cpu" for d in devices):
    available = host_available_bytes(meminfo)
    if available is None:
      return None
    return (available // len(devices),
            f"host RAM available ({available / GIB:.2f} GiB in {meminfo}) shared by "
            f"{len(devices)} CPU device(s)")
  limits = [(stats or {}).get("bytes_limit") for stats in (d.memory_stats() for d in devices)]
  if not limits or None in limits:
    return None
  return min(limits), f"memory limit of a {devices[0].device_kind} (memory_stats)"


def check_fits(plan: MemoryEstimate, capacity: tuple[int, str] | None) -> None:
  """Stops a run whose plan cannot fit, before any model is loaded.

  The plan leaves out activations and XLA's scratch, so it is a lower bound:
  past the capacity the run would fail later, after loading and sampling.

  Raises:
    MemoryPlanError: `plan.total` exceeds `capacity` (None: nothing to check).
  """
  if capacity is None or plan.total <= capacity[0]:
    return
  raise MemoryPlanError(
      f"memory plan: {plan.total / GIB:.2f} GiB per device before activations ({plan.summary()}) "
      f"exceeds the {capacity[0] / GIB:.2f} GiB of one device ({capacity[1]}). Smaller settings: "
      "more devices in mesh.shape's fsdp axis, lora.enabled=True, policy.param_dtype, "
      "sampling.micro_batch_size, ref.offload / judge.offload=True, sampling.decode_layout="
      "'tokens' (no transposed kernels on CPU); check_memory=False runs anyway")


def lora_comparison(config, mesh_dims: tuple[int, int, int], ranks: Sequence[int] = (16, 64), *,
                    lora: lora_lib.LoraConfig | None = None,
                    base_dtype: str = "bfloat16", backend: str | None = None
                    ) -> dict[str, MemoryEstimate]:
  """Plans of `config` with full fine-tuning and with LoRA at each rank.

  Args:
    config: the llm config (full fine-tuning).
    mesh_dims: (data, fsdp, tensor).
    ranks: LoRA ranks to plan.
    lora: the other LoRA settings (targets, α, adapter dtype); None: the defaults
      of `LoraConfig` (every projection, α = 32).
    base_dtype: the frozen base's dtype in the LoRA plans.
    backend: as `estimate_memory`.

  Returns:
    {"full": ..., "lora_r<rank>": ...}.
  """
  lora = lora or lora_lib.LoraConfig()
  out = {"full": estimate_memory(config, mesh_dims, backend=backend)}
  for r in ranks:
    out[f"lora_r{r}"] = estimate_memory(config, mesh_dims, lora=dataclasses.replace(lora, rank=int(r)),
                                        base_dtype=base_dtype, backend=backend)
  return out
