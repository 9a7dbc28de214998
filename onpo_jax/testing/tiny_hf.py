"""Tiny random Hugging Face checkpoints and tokenizers, built offline.

Shared test helper (other test files import it):
  make_tiny_checkpoint(path, family, **overrides) -> path
  make_tiny_tokenizer(path, vocab) -> path
  hf_config(family, **overrides) -> transformers PretrainedConfig
  load_hf_model(path) -> torch model (float32, eager attention, eval mode)

Families: 'llama', 'llama3.1' (Llama-3.1 'llama3' RoPE scaling), 'mistral'
(sliding window), 'qwen2' (q/k/v biases, tied embeddings). Weights are drawn
with a larger spread than HF's init (and norms/biases are non-trivial), so a
wrongly mapped tensor changes the logits visibly.
"""

from __future__ import annotations

import os

FAMILIES = ("llama", "llama3.1", "mistral", "qwen2")

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(family: str, **overrides):
  """A tiny transformers config of `family`, with `overrides` applied."""
  import transformers
  if family not in FAMILIES:
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
  kw = dict(_COMMON)
  if family == "llama":
    cls = transformers.LlamaConfig
    kw.update(rope_theta=10000.0, tie_word_embeddings=False)
  elif family == "llama3.1":
    cls = transformers.LlamaConfig
    # Small original_max_position_embeddings so the low/medium/high frequency
    # bands of the 'llama3' scaling are all exercised at head_dim 8.
    kw.update(rope_theta=500000.0, tie_word_embeddings=False,
              eos_token_id=[2, 3],
              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16})
  elif family == "mistral":
    cls = transformers.MistralConfig
    kw.update(rope_theta=10000.0, sliding_window=4,
              tie_word_embeddings=False)
  else:
    cls = transformers.Qwen2Config
    kw.update(rope_theta=1000000.0, tie_word_embeddings=True,
              use_sliding_window=False, rms_norm_eps=1e-6)
  kw.update(overrides)
  config = cls(**kw)
  config._attn_implementation = "eager"
  return config


def make_tiny_checkpoint(path, family: str = "llama", *, seed: int = 0,
                         max_shard_size: str | int | None = None,
                         dtype: str = "float32", **overrides) -> str:
  """Saves a random tiny `family` model to `path` (config.json + safetensors).

  Args:
    path: output directory (created).
    family: one of FAMILIES.
    seed: torch seed of the weights.
    max_shard_size: e.g. '20KB' to get model-0000x-of-0000y.safetensors plus
      model.safetensors.index.json; None for one model.safetensors.
    dtype: 'float32' or 'bfloat16' storage dtype.
    **overrides: transformers config fields (vocab_size, sliding_window, ...).

  Returns:
    The directory path (str).
  """
  import torch
  import transformers
  config = hf_config(family, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(0.15 * noise)
  model = model.to(getattr(torch, dtype))
  os.makedirs(path, exist_ok=True)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kw)
  return os.fspath(path)


def load_hf_model(path):
  """The transformers model at `path`, float32, eager attention, eval mode."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
  return model.eval()


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<eot>", "<unk>", "<|user|>",
                  "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eot> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tiny_tokenizer(path, vocab=64) -> str:
  """Saves a word-level tokenizer with a chat template to `path`.

  Ids: <pad>=0, <s>=1, </s>=2, <eot>=3, <unk>=4, then role markers, then the
  words. Text is split on whitespace; unknown words map to <unk>.

  Args:
    path: output directory (created).
    vocab: a sequence of words, or an int total vocabulary size (words are
      then 'w0', 'w1', ...).

  Returns:
    The directory path (str), loadable with AutoTokenizer.from_pretrained.
  """
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers, decoders
  if isinstance(vocab, int):
    n = vocab - len(SPECIAL_TOKENS)
    if n <= 0:
      raise ValueError(
          f"vocab: need more than {len(SPECIAL_TOKENS)} entries, got {vocab}")
    words = [f"w{i}" for i in range(n)]
  else:
    words = [w for w in vocab if w not in SPECIAL_TOKENS]
  table = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
  tok = tokenizers.Tokenizer(models.WordLevel(table, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      unk_token="<unk>", pad_token="<pad>",
      additional_special_tokens=["<eot>", "<|user|>", "<|assistant|>",
                                 "<|system|>"])
  fast.chat_template = CHAT_TEMPLATE
  fast.padding_side = "left"
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return os.fspath(path)
