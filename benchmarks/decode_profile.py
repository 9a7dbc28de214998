"""Where one cached decoding step's time goes, thunk by thunk (XLA:CPU).

Builds a decoder of SmolLM2-135M's shapes (random weights; `--layers` of its
30), fills a KV cache of `--cache-len` slots half way, and traces 20 jitted
decoding steps (one token per row, the cache donated as in the sampler's loop)
with `jax.profiler`. XLA:CPU reports every thunk (fusion, dot, custom call)
when `--xla_cpu_enable_xprof_traceme=true` is in XLA_FLAGS, which this script
adds; the trace's per-thunk durations are summed by kind: the attention's
products over the cache (batched dots, or library fusions of rank 4 and more
since the single query's scores are a multiply-and-reduce), copies of the
cache, the projection and MLP GEMMs, the unembedding, and the rest. Pass
other XLA flags (e.g. the dot library) through the environment to compare
them. `--layout features` traces `feature_major.decode_step` (the sampler's
default step on CPU) instead of the decoder's own forward.

  python -m benchmarks.decode_profile --cache-len 1024
  python -m benchmarks.decode_profile --batch 64 --cache-len 96 --layout features
  XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type= \
      --xla_cpu_experimental_xnn_fusion_type=dot" \
      python -m benchmarks.decode_profile --cache-len 1024
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
from flax import nnx  # noqa: E402

from onpo_jax.models import decoder as decoder_lib  # noqa: E402
from onpo_jax.models import feature_major  # noqa: E402
from benchmarks.shapes import smollm2_config  # noqa: E402

_STEPS = 20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--cache-len", type=int, default=128, help="KV-cache slots (prompt + new)")
  p.add_argument("--layout", default="tokens", choices=("tokens", "features"),
                 help="the decoder's own forward, or `feature_major.decode_step` (activations "
                      "[D, B], kernels copied transposed before the traced steps)")
  return p.parse_args(argv)


def _kind(t: xla_trace.Thunk, vocab: int, slots: int) -> str:
  """What a decoding step's thunk does.

  The attention's products have batch dims (B, kv heads), so outputs of rank
  4 and more, whether dots or library fusions (the single query's scores and
  softmax); a library fusion without a dot that reads the cache's slots is
  the attention's too (the value sum of feature-major steps writes [B, H, d]),
  the others are the norms' reductions. The unembedding is the product that
  writes `vocab` columns.
  """
  if t.gemm:
    if vocab in t.dims:
      return "unembedding GEMM"
    return "attention dots" if len(t.dims) >= 4 else "projection / MLP GEMMs"
  if t.name.startswith(("ynn_fusion", "xnn_fusion")):
    if len(t.dims) >= 4 or slots in t.sizes:
      return "attention library fusions (scores, softmax, values)"
    return "library reductions (norms)"
  if "dynamic-update-slice" in t.name:
    return "cache writes"
  if "transpose" in t.name or "copy" in t.name.split(".")[0]:
    return "copies / transposes (cache layout, logits)"
  return "other fusions (norms, RoPE, softmax, residuals)"


def main(argv=None):
  args = parse_args(argv)
  b = args.batch
  cfg = smollm2_config(args.layers)
  model = decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  s = args.cache_len
  cache = decoder_lib.init_cache(cfg, b, s)._replace(
      index=jnp.asarray(s // 2, jnp.int32), mask=jnp.ones((b, s), bool))
  token = jnp.ones((b, 1), jnp.int32)

  if args.layout == "features":
    state = feature_major.decode_weights(model)
    token = token[:, 0]

  def step(state, token, cache):
    # The logits, as the sampler's step computes them (unembedding included).
    if args.layout == "features":
      h, cache = feature_major.decode_step(state, cfg, token, jnp.full((b,), s // 2), cache)
    else:
      h, cache = nnx.merge(graphdef, state)(
          token, jnp.full((b, 1), s // 2), jnp.ones((b, 1), bool), cache)
    # Write the same slot again next time: every traced step sees the same cache length.
    return h, cache._replace(index=cache.index - 1)

  f = jax.jit(step, donate_argnums=(2,))
  hlo = f.lower(state, token, cache).compile().as_text()
  kinds = {name: _kind(t, cfg.vocab_size, s) for name, t in xla_trace.thunks(hlo).items()}
  for _ in range(3):
    h, cache = f(state, token, cache)
  jax.block_until_ready(h)

  def run():
    nonlocal h, cache
    h, cache = f(state, token, cache)
    jax.block_until_ready(h)

  ms, walls = xla_trace.thunk_ms(run, _STEPS)
  per_kind = collections.Counter()
  for name, t in ms.items():
    if name in kinds:
      per_kind[kinds[name]] += t
  wall = 1e3 * float(np.median(walls))
  print(f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"decoding step ({args.layout}-major), batch {b}, {args.layers} layers of SmolLM2-135M's shapes, cache "
        f"{s} slots (half full): {wall:.1f} ms wall (median of {_STEPS}, traced)")
  for kind, t in per_kind.most_common():
    # The unembedding runs once per step, not per layer.
    per_layer = "" if kind == "unembedding GEMM" else f"  ({t / args.layers:.3f} ms per layer)"
    print(f"  {kind:<48}{t:8.2f} ms{per_layer}")
  print(f"  {'thunks, total':<48}{sum(per_kind.values()):8.2f} ms")


if __name__ == "__main__":
  main()
