"""Tokenizer and chat template, loaded from local files via transformers.

A tokenizer comes from a directory written by `save_pretrained` or from a
GGUF file, whose metadata carries the vocabulary, merges, special tokens and
chat template (transformers converts them). Nothing is downloaded:
`local_files_only=True` always. Prompts are padded on
the left, matching the decoder's left-padding convention (positions from the
mask).
"""

from __future__ import annotations

import os
from typing import Sequence


def load_tokenizer(path, *, padding_side: str = "left",
                   require_chat_template: bool = False):
  """AutoTokenizer from a local directory or a `.gguf` file.

  Args:
    path: local directory written by `save_pretrained`, or a GGUF file.
    padding_side: 'left' (default, for generation) or 'right'.
    require_chat_template: raise unless the tokenizer has a chat template
      (for jobs that build chat prompts), rather than failing at the first
      prompt.

  Returns:
    A transformers tokenizer with a pad token.

  Raises:
    FileNotFoundError: path is neither a directory nor a .gguf file.
    ValueError: the tokenizer has neither a pad nor an eos token, or has no
      chat template when one is required.
  """
  import transformers
  path = os.fspath(path)
  is_gguf = path.endswith(".gguf")
  if is_gguf and not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer path: GGUF file not found: {path}")
  if not is_gguf and not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path: not a directory: {path}")
  if padding_side not in ("left", "right"):
    raise ValueError(
        f"padding_side: expected 'left' or 'right', got {padding_side!r}")
  if is_gguf:
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)),
        gguf_file=os.path.basename(path), local_files_only=True)
  else:
    tok = transformers.AutoTokenizer.from_pretrained(path,
                                                     local_files_only=True)
  tok.padding_side = padding_side
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError(f"{path}: tokenizer has no pad_token and no eos_token")
    # Pads are masked out everywhere, so reusing eos is safe.
    tok.pad_token = tok.eos_token
  if require_chat_template and not getattr(tok, "chat_template", None):
    raise ValueError(f"{path}: tokenizer has no chat_template, and this job "
                     "builds chat prompts")
  return tok


def chat_prompt_ids(tokenizer, messages: Sequence[dict],
                    add_generation_prompt: bool = True) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template.

  Raises:
    ValueError: the tokenizer has no chat template.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: "
                     "has no chat_template")
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
