"""One entry for checkpoints in either format: an HF directory or a GGUF file.

Jobs name a checkpoint by its path; a path ending in `.gguf` is a llama.cpp
file (`gguf.load_gguf_checkpoint`), anything else a local Hugging Face
directory (`hf_io.load_hf_checkpoint`).
"""

from __future__ import annotations

import functools
import os

from onpo_jax.models import gguf
from onpo_jax.models import hf_io
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder


def is_gguf(path) -> bool:
  """Whether `path` names a GGUF file (by its suffix).

  Raises:
    TypeError: `path` is not a str or os.PathLike (e.g. a config value of the
      wrong type), named here rather than deep in a reader.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"checkpoint path must be a str or os.PathLike; got {path!r:.80}")
  return os.fspath(path).endswith(".gguf")


def load_checkpoint(path, **kwargs) -> Decoder:
  """A Decoder from an HF directory or a GGUF file (same keyword arguments: mesh,
  rules and DecoderConfig overrides)."""
  if is_gguf(path):
    return gguf.load_gguf_checkpoint(path, **kwargs)
  return hf_io.load_hf_checkpoint(path, **kwargs)


def checkpoint_config(path, **overrides) -> DecoderConfig:
  """The DecoderConfig of a checkpoint, without reading its weights.

  Raises:
    FileNotFoundError: no such GGUF file, or a directory without config.json.
  """
  if is_gguf(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = os.stat(path)
    return _gguf_config(path, stat.st_mtime_ns, stat.st_size).replace(**overrides)
  return DecoderConfig.from_hf(path, **overrides)


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, mtime_ns: int, size: int) -> DecoderConfig:
  """A GGUF file's config, read once per file version (parsing its metadata takes
  seconds: the tokenizer's vocabulary arrays are read too)."""
  del mtime_ns, size  # cache key only
  return gguf.config_from_gguf(gguf.open_gguf(path), path)
