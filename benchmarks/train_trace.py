"""Where a train step of SmolLM2-135M's shapes spends its time (XLA:CPU thunks).

Builds a decoder of SmolLM2-135M's shapes (random weights, tied 49152-token
unembedding), jits the train step `sampler.py` times (`train_step.py`: token
log-probs of the second half of each row, `Decoder.token_logprobs`, backward,
Adam; parameters and optimizer state donated), and traces a few steps with
`jax.profiler`. Each thunk's time is summed by what it does (GEMMs of the unembedding, GEMMs of the
blocks, attention dots, layout copies and transposes, the rest) and by the
pass it belongs to (the JAX operation in its metadata: forward, backward,
Adam, or a copy of a parameter XLA makes to lay it out for a GEMM). Pass
other XLA flags (e.g. the dot library) through the environment to compare
them.

  python -m benchmarks.train_trace
  python -m benchmarks.train_trace --batch 8 --length 256
  python -m benchmarks.train_trace --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import os

from benchmarks import xla_trace

xla_trace.enable_thunk_events()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import train_step  # noqa: E402
from onpo_jax.models import decoder as decoder_lib  # noqa: E402
from benchmarks.shapes import smollm2_config  # noqa: E402

_VOCAB = smollm2_config().vocab_size  # its unembedding thunks are found by this size


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="parameter and compute dtype")
  return p.parse_args(argv)


def _kind(t: xla_trace.Thunk) -> str:
  """What a train step's thunk does (by opcode, shapes and operands)."""
  if t.gemm:
    if _VOCAB in t.sizes:
      return "unembedding GEMMs (tied, V = 49152)"
    return "attention dots" if len(t.dims) >= 4 else "block GEMMs (q k v o, MLP)"
  if "transpose" in t.name or t.name.startswith("copy"):
    return "layout copies / transposes"
  if _VOCAB in t.sizes:
    return "log-softmax, its gradient, embedding"
  return "other (norms, RoPE, softmax, residuals, Adam)"


def _phase(t: xla_trace.Thunk) -> str:
  """Which pass a thunk belongs to, from the JAX operation it came from."""
  if "transpose(" in t.op_name:
    return "backward"
  if "jvp(" in t.op_name:
    return "forward"
  if t.op_name.startswith("jit("):
    return "Adam"
  return "weights"  # copies of parameters XLA lays out for a GEMM


def main(argv=None):
  args = parse_args(argv)
  b, l = args.batch, args.length
  cfg = smollm2_config(args.layers, param_dtype=args.dtype, dtype=args.dtype)
  graphdef, params = nnx.split(decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, _VOCAB, size=(b, l)), jnp.int32)
  attn = jnp.ones((b, l), bool)
  # The second half of each row plays the response.
  resp = jnp.broadcast_to(jnp.arange(l) >= l // 2, (b, l))
  tx = optax.adam(1e-5)

  f = train_step.make_step(graphdef, tx, full_logits=False)
  carry = [params, tx.init(params)]
  compiled = f.lower(*carry, tokens, attn, resp).compile()
  hlo = compiled.as_text()
  table = xla_trace.thunks(hlo)

  def run():
    carry[0], carry[1], loss = f(*carry, tokens, attn, resp)
    jax.block_until_ready(loss)

  for _ in range(2):
    run()
  ms, walls = xla_trace.thunk_ms(run, args.steps)

  by_kind = collections.defaultdict(collections.Counter)
  for name, t in ms.items():
    if name in table:
      by_kind[_kind(table[name])][_phase(table[name])] += t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  wall = float(np.median(walls))
  total = sum(sum(c.values()) for c in by_kind.values())
  print(f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"train step, {args.dtype}, {b} x {l} tokens, {args.layers} layers of SmolLM2-135M's shapes: "
        f"{1e3 * wall:.0f} ms wall (median of {args.steps}, traced), "
        f"{b * l / wall:.0f} tokens/s, {float(cost['flops']) / wall / 1e9:.1f} GFLOP/s (XLA's "
        f"count); thunks {total:.0f} ms (the two threads overlap)")
  phases = ("forward", "backward", "Adam", "weights")
  print(f"  {'thunk time per step, ms':<44}" + "".join(f"{p:>10}" for p in phases)
        + f"{'total':>10}{'share':>8}")
  for kind, c in sorted(by_kind.items(), key=lambda kv: -sum(kv[1].values())):
    row = sum(c.values())
    print(f"  {kind:<44}" + "".join(f"{c[p]:10.0f}" for p in phases)
          + f"{row:10.0f}{row / total:8.1%}")


if __name__ == "__main__":
  main()
