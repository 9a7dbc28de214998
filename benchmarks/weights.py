"""The weights both sides of a benchmark run: one HF checkpoint, loaded by torch and by JAX.

`sampler.py`, `gpu.py` and `train_alone.py` compare onpo_jax with transformers
on the same weights: a random Llama of the command line's shape (`--layers`,
`--hidden`, ...; seeded by `--seed`) or a GGUF file (`--gguf`), written once as
an HF checkpoint that each side loads.
"""

from __future__ import annotations

import torch
import transformers

from onpo_jax.models import gguf as gguf_lib
from onpo_jax.models import hf_io


def write_checkpoint(args, workdir):
  """Writes the weights both sides load to `workdir`, as an HF checkpoint.

  With --gguf: the GGUF file's weights (dequantised); else a randomly
  initialised torch Llama of the command line's shape (seeded by --seed).
  """
  if args.gguf:
    path = gguf_lib.smollm2_gguf_path() if args.gguf == "smollm2" else args.gguf
    hf_io.save_hf_checkpoint(gguf_lib.load_gguf_checkpoint(path), workdir)
    return
  torch.manual_seed(args.seed)
  hf_config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
      tie_word_embeddings=getattr(args, "tie_embeddings", False))
  with torch.device(args.torch_device):  # initialised where it runs: a GPU draws 1B weights fast
    transformers.LlamaForCausalLM(hf_config).save_pretrained(workdir)


def load_torch_model(args, workdir):
  """The torch peer from `workdir`, on --torch-device in --torch-dtype."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      workdir, local_files_only=True, dtype=torch.float32).eval()
  return model.to(device=args.torch_device, dtype=getattr(torch, args.torch_dtype))


def load_jax_model(args, workdir, **jax_overrides):
  """Our Decoder from `workdir` in --jax-dtype; `jax_overrides` are DecoderConfig fields."""
  return hf_io.load_hf_checkpoint(workdir, param_dtype=args.jax_dtype, dtype=args.jax_dtype,
                                  **jax_overrides)


def build_models(args, workdir, **jax_overrides):
  """The torch peer and our Decoder with the same weights (`write_checkpoint`).

  `jax_overrides` are DecoderConfig fields for our side (e.g. attention_impl).
  """
  write_checkpoint(args, workdir)
  return load_torch_model(args, workdir), load_jax_model(args, workdir, **jax_overrides)
