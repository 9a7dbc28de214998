"""LoRA adapters in and out of a process: the PEFT format and the base fingerprint.

PEFT (huggingface/peft) stores an adapter as adapter_config.json plus
adapter_model.safetensors with, per adapted torch Linear (weight [out, in]),

    base_model.model.<module>.lora_A.weight   [r, in]
    base_model.model.<module>.lora_B.weight   [out, r]

and computes h = W x + (α/r) · B A x (Hu et al., arXiv 2106.09685, eq. 3). Our
factors are a = lora_Aᵀ and b = lora_Bᵀ with the flattened in/out axes
unflattened into the kernel's head axes (`lora.py`), in the same row-major
order as `hf_io`'s q/k/v/o reshapes, so a@b is the transposed PEFT update of
exactly the HF weight `hf_io` writes for that kernel.

A checkpoint of adapters carries `base_fingerprint` of the base they were
trained on; `check_base_fingerprint` refuses a restore onto another base.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from onpo_jax.models import lora

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_VERSION = "lora-base-v1"
# PEFT options this code does not model, with the value that means "off".
_PEFT_OFF = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
             "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
             "exclude_modules": None, "layer_replication": None, "target_parameters": None,
             "lora_bias": False, "trainable_token_indices": None}


def _module_of_key(key: str) -> tuple[int, str]:
  """(layer, PEFT module name) of an adapter-tree key "layers.<i>.<sub>.<name>"."""
  parts = key.split(".")
  module = lora.MODULE_OF.get(tuple(parts[2:]))
  if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or module is None:
    raise lora.LoraConfigError(f"adapter key {key!r} names no projection of the decoder")
  return int(parts[1]), module


def peft_module_name(key: str) -> str:
  """HF module of an adapter-tree key: "layers.0.attn.q" -> "model.layers.0.self_attn.q_proj"."""
  layer, module = _module_of_key(key)
  return f"model.layers.{layer}.{lora.PROJECTIONS[module][2]}.{module}"


def peft_tensors(adapters: Mapping[str, Mapping[str, Any]], dtype=None) -> dict[str, np.ndarray]:
  """The adapter tree as PEFT's state dict (host numpy arrays, torch Linear layout).

  Args:
    adapters: {key: {"a": in_shape + (r,), "b": (r,) + out_shape}}, host arrays.
    dtype: dtype of the written tensors; None keeps theirs.
  """
  out = {}
  for key, f in adapters.items():
    a, b = np.asarray(f["a"]), np.asarray(f["b"])
    r = a.shape[-1]
    name = PEFT_PREFIX + peft_module_name(key)
    for suffix, w in (("lora_A", a.reshape(-1, r).T), ("lora_B", b.reshape(r, -1).T)):
      w = w if dtype is None else w.astype(jnp.dtype(dtype))
      out[f"{name}.{suffix}.weight"] = np.ascontiguousarray(w)
  return out


def peft_adapter_config(config: lora.LoraConfig, *,
                        base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """adapter_config.json of `config`: a plain LoRA on the decoder's projections."""
  d = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
       "lora_alpha": config.alpha, "lora_dropout": config.dropout,
       "target_modules": list(config.target_modules),
       "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
       "init_lora_weights": True, "inference_mode": True,
       "base_model_name_or_path": base_model_name_or_path, "revision": None}
  d.update(_PEFT_OFF)
  return d


def lora_config_from_peft(d: Mapping[str, Any], dtype: str = "float32") -> lora.LoraConfig:
  """The LoraConfig of an adapter_config.json.

  Raises:
    LoraConfigError: not a LoRA, or a PEFT option this code does not model
      (DoRA, rsLoRA, biases, per-layer selection, regex targets, ...).
  """
  if d.get("peft_type", "LORA") != "LORA":
    raise lora.LoraConfigError(f"{CONFIG_FILE}: peft_type {d.get('peft_type')!r} is not LORA")
  for k, off in _PEFT_OFF.items():
    v = d.get(k, off)
    if v != off and (v or off):  # an empty list or None means off as well
      raise lora.LoraConfigError(f"{CONFIG_FILE}: {k}={v!r} is not supported (only {off!r})")
  targets = d.get("target_modules")
  if isinstance(targets, str) and targets != "all-linear" and targets not in lora.PROJECTIONS:
    raise lora.LoraConfigError(f"{CONFIG_FILE}: target_modules {targets!r} is a regex; "
                               f"list module names from {list(lora.PROJECTIONS)}")
  return lora.LoraConfig(rank=d["r"], alpha=d.get("lora_alpha", 8), target_modules=targets,
                         dropout=d.get("lora_dropout", 0.0),
                         rank_pattern=d.get("rank_pattern") or {},
                         alpha_pattern=d.get("alpha_pattern") or {}, dtype=dtype)


def adapters_from_peft(tensors: Mapping[str, np.ndarray], base_params,
                       config: lora.LoraConfig) -> dict:
  """The adapter tree of PEFT tensors, reshaped to this base's kernel axes.

  Raises:
    LoraConfigError: a tensor the config needs is absent, or one it does not use is present.
    BaseMismatchError: a tensor does not fit this base's kernel.
  """
  dtype = jnp.dtype(config.dtype)
  out, used = {}, set()
  for key, t in lora.targets(base_params, config).items():
    name = PEFT_PREFIX + peft_module_name(key)
    n_in, n_out = math.prod(t.in_shape), math.prod(t.out_shape)
    want = {"lora_A": (t.rank, n_in), "lora_B": (n_out, t.rank)}
    got = {}
    for suffix, shape in want.items():
      tname = f"{name}.{suffix}.weight"
      if tname not in tensors:
        raise lora.LoraConfigError(f"{WEIGHTS_FILE}: tensor {tname!r} is missing")
      w = np.asarray(tensors[tname])
      if w.shape != shape:
        raise lora.BaseMismatchError(f"{WEIGHTS_FILE}: {tname!r} has shape {w.shape}; this "
                                     f"base needs {shape}: the adapter is for another base")
      got[suffix] = w
      used.add(tname)
    out[key] = {"a": jnp.asarray(got["lora_A"].T.reshape(t.in_shape + (t.rank,)), dtype),
                "b": jnp.asarray(got["lora_B"].T.reshape((t.rank,) + t.out_shape), dtype)}
  extra = sorted(set(tensors) - used)
  if extra:
    raise lora.LoraConfigError(f"{WEIGHTS_FILE}: tensors {extra[:4]} are not adapters of the "
                               f"target modules {list(config.target_modules)}")
  return out


# -------------------------------------------------------------- fingerprint


def host_array(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _sample_index(key: str, shape: tuple[int, ...], n: int) -> tuple:
  rng = np.random.RandomState(zlib.crc32(key.encode()))
  return tuple(rng.randint(0, d, size=n) for d in shape)


def base_fingerprint(base_params, samples_per_tensor: int = 16) -> str:
  """A short identity of a base: every path, shape and dtype, and sampled values.

  The structure hash covers all parameters; the content hash covers
  `samples_per_tensor` entries of each tensor at fixed pseudo-random
  coordinates, compared bit for bit, so it depends neither on the sharding nor
  on the order of any sum, and it moves a few bytes per tensor to the host. Two
  checkpoints that differ only outside the sampled entries collide; a
  fine-tune of a base changes nearly every entry, so it does not.

  Returns:
    "lora-base-v1:<structure hash>:<content hash>".
  """
  structure, content = hashlib.sha256(), hashlib.sha256()
  for path, x in sorted(lora.flat_params(base_params).items(), key=lambda e: lora.key_of(e[0])):
    key = lora.key_of(path)
    shape = tuple(int(d) for d in x.shape)
    structure.update(f"{key}:{shape}:{jnp.dtype(x.dtype).name};".encode())
    sample = x[_sample_index(key, shape, samples_per_tensor)] if shape else x
    content.update(key.encode() + host_array(sample).tobytes())
  return f"{FINGERPRINT_VERSION}:{structure.hexdigest()[:16]}:{content.hexdigest()[:16]}"


def check_base_fingerprint(base_params, expected: str) -> None:
  """Raises BaseMismatchError when `base_params` is not the base `expected` names.

  Args:
    base_params: the base the adapters are about to be restored onto.
    expected: `base_fingerprint` of the base they were trained on (saved with them).
  """
  got = base_fingerprint(base_params)
  if got == expected:
    return
  (gv, gs, _), (ev, es, _) = ((s.split(":") + ["", ""])[:3] for s in (got, expected))
  if gv != ev:
    why = f"fingerprint format {ev!r}, this code writes {gv!r}"
  elif gs != es:
    why = "parameter names, shapes or dtypes differ (another architecture or dtype)"
  else:
    why = "same architecture and dtypes, different weights"
  raise lora.BaseMismatchError(f"the adapters were trained on base {expected}, this base is "
                               f"{got}: {why}; restore them onto the base they were trained on")
