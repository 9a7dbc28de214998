"""Compiled memory of a ~1B Llama forward+backward: dense vs chunked attention.

Compiles, without running, `jax.grad` of a sequence log-prob loss (the sum
of `Decoder.token_logprobs` over the second half of the sequence) for a
Llama-3.2-1B-shaped config on abstract parameters (`nnx.eval_shape`, nothing
is allocated), and prints XLA's `compiled.memory_analysis()`:
temp (one preallocated block holding every intermediate: activations kept
for the backward pass and scratch), arguments (parameters, tokens),
outputs (gradients) and peak = arguments + outputs + temp - aliased. Variants: attention
'dense' (the [B, H, L, S] float32 score matrix per layer) vs 'chunked'
(online softmax, onpo_jax/models/attention.py), each with and without
per-block remat, at each sequence length.

Config (Llama-3.2-1B): 16 layers, d=2048, 32 heads over 8 kv heads of 64,
SwiGLU 8192, vocab 128256, tied embeddings, float32 params and compute
(1.24B parameters, 4.9 GB), batch 1. The unembedding runs in chunks of
`--logprob-chunk` positions so that the [L, V] logits (4.2 GB at L = 8192)
do not hide the attention's share. Fewer layers (`--layers`) compile faster;
every per-layer buffer then scales with the layer count.

Run (CPU, compile only; about a minute per variant on 2 cores):
  python -m benchmarks.attention_memory
  python -m benchmarks.attention_memory --layers 4 --lengths 4096
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as decoder_lib

GB = 1e9


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--lengths", default="4096,8192")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--impls", default="dense,chunked")
  p.add_argument("--remat", default="false,true")
  p.add_argument("--chunk", type=int, default=512, help="attention_chunk_size")
  p.add_argument("--logprob-chunk", type=int, default=1024,
                 help="token_logprobs chunk_size (0: one chunk, all logits)")
  p.add_argument("--dtype", default="float32", help="param and compute dtype")
  return p.parse_args(argv)


def llama_1b(layers: int, dtype: str) -> config_lib.DecoderConfig:
  return config_lib.DecoderConfig(
      model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
      num_layers=layers, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
      rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
      param_dtype=dtype, dtype=dtype, bos_token_id=128000, eos_token_ids=(128001,))


def compiled_memory(cfg, batch: int, length: int, logprob_chunk: int | None):
  """(memory_analysis, compile seconds) of grad(loss) for one config."""
  abstract = nnx.eval_shape(lambda: decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

  def loss(s, t, m):
    lp = nnx.merge(graphdef, s).token_logprobs(
        t, decoder_lib.positions_from_mask(m), m, chunk_size=logprob_chunk)
    return jnp.sum(lp[:, length // 2:])

  t0 = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(state, tokens, mask).compile()
  return compiled.memory_analysis(), time.perf_counter() - t0


def main(argv=None):
  args = parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  impls = args.impls.split(",")
  remats = [x.strip().lower() in ("1", "true", "yes") for x in args.remat.split(",")]
  base = llama_1b(args.layers, args.dtype)
  n_params = (base.vocab_size * base.hidden_size + base.num_layers * (
      base.hidden_size * (base.num_heads + 2 * base.num_kv_heads) * base.head_dim
      + base.num_heads * base.head_dim * base.hidden_size
      + 3 * base.hidden_size * base.intermediate_size + 2 * base.hidden_size)
      + base.hidden_size)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}); compile only")
  print(f"config: llama {base.num_layers} layers, d={base.hidden_size}, heads "
        f"{base.num_heads}/{base.num_kv_heads} x {base.head_dim}, ffn {base.intermediate_size}, "
        f"vocab {base.vocab_size}, tied, {args.dtype}: {n_params / 1e9:.3f}B params; batch "
        f"{args.batch}; token_logprobs chunk {args.logprob_chunk or 'none'}; "
        f"attention_chunk_size {args.chunk}")
  header = (f"{'L':>6} {'attention':<10}{'remat':<7}{'temp GB':>10}{'args GB':>9}"
            f"{'out GB':>8}{'peak GB':>9}{'compile s':>11}")
  print(header)
  print("-" * len(header))
  for length in lengths:
    for remat in remats:
      for impl in impls:
        cfg = base.replace(attention_impl=impl, attention_chunk_size=args.chunk, remat=remat)
        mem, secs = compiled_memory(cfg, args.batch, length, args.logprob_chunk or None)
        # XLA:CPU's own peak_memory_in_bytes leaves the temp buffer out.
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        print(f"{length:>6} {impl:<10}{str(remat):<7}{mem.temp_size_in_bytes / GB:>10.2f}"
              f"{mem.argument_size_in_bytes / GB:>9.2f}{mem.output_size_in_bytes / GB:>8.2f}"
              f"{peak / GB:>9.2f}{secs:>11.1f}", flush=True)
  scores = args.batch * base.num_heads * max(lengths) ** 2 * 4
  print(f"one layer's float32 scores at L={max(lengths)}: {scores / GB:.1f} GB "
        f"([B, H, L, L]; the dense backward keeps them, or their softmax, per layer "
        f"without remat)")


if __name__ == "__main__":
  main()
