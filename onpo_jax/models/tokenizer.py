"""Tokenizer and chat template, loaded from a local directory via transformers.

Nothing is downloaded: `local_files_only=True` always. Prompts are padded on
the left, matching the decoder's left-padding convention (positions from the
mask).
"""

from __future__ import annotations

import os
from typing import Sequence


def load_tokenizer(path, *, padding_side: str = "left"):
  """AutoTokenizer from a local directory (tokenizer.json + config).

  Args:
    path: local directory written by `save_pretrained`.
    padding_side: 'left' (default, for generation) or 'right'.

  Returns:
    A transformers tokenizer with a pad token.

  Raises:
    FileNotFoundError: path is not a directory.
    ValueError: the tokenizer has neither a pad nor an eos token.
  """
  import transformers
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path: not a directory: {path}")
  if padding_side not in ("left", "right"):
    raise ValueError(
        f"padding_side: expected 'left' or 'right', got {padding_side!r}")
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  tok.padding_side = padding_side
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError(f"{path}: tokenizer has no pad_token and no eos_token")
    # Pads are masked out everywhere, so reusing eos is safe.
    tok.pad_token = tok.eos_token
  return tok


def chat_prompt_ids(tokenizer, messages: Sequence[dict],
                    add_generation_prompt: bool = True) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template.

  Raises:
    ValueError: the tokenizer has no chat template.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("tokenizer: has no chat_template")
  text = tokenizer.apply_chat_template(
      list(messages), add_generation_prompt=add_generation_prompt,
      tokenize=False)
  # The template already places any special tokens it wants.
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer, config=None) -> tuple[int, ...]:
  """Union of the tokenizer's eos id and the model config's eos ids."""
  ids = []
  if config is not None:
    ids.extend(config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.append(int(tokenizer.eos_token_id))
  return tuple(dict.fromkeys(ids))
