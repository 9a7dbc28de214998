"""Hugging Face checkpoint import/export for the NNX Decoder.

Import reads a local directory (config.json and model.safetensors, or shards
listed in model.safetensors.index.json) one tensor at a time and places each
tensor directly with its target NamedSharding, so the host never holds more
than one tensor beyond what the devices hold. Export writes config.json,
safetensors (optionally sharded, with an index) and generation_config.json,
loadable by `transformers.AutoModelForCausalLM.from_pretrained`.

HF stores projections as [out, in] matrices with heads fused into `out`; the
Decoder keeps heads as an axis ([in, heads, head_dim]) so they can be sharded
by logical name. The reshapes below are the whole mapping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.sharding import DEFAULT_RULES, state_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some old checkpoints carry; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Stored dtypes a weight may have; each is cast to config.param_dtype on import.
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
  """A safetensors checkpoint this importer cannot read: corrupt, truncated, or
  inconsistent with its config.json."""


def _open_safetensors(fname: str):
  """`safe_open` of one file; a truncated or corrupt header is named with the file."""
  try:
    return safe_open(fname, framework="numpy")
  except SafetensorError as e:
    # The library's message ("invalid header length", ...) names no file.
    raise CheckpointError(f"{fname}: not a readable safetensors file (truncated or "
                          f"corrupt): {e}") from e


class _TensorSpec(NamedTuple):
  """How one Decoder parameter maps to one HF tensor."""
  hf_name: str
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


_COPY = (lambda a, s: a, lambda a: a, lambda s: tuple(s))
_TRANSPOSE = (lambda a, s: a.T, lambda a: a.T, lambda s: tuple(s)[::-1])
# q/k/v: HF [H*d, D] <-> ours [D, H, d].
_QKV = (lambda a, s: a.T.reshape(s),
        lambda a: a.reshape(a.shape[0], -1).T,
        lambda s: (s[1] * s[2], s[0]))
# o: HF [D, H*d] <-> ours [H, d, D].
_OUT = (lambda a, s: a.T.reshape(s),
        lambda a: a.reshape(-1, a.shape[-1]).T,
        lambda s: (s[2], s[0] * s[1]))
# biases: HF [H*d] <-> ours [H, d].
_BIAS = (lambda a, s: a.reshape(s), lambda a: a.reshape(-1),
         lambda s: (s[0] * s[1],))


def tensor_specs(config: DecoderConfig) -> dict[tuple[Any, ...], _TensorSpec]:
  """{Decoder state path: _TensorSpec} for every parameter of `config`."""
  specs = {
      ("embed",): _TensorSpec("model.embed_tokens.weight", *_COPY),
      ("final_norm", "scale"): _TensorSpec("model.norm.weight", *_COPY),
  }
  if not config.tie_word_embeddings:
    specs[("lm_head",)] = _TensorSpec("lm_head.weight", *_TRANSPOSE)
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    layer = {
        ("attn_norm", "scale"): ("input_layernorm.weight", _COPY),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _COPY),
        ("attn", "q"): ("self_attn.q_proj.weight", _QKV),
        ("attn", "k"): ("self_attn.k_proj.weight", _QKV),
        ("attn", "v"): ("self_attn.v_proj.weight", _QKV),
        ("attn", "o"): ("self_attn.o_proj.weight", _OUT),
        ("mlp", "gate"): ("mlp.gate_proj.weight", _TRANSPOSE),
        ("mlp", "up"): ("mlp.up_proj.weight", _TRANSPOSE),
        ("mlp", "down"): ("mlp.down_proj.weight", _TRANSPOSE),
    }
    if config.attention_bias:
      for name in "qkv":
        layer[("attn", f"{name}_bias")] = (f"self_attn.{name}_proj.bias",
                                           _BIAS)
    for path, (hf_name, fns) in layer.items():
      specs[("layers", i) + path] = _TensorSpec(pre + hf_name, *fns)
  return specs


def key_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """HF-layout shapes of the tensors that pin every size of `config`.

  The embedding and layer 0's q / k / gate projections fix the vocabulary,
  width, heads x head_dim, kv heads x head_dim and MLP width. Importers compare
  them with the stored shapes before the Decoder is built: building it sizes
  host arrays by the config (RoPE frequencies by head_dim), so a corrupt
  config.json or GGUF metadata must be caught from the file first. The full
  per-tensor check follows as each tensor is read.
  """
  c = config
  layer = "model.layers.0."
  return {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
          layer + "self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
          layer + "self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, c.hidden_size),
          layer + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size)}


def _key_path(path) -> tuple[Any, ...]:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def checkpoint_files(path: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a local HF checkpoint directory.

  Raises:
    FileNotFoundError: no model.safetensors / index, or a listed shard absent.
  """
  index_path = os.path.join(path, INDEX_FILE)
  single_path = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors name no file
      raise CheckpointError(f"{index_path}: not a valid JSON index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'{index_path}: missing "weight_map"')
    files = {}
    for name, fname in weight_map.items():
      if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{index_path}: tensor {name!r} maps to {fname!r}; expected "
                              "a safetensors file name")
      full = os.path.join(path, fname)
      if not os.path.exists(full):
        raise FileNotFoundError(
            f"{index_path} lists tensor {name!r} in {fname}, which is missing")
      files[name] = full
    return files
  if os.path.exists(single_path):
    with _open_safetensors(single_path) as f:
      return {name: single_path for name in f.keys()}
  raise FileNotFoundError(
      f'{path}: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors); '
      f'found {sorted(os.listdir(path)) if os.path.isdir(path) else "nothing"}')


def load_hf_checkpoint(path, *, mesh: jax.sharding.Mesh | None = None,
                       rules=DEFAULT_RULES, extra_tensors: Sequence[str] = (),
                       **config_overrides) -> Decoder:
  """Imports a local HF checkpoint directory into a Decoder.

  Args:
    path: directory with config.json and safetensors weights.
    mesh: when given, each parameter is placed with its NamedSharding on this
      mesh (from its logical names and `rules`); else on the default device.
    rules: (logical, mesh_axis) pairs.
    extra_tensors: names of tensors the caller reads itself (e.g. a
      classifier head); they are not reported as unused.
    **config_overrides: DecoderConfig fields to set on top of config.json
      (e.g. param_dtype='bfloat16', dtype='bfloat16', remat=True).

  Returns:
    The Decoder with the checkpoint's weights (cast to config.param_dtype).

  Raises:
    FileNotFoundError: missing config.json / weights / shard.
    KeyError: a tensor the architecture needs is absent (names it and the
      files searched).
    ValueError: a tensor has the wrong shape, or the checkpoint holds tensors
      this architecture does not use; a `CheckpointError` (a ValueError) for a
      truncated or corrupt file, a non-float tensor, or fewer layers than
      config.json states.
  """
  path = os.fspath(path)
  config = DecoderConfig.from_hf(path, **config_overrides)
  files = checkpoint_files(path)
  layers = {int(m.group(1)) for n in files if (m := _LAYER_NAME.match(n))}
  if config.num_layers > len(layers):
    # Checked before the per-layer tables are built: a corrupt config.json with
    # a huge layer count would otherwise exhaust memory.
    raise CheckpointError(
        f"{path}: config.json num_hidden_layers={config.num_layers}, but the safetensors "
        f"hold tensors of {len(layers)} layers")
  specs = tensor_specs(config)
  known = {s.hf_name for s in specs.values()}
  unexpected = [n for n in files if n not in known and n not in extra_tensors
                and not n.endswith(_IGNORED_SUFFIXES)
                # Some tied checkpoints still store a copy of the head.
                and not (config.tie_word_embeddings and n == "lm_head.weight")]
  if unexpected:
    raise ValueError(
        f"{path}: tensors not used by a {config.model_type} decoder with this "
        f"config.json: {sorted(unexpected)[:10]}")
  with contextlib.ExitStack() as stack:
    handles = {}

    def handle(fname: str):
      if fname not in handles:
        handles[fname] = stack.enter_context(_open_safetensors(fname))
      return handles[fname]

    for name, want in key_shapes(config).items():
      if name in files:  # a missing one is named when it is read
        try:
          got = tuple(handle(files[name]).get_slice(name).get_shape())
        except SafetensorError as e:  # e.g. an index naming the wrong shard
          raise CheckpointError(f"{files[name]}: tensor {name!r} cannot be read: {e}") from e
        if got != want:
          raise CheckpointError(
              f"{path}: tensor {name!r} in {os.path.basename(files[name])} has shape {got}, "
              f"expected {want} for config.json")

    def read(name: str, want: tuple[int, ...]) -> np.ndarray:
      if name not in files:
        raise KeyError(
            f"{path}: tensor {name!r} not found in "
            f"{sorted(set(os.path.basename(f) for f in files.values()))}")
      fname = files[name]
      try:
        arr = handle(fname).get_tensor(name)
      except SafetensorError as e:
        raise CheckpointError(f"{fname}: tensor {name!r} cannot be read: {e}") from e
      if arr.dtype.name not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{fname}: tensor {name!r} has dtype {arr.dtype.name}; expected one of "
            f"{_FLOAT_DTYPES}")
      if tuple(arr.shape) != want:
        raise ValueError(
            f"{path}: tensor {name!r} in {os.path.basename(fname)} has shape "
            f"{tuple(arr.shape)}, expected {want} for config.json")
      return arr

    return build_decoder(config, read, mesh=mesh, rules=rules)


def build_decoder(config: DecoderConfig,
                  read: Callable[[str, tuple[int, ...]], np.ndarray], *,
                  mesh: jax.sharding.Mesh | None = None,
                  rules=DEFAULT_RULES) -> Decoder:
  """Builds a Decoder from HF-layout tensors, placing each as it is read.

  The model is traced abstractly (no parameter is initialised); then each
  parameter is read, converted to our layout and dtype, and put straight onto
  its devices with its target sharding, so the host holds one tensor at a
  time. Shared by every importer (safetensors, GGUF): they differ only in
  `read`.

  Args:
    config: the architecture.
    read: read(hf_name, hf_shape) -> that tensor as a numpy array in HF layout
      (e.g. [out, in] for a projection), of shape hf_shape; it raises its own
      named error for a missing or mis-shaped tensor.
    mesh: when given, each parameter is placed with its NamedSharding on this
      mesh (from its logical names and `rules`); else on the default device.
    rules: (logical, mesh_axis) pairs.

  Returns:
    The Decoder, parameters cast to config.param_dtype.
  """
  specs = tensor_specs(config)
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = (state_shardings(abstract_state, mesh, rules)
               if mesh is not None else None)
  sharding_of = {}
  if shardings is not None:
    jax.tree_util.tree_map_with_path(
        lambda p, v: sharding_of.__setitem__(_key_path(p), v.get_value()),
        shardings, is_leaf=_is_var)

  def load(p, var):
    key = _key_path(p)
    spec = specs[key]
    target = var.get_value()
    want = spec.hf_shape(target.shape)
    arr = read(spec.hf_name, want)
    if tuple(arr.shape) != want:  # a reader that forgot its own check
      raise ValueError(f"tensor {spec.hf_name!r}: shape {tuple(arr.shape)}, "
                       f"expected {want}")
    arr = np.ascontiguousarray(
        spec.to_ours(arr, target.shape).astype(target.dtype))
    placed = (jax.device_put(arr, sharding_of[key])
              if shardings is not None else jax.device_put(arr))
    return var.replace(placed)

  state = jax.tree_util.tree_map_with_path(load, abstract_state,
                                           is_leaf=_is_var)
  return nnx.merge(graphdef, state)


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
  for unit, mult in units.items():
    if str(size).upper().endswith(unit):
      return int(float(str(size)[:-2]) * mult)
  return int(size)


def save_hf_checkpoint(model: Decoder, path, *,
                       max_shard_size: int | str | None = None,
                       generation_config: bool = True) -> str:
  """Exports a Decoder as a HF checkpoint directory.

  Tensors are fetched to the host one at a time and flushed shard by shard, so
  at most one shard (max_shard_size) is held on the host.

  Args:
    model: the Decoder (parameters on any devices of this host).
    path: output directory (created).
    max_shard_size: bytes (or '5GB'-style string) per safetensors file; None
      writes one model.safetensors. Several files get an index json.
    generation_config: also write generation_config.json with the bos / eos /
      pad ids (so HF generate stops on every eos id).

  Returns:
    The directory path.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config = model.config
  specs = tensor_specs(config)
  state = nnx.state(model, nnx.Param)
  limit = _parse_size(max_shard_size) if max_shard_size is not None else None
  pending: dict[str, np.ndarray] = {}
  pending_bytes = 0
  tmp_files = []
  weight_map = {}

  def flush():
    nonlocal pending, pending_bytes
    if not pending:
      return
    fname = os.path.join(path, f".shard-{len(tmp_files):05d}.tmp")
    save_file(pending, fname, metadata={"format": "pt"})
    tmp_files.append((fname, list(pending)))
    pending, pending_bytes = {}, 0

  for p, var in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=_is_var)[0]:
    key = _key_path(p)
    if key not in specs:
      raise ValueError(f"parameter {key} has no HF tensor mapping")
    spec = specs[key]
    arr = np.ascontiguousarray(spec.to_hf(np.asarray(jax.device_get(
        var.get_value()))))
    if limit is not None and pending and pending_bytes + arr.nbytes > limit:
      flush()
    pending[spec.hf_name] = arr
    pending_bytes += arr.nbytes
  flush()

  if len(tmp_files) == 1:
    os.replace(tmp_files[0][0], os.path.join(path, SINGLE_FILE))
    stale = os.path.join(path, INDEX_FILE)
    if os.path.exists(stale):
      os.remove(stale)
  else:
    n = len(tmp_files)
    total = 0
    for i, (fname, names) in enumerate(tmp_files):
      final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(fname, os.path.join(path, final))
      for name in names:
        weight_map[name] = final
    for var in jax.tree.leaves(state, is_leaf=_is_var):
      value = var.get_value()
      total += value.size * value.dtype.itemsize
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                f, indent=2, sort_keys=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2, sort_keys=True)
  if generation_config:
    eos = list(config.eos_token_ids)
    gen = {"bos_token_id": config.bos_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": config.pad_token_id}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2, sort_keys=True)
  return path
