"""Host copies of sharded arrays and the policy's export as a Hugging Face directory.

A LoRA policy (`onpo_jax.models.lora`) is exported twice over: its adapters as a
PEFT directory (`export_peft_adapters`, read back by `load_peft_adapters`) and
base + adapters merged into a plain HF checkpoint (`export_merged_policy`).

All work on one host or many: a multi-host sharded array is gathered with
`multihost_utils.process_allgather`, and every process takes part in an export
while only process 0 writes files.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from onpo_jax.models import lora
from onpo_jax.models import lora_io


def host_gather(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as a full numpy copy on every process.

  Args:
    x: a jax.Array (any sharding) or anything `np.asarray` accepts.

  Returns:
    The whole array as numpy, identical on every process.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def export_policy(graphdef, params, path: str, *, dtype: str, max_shard_size, tokenizer=None):
  """Writes the policy as a HF directory (process 0 writes; every process must call).

  Each tensor is cast to `dtype` on device before it is gathered to the host,
  one tensor at a time.

  Args:
    graphdef: the policy's graphdef.
    params: its parameter state (any sharding, any number of processes).
    path: output directory.
    dtype: dtype of the written tensors (and of config.json's torch_dtype).
    max_shard_size: safetensors shard size, e.g. "5GB".
    tokenizer: written next to the weights when given.

  Returns:
    `path`.
  """
  from onpo_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  from onpo_jax.models.decoder import Decoder  # pylint: disable=g-import-not-at-top
  cfg = nnx.merge(graphdef, params).config.replace(param_dtype=dtype, remat=False)
  host = jax.tree.map(lambda x: host_gather(x.astype(jnp.dtype(dtype))), params)
  if jax.process_index() == 0:
    export_graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0))))[0]
    hf_io.save_hf_checkpoint(nnx.merge(export_graphdef, host), path, max_shard_size=max_shard_size)
    if tokenizer is not None:
      tokenizer.save_pretrained(path)
  multihost_utils.sync_global_devices(f"export {path}")
  return path


def export_peft_adapters(adapters, lora_config, path: str, *, dtype: str | None = None,
                         base_model_name_or_path: str | None = None) -> str:
  """Writes adapters as a PEFT directory (process 0 writes; every process must call).

  adapter_config.json + adapter_model.safetensors, which
  `peft.PeftModel.from_pretrained(<the transformers base model>, path)` loads
  (`onpo_jax.models.lora_io` gives the layout).

  Args:
    adapters: the adapter tree (`onpo_jax.models.lora`), any sharding.
    lora_config: the `lora.LoraConfig` they were made with.
    path: output directory.
    dtype: dtype of the written tensors; None keeps the adapters' dtype.
    base_model_name_or_path: recorded in adapter_config.json (PEFT reads it
      only when it loads the base itself).

  Returns:
    `path`.
  """
  host = jax.tree.map(host_gather, adapters)
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    save_file(lora_io.peft_tensors(host, dtype), os.path.join(path, lora_io.WEIGHTS_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(path, lora_io.CONFIG_FILE), "w") as f:
      json.dump(lora_io.peft_adapter_config(lora_config,
                                            base_model_name_or_path=base_model_name_or_path),
                f, indent=2, sort_keys=True)
  multihost_utils.sync_global_devices(f"export adapters {path}")
  return path


def load_peft_adapters(path: str, base_params, *, dtype: str = "float32"):
  """Reads a PEFT LoRA directory onto this base: (adapter tree, LoraConfig).

  Args:
    path: directory with adapter_config.json and adapter_model.safetensors.
    base_params: the base's parameter state (concrete or abstract), for the
      kernel shapes.
    dtype: dtype of the returned factors.

  Raises:
    FileNotFoundError: a file is missing.
    LoraConfigError / BaseMismatchError: see `lora_io.adapters_from_peft`.
  """
  files = [os.path.join(path, n) for n in (lora_io.CONFIG_FILE, lora_io.WEIGHTS_FILE)]
  for f in files:
    if not os.path.exists(f):
      raise FileNotFoundError(f"{path}: expected {lora_io.CONFIG_FILE} and "
                              f"{lora_io.WEIGHTS_FILE} (PEFT LoRA); {f} is missing")
  with open(files[0]) as f:
    config = lora_io.lora_config_from_peft(json.load(f), dtype=dtype)
  return lora_io.adapters_from_peft(load_file(files[1]), base_params, config), config


def export_merged_policy(graphdef, base_params, adapters, lora_config, path: str, *, dtype: str,
                         max_shard_size, tokenizer=None) -> str:
  """Writes base + adapters merged (W0 + (α/r)·a@b) as a HF directory.

  Each kernel is merged in the adapter dtype and cast to `dtype` at once, so the
  devices hold the merged kernels in `dtype`, never a float32 copy of the model.

  Args:
    graphdef: the policy's graphdef.
    base_params: the frozen base state.
    adapters: the adapter tree.
    lora_config: the `lora.LoraConfig`.
    path, dtype, max_shard_size, tokenizer: as `export_policy`.

  Returns:
    `path`.
  """
  merged = lora.merge(base_params, adapters, lora_config, dtype=jnp.dtype(dtype))
  return export_policy(graphdef, merged, path, dtype=dtype, max_shard_size=max_shard_size,
                       tokenizer=tokenizer)
