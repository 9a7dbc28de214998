"""Sampling with feature-major decoding steps against the model's own forward.

`SamplingConfig.decode_layout` = 'features' runs each decoding step with the
activations [D, B] and the kernels copied transposed to [out, in] once per
call (`onpo_jax.models.feature_major`); 'tokens' (the peer) runs the
decoder's own forward, [B, 1, D]. For each batch size this script samples the
same prompts both ways (fixed length, no EOS), checks that the tokens agree,
and times the calls in pairs of alternating order: the paired difference
gets a 95% t interval. It also times the transposed copy on its own (part of
every 'features' call).

Decoder of SmolLM2-135M's shapes with random weights (`--layers` of its 30).

  python -m benchmarks.decode_layout --threads 2 --batch 16,64 --new 64
"""

from __future__ import annotations

import argparse
import os

from benchmarks import timing


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=0,
                 help="XLA:CPU threads (0: default; 1: no intra-op threads)")
  p.add_argument("--batch", default="16,64", help="comma-separated batch sizes")
  p.add_argument("--prompt", type=int, default=32, help="prompt slots P")
  p.add_argument("--new", type=int, default=64, help="new tokens N")
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="parameters, compute and KV cache")
  p.add_argument("--repeats", type=int, default=5, help="timed pairs per batch size")
  args = p.parse_args(argv)
  for name in ("prompt", "new", "layers"):
    if getattr(args, name) < 1:
      p.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
  if args.repeats < 2:
    p.error(f"--repeats: expected at least 2 for an interval, got {args.repeats}")
  try:
    args.batch = [int(x) for x in args.batch.split(",")]
  except ValueError:
    p.error(f"--batch: expected comma-separated ints, got {args.batch!r}")
  if not args.batch or min(args.batch) < 1:
    p.error(f"--batch: expected positive ints, got {args.batch}")
  return args


def main(argv=None) -> dict:
  """Runs the comparison; returns {batch: numbers} as printed."""
  args = parse_args(argv)
  timing.set_xla_threads(args.threads)
  # After XLA_FLAGS: the CPU backend reads them when it starts.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from onpo_jax import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.infra import stats  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import feature_major  # pylint: disable=g-import-not-at-top
  from benchmarks.shapes import smollm2_config  # pylint: disable=g-import-not-at-top

  p, n = args.prompt, args.new
  cfg = smollm2_config(args.layers, dtype=args.dtype, param_dtype=args.dtype,
                       max_position_embeddings=max(8192, p + n))
  graphdef, state = nnx.split(decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  print(f"jax {jax.__version__} ({jax.default_backend()}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load average {os.getloadavg()[0]:.1f}")
  print(f"decoder: SmolLM2-135M shapes, {args.layers} layers, random weights, {args.dtype}; "
        f"prompt {p}, {n} new tokens (no EOS)")
  copy = jax.jit(lambda s: feature_major.decode_weights(nnx.merge(graphdef, s)))
  _, copy_s, _ = timing.timed(lambda: jax.block_until_ready(copy(state)), args.repeats)
  print(f"transposed copy of the kernels alone: {1e3 * copy_s:.1f} ms (median of {args.repeats})")
  rng = np.random.RandomState(0)
  results = {"copy_seconds": copy_s}
  for b in args.batch:
    tokens = rng.randint(3, cfg.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones((b, p), bool)
    calls, outs = [], []
    for layout in ("tokens", "features"):
      config = sampler_lib.SamplingConfig(max_new_tokens=n, prompt_buckets=(p,),
                                          decode_layout=layout)
      sampler = sampler_lib.Sampler(graphdef, config, model_config=cfg)
      outs.append(sampler(state, tokens, mask, jax.random.key(0)))
      calls.append(lambda s=sampler: jax.block_until_ready(
          s(state, tokens, mask, jax.random.key(1))))
    same = bool((np.asarray(outs[0].response_tokens) == np.asarray(outs[1].response_tokens)).all())
    lp_diff = float(np.abs(np.asarray(outs[0].response_logprobs)
                           - np.asarray(outs[1].response_logprobs)).max())
    (_, base, _), (_, new, _) = timing.paired_calls(*calls, args.repeats)
    d = stats.differs(np.asarray(new), np.asarray(base), paired=True)
    t_base, t_new = float(np.median(base)), float(np.median(new))
    print(f"batch {b}: tokens-major {t_base:.2f} s ({b * n / t_base:.0f} tok/s), "
          f"feature-major {t_new:.2f} s ({b * n / t_new:.0f} tok/s) per call (median of "
          f"{args.repeats}); features - tokens {d.diff:+.3f} s, 95% CI [{d.low:+.3f}, "
          f"{d.high:+.3f}], p = {d.p_value:.3g} "
          f"({'supported' if d.significant else 'not supported'}); speed-up "
          f"{t_base / t_new:.2f}x; same tokens: {same}, max |log-prob diff| {lp_diff:.1e}")
    results[b] = {"tokens_seconds": t_base, "features_seconds": t_new, "diff": d.diff,
                  "low": d.low, "high": d.high, "p": d.p_value, "same_tokens": same,
                  "logprob_diff": lp_diff}
  return results


if __name__ == "__main__":
  main()
