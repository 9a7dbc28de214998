"""Decoder configuration, read from and written to Hugging Face `config.json`.

One frozen dataclass covers the Llama 1/2/3 (incl. Llama-3.1 'llama3' RoPE
scaling), Mistral and Qwen2 families: they differ only in RoPE scaling, a
sliding attention window (Mistral), q/k/v biases and tied embeddings (Qwen2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from onpo_jax.infra import checks

MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float64")
# Kernels of onpo_jax/models/attention.py (IMPLEMENTATIONS there).
ATTENTION_IMPLS = ("dense", "chunked", "dot_product_attention", "splash")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Keys of a HF rope-parameters dict that describe the scaling, not the base.
_ROPE_BASE_KEYS = ("rope_theta",)


def _freeze_rope_scaling(value: Any) -> tuple[tuple[str, Any], ...] | None:
  """Turns a rope-scaling mapping into a sorted tuple of items (hashable)."""
  if value is None:
    return None
  items = dict(value)
  items = {k: v for k, v in items.items() if k not in _ROPE_BASE_KEYS}
  if "type" in items and "rope_type" not in items:
    items["rope_type"] = items.pop("type")
  items.pop("type", None)
  if items.get("rope_type", "default") == "default":
    # A 'default' entry carries no scaling; keep the config canonical.
    extra = set(items) - {"rope_type"}
    if extra:
      raise ValueError(
          f'rope_scaling: rope_type "default" takes no parameters, got {extra}')
    return None
  for k, v in items.items():
    if isinstance(v, list):
      items[k] = tuple(v)
  return tuple(sorted(items.items()))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture and numerics of a decoder-only transformer.

  Attributes:
    model_type: 'llama', 'mistral' or 'qwen2' (the HF `model_type`).
    vocab_size: number of token ids V.
    hidden_size: residual width D.
    intermediate_size: SwiGLU hidden width F.
    num_layers: number of transformer blocks.
    num_heads: query heads H.
    num_kv_heads: key/value heads (GQA); must divide num_heads.
    head_dim: per-head width.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base wavelength.
    rope_scaling: None or a sorted tuple of (key, value) items, e.g. the
      Llama-3.1 ('rope_type', 'llama3') scaling with its factors.
    max_position_embeddings: longest position the model was trained for.
    tie_word_embeddings: lm_head shares the embedding matrix.
    attention_bias: q/k/v projections have biases (Qwen2).
    sliding_window: attend only to the last `sliding_window` cache slots
      (Mistral); None for full causal attention.
    param_dtype: storage dtype of parameters ('float32' | 'bfloat16' |
      'float64').
    dtype: compute dtype of activations ('float32' | 'bfloat16' |
      'float64'); logits and log-probs are float32, or float64 for a float64
      model. In bfloat16 the projections' and the unembedding's products,
      forward and backward, are summed in float32 and rounded once
      (`layers.dense`); such a model has reverse-mode derivatives only
      (no `jax.jvp`). float64 needs JAX's x64 mode
      (`with jax.enable_x64(True):`); it is for reference computations such
      as the testbed's exact rounds.
    remat: rematerialise each block in the backward pass (nnx.remat).
    attention_impl: attention kernel (onpo_jax/models/attention.py):
      'dense' (the [B, H, L, S] score matrix, fastest at short lengths),
      'chunked' (online softmax over blocks, no score matrix: memory O(L)
      instead of O(L²) per head) or 'dot_product_attention'
      (jax.nn.dot_product_attention, cuDNN on GPU for bfloat16) or 'splash'
      (Pallas's TPU FlashAttention kernel for training and scoring, in
      Pallas's slow interpreter on other backends). Whatever the choice,
      decoding steps (one query per row over the KV cache) use
      `attention.cache_attention`, whose scores are no larger than its
      output. A runtime choice like remat: not part of the HF config.json.
    attention_chunk_size: queries and keys per block of 'chunked' and
      'splash' (on TPU rounded up to a multiple of 128).
    bos_token_id: beginning-of-sequence id, or None.
    eos_token_ids: tuple of end-of-sequence ids (several for chat models).
    pad_token_id: padding id, or None.
  """

  model_type: str = "llama"
  vocab_size: int = 128
  hidden_size: int = 32
  intermediate_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 8
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  sliding_window: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "dense"
  attention_chunk_size: int = 512
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int | None = 0

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
          f"model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f"{name}: expected one of {DTYPES}, got {getattr(self, name)!r}")
      if getattr(self, name) == "float64" and not jax.config.jax_enable_x64:
        # Without x64 JAX would silently make every float64 array float32.
        raise ValueError(f"{name}: 'float64' needs JAX's x64 mode; build and run the "
                         "model inside `with jax.enable_x64(True):`")
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_kv_heads: must divide num_heads={self.num_heads}, "
          f"got {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim: RoPE needs an even value, got {self.head_dim}")
    if self.model_type == "qwen2" and not self.attention_bias:
      raise ValueError("attention_bias: Qwen2 always has q/k/v biases; "
                       "set attention_bias=True")
    if self.attention_bias and self.model_type != "qwen2":
      # HF Llama/Mistral with attention_bias also bias o_proj, which this
      # decoder does not model.
      raise NotImplementedError(
          f"attention_bias: only Qwen2-style q/k/v biases are supported, "
          f"not {self.model_type} attention_bias=True")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(
          f"sliding_window: expected None or a positive int, "
          f"got {self.sliding_window!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl: expected one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if (not isinstance(self.attention_chunk_size, int)
        or self.attention_chunk_size <= 0):
      raise ValueError(f"attention_chunk_size: expected a positive int, "
                       f"got {self.attention_chunk_size!r}")
    # Normalise mutable inputs so the config stays hashable (jit static arg).
    object.__setattr__(self, "rope_scaling",
                       _freeze_rope_scaling(self.rope_scaling))
    eos = self.eos_token_ids
    if eos is None:
      eos = ()
    elif isinstance(eos, int):
      eos = (eos,)
    object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in eos))
    if self.rope_scaling is not None:
      params = dict(self.rope_scaling)
      rope_type = params.get("rope_type")
      if rope_type not in ("llama3", "linear"):
        raise NotImplementedError(
            f"rope_scaling: rope_type {rope_type!r} is not supported "
            "(supported: 'llama3', 'linear')")
      # Checked here, not when the RoPE table is built inside the model: a
      # missing factor would surface there as a bare KeyError.
      needed = ("factor",) + (("low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")
                              if rope_type == "llama3" else ())
      for key in needed:
        if not checks.is_real(params.get(key)) or params[key] <= 0:
          raise ValueError(f"rope_scaling: rope_type {rope_type!r} needs {key} > 0, "
                           f"got {params.get(key)!r}")

  @property
  def jnp_dtype(self) -> jnp.dtype:
    """Compute dtype as a jnp dtype."""
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> jnp.dtype:
    """Parameter dtype as a jnp dtype."""
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> 'DecoderConfig':
    """Returns a copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **overrides) -> 'DecoderConfig':
    """A small config for tests: 2 layers, D=32, 4 heads over 2 kv heads."""
    return cls(**overrides)

  @classmethod
  def from_hf(cls, obj: Any, **overrides) -> 'DecoderConfig':
    """Builds a config from a HF config.

    Args:
      obj: a local directory holding config.json, a path to a json file, a
        dict (the config.json content) or a transformers PretrainedConfig.
      **overrides: fields to set on top (e.g. dtype, param_dtype, remat).

    Returns:
      The DecoderConfig.

    Raises:
      ValueError: on an unsupported model_type or a missing field.
      FileNotFoundError: when a directory has no config.json.
    """
    where = "config.json"
    if isinstance(obj, (str, os.PathLike)):
      path = os.fspath(obj)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"config.json not found: {path}")
      where = path
      try:
        with open(path, encoding="utf-8") as f:
          d = json.load(f)
      except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors name no file
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    elif isinstance(obj, Mapping):
      d = dict(obj)
    elif hasattr(obj, "to_dict"):
      d = obj.to_dict()
    else:
      raise TypeError(
          f"obj: expected a directory, dict or PretrainedConfig, got {type(obj)}")
    if not isinstance(d, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(
          f"{where}: model_type: expected one of {MODEL_TYPES}, "
          f"got {model_type!r}")

    def need(key):
      if d.get(key) is None:
        raise ValueError(f"{where}: missing field {key!r}")
      return d[key]

    # Types first: a wrong one would otherwise fail deep in the arithmetic below
    # (or in JAX) without naming the file.
    def check(key, ok, expected):
      if d.get(key) is not None and not ok(d[key]):
        raise ValueError(f"{where}: {key}: expected {expected}, got {d[key]!r:.80}")

    positive_int = lambda v: checks.is_int(v, 1)  # noqa: E731
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "sliding_window"):
      check(key, positive_int, "a positive int")
    check("max_window_layers", lambda v: checks.is_int(v, 0), "an int >= 0")
    for key in ("bos_token_id", "pad_token_id"):
      check(key, checks.is_int, "a token id (an int) or null")
    check("eos_token_id", lambda v: all(checks.is_int(e) for e in (
        v if isinstance(v, (list, tuple)) else [v])), "a token id or a list of token ids")
    for key in ("rms_norm_eps", "rope_theta"):
      check(key, lambda v: checks.is_real(v) and v > 0, "a finite number > 0")
    for key in ("rope_scaling", "rope_parameters"):
      check(key, lambda v: isinstance(v, dict), "an object or null")
    for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window", "mlp_bias"):
      check(key, lambda v: isinstance(v, bool), "true or false")
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    # transformers>=5 stores theta and scaling together in rope_parameters;
    # older files use rope_theta + rope_scaling.
    rope_params = d.get("rope_parameters") or {}
    rope_theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_scaling = d.get("rope_scaling") or rope_params or None
    sliding = d.get("sliding_window")
    if model_type == "llama":
      sliding = None
    elif model_type == "qwen2":
      if not d.get("use_sliding_window", False):
        sliding = None
      elif d.get("max_window_layers", 0) < need("num_hidden_layers"):
        raise NotImplementedError(
            f"{where}: Qwen2 with use_sliding_window on only some layers "
            "(max_window_layers < num_hidden_layers) is not supported")
      else:
        sliding = None
    eos = d.get("eos_token_id")
    attention_bias = d.get("attention_bias", model_type == "qwen2")
    if model_type == "qwen2":
      attention_bias = True  # Qwen2 always has q/k/v biases.
    if d.get("mlp_bias"):
      raise NotImplementedError(f"{where}: mlp_bias=True is not supported")
    if d.get("hidden_act", "silu") != "silu":
      raise NotImplementedError(
          f"{where}: hidden_act must be 'silu', got {d.get('hidden_act')!r}")
    kwargs = dict(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(attention_bias),
        sliding_window=sliding,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=d.get("pad_token_id"),
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except (ValueError, NotImplementedError) as e:  # e.g. kv heads not dividing the heads
      raise type(e)(f"{where}: {e}") from e

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json content that transformers loads for this model."""
    rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope_parameters = dict(self.rope_scaling)
      rope_parameters["rope_theta"] = self.rope_theta
    eos = list(self.eos_token_ids)
    d = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        # Both spellings, so old and new transformers read the same RoPE.
        "rope_theta": self.rope_theta,
        "rope_parameters": rope_parameters,
        "rope_scaling": (dict(self.rope_scaling)
                         if self.rope_scaling is not None else None),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "dtype": self.param_dtype,
    }
    if self.model_type == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    elif self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    else:
      d["use_sliding_window"] = False
      d["sliding_window"] = None
    return d
