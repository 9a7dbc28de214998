"""What the engine trains, mapped to the decoder's parameters: full weights or LoRA adapters.

With full fine-tuning the trained tree is the decoder's parameter state and the
reference π_ref is a frozen copy of π_SFT. With LoRA (`config.lora.enabled`,
`onpo_jax.models.lora`) every role is a tree over one frozen base held once:

  * the policy π_t: an adapter tree, W = W0 + (α/r)·a@b (Hu et al., arXiv
    2106.09685, eq. 3); a fresh tree (b = 0) is π_SFT exactly;
  * ONPO's auxiliary π': `onpo_step`'s copy of the adapter tree;
  * π_ref = π_SFT: the base itself, passed around as `None` (no adapter).

The base is the `frozen` argument of every jitted function that needs the
model (the train step, anchor log-probs, the merge before sampling), never a
constant closed over, so one compiled step serves any base of the same shapes
and the base is not copied into each executable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onpo_jax.models import lora as lora_lib
from onpo_jax.models import lora_io


class FullParams:
  """Full fine-tuning: the trained tree is the decoder's state; nothing is frozen."""

  frozen = None
  lora = None

  def state(self, params, frozen=None):
    """The decoder's parameter state of `params` (itself)."""
    del frozen
    return params

  def materialize(self, params):
    return params


class LoraParams:
  """LoRA: trained trees are adapters over `base`; `None` stands for the base alone.

  Args:
    base: the frozen base's parameter state (stored in `config.lora.base_dtype`).
    config: the `lora.LoraConfig`.
    dtype: dtype of the merged kernels; the layers compute in `policy.dtype`,
      so merging straight to it loses nothing the layers would keep.
  """

  def __init__(self, base, config: lora_lib.LoraConfig, dtype):
    self.frozen = base
    self.lora = config
    self.dtype = jnp.dtype(dtype)
    self._merge = jax.jit(self.state)

  def state(self, params, frozen):
    """The decoder's parameter state: `frozen` with the adapters of `params` merged in.

    Args:
      params: an adapter tree, or None for the base (π_ref).
      frozen: the base state (an argument, so it is traced, not embedded).
    """
    if params is None:
      return frozen
    return lora_lib.merge(frozen, params, self.lora, dtype=self.dtype)

  def materialize(self, params):
    """The merged parameter state, for the sampler and the evaluation (one jitted merge)."""
    return self.frozen if params is None else self._merge(params, self.frozen)

  def init(self, key):
    """Fresh adapters placed like the base's kernels (`lora.adapter_shardings`)."""
    return lora_lib.init_adapters(self.frozen, self.lora, key)

  def fingerprint(self) -> str:
    """Identity of the base the adapters belong to (`lora_io.base_fingerprint`)."""
    return lora_io.base_fingerprint(self.frozen)


def lora_enabled(config) -> bool:
  """Whether the llm config trains LoRA adapters (configs older than `config.lora` do not)."""
  return config.get("lora") is not None and bool(config.lora.enabled)


def adapted_params(config, base, *, mesh=None, rules=None):
  """(FullParams or LoraParams, the initial trained tree) for the llm config.

  Args:
    config: the llm config; `config.lora.enabled` picks LoRA.
    base: the loaded policy's parameter state (π_SFT).
    mesh, rules: where the adapters go (sharded like the kernels they adapt).
  """
  if not lora_enabled(config):
    return FullParams(), base
  cfg = lora_config(config.lora)
  policy = LoraParams(base, cfg, config.policy.dtype)
  # A stream of its own: the adapters' init must not move any other draw of the run.
  key = jax.random.fold_in(jax.random.key(int(config.seed)), 2**21)
  if mesh is None:
    return policy, policy.init(key)
  shardings = lora_lib.adapter_shardings(base, cfg, mesh, rules)
  init = jax.jit(policy.init, out_shardings=shardings)
  return policy, init(key)


def lora_config(section) -> lora_lib.LoraConfig:
  """The `lora.LoraConfig` of a `config.lora` section (no rank / alpha patterns: PEFT files
  that carry them are read by `llm.export.load_peft_adapters`)."""
  return lora_lib.LoraConfig.from_config(section)
