"""Sampling with the KV cache grown in segments against one cache of prompt + N slots.

A decoding step reads every slot of the cache it carries, filled or not.
With `SamplingConfig.cache_segments` = G the cache starts at prompt + about
N/G slots and grows each time the steps reach its end. This script samples
the same prompts with G = 1 (the peer) and the G values of `--segments`
(fixed length, no EOS), checks that the tokens agree, and times the calls in
rotating order; each G gets the paired difference to G = 1 with a 95% t
interval. It also prints the peak KV-cache slots alive at once
(`SamplingConfig.peak_cache_slots`), the memory price.

Decoder of SmolLM2-135M's shapes with random weights (`--layers` of its 30).

  python -m benchmarks.cache_segments --threads 2 --layers 6 --batch 16 \\
      --prompt 64 --new 960
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import timing


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=0,
                 help="XLA:CPU threads (0: default; 1: no intra-op threads)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt", type=int, default=64, help="prompt slots P")
  p.add_argument("--new", type=int, default=960, help="new tokens N")
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--segments", default="2,4", help="comma-separated G values compared with 1")
  p.add_argument("--rounds", type=int, default=3, help="timed calls per setting")
  args = p.parse_args(argv)
  for name in ("batch", "prompt", "new", "layers"):
    if getattr(args, name) < 1:
      p.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
  if args.rounds < 2:
    p.error(f"--rounds: expected at least 2 for an interval, got {args.rounds}")
  try:
    args.segments = [int(x) for x in args.segments.split(",")]
  except ValueError:
    p.error(f"--segments: expected comma-separated ints, got {args.segments!r}")
  if not args.segments or min(args.segments) < 2:
    p.error(f"--segments: expected values >= 2, got {args.segments}")
  return args


def main(argv=None) -> dict:
  """Runs the comparison; returns {G: numbers} as printed."""
  args = parse_args(argv)
  timing.set_xla_threads(args.threads)
  # After XLA_FLAGS: the CPU backend reads them when it starts.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from onpo_jax import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.infra import stats  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  from benchmarks.shapes import smollm2_config  # pylint: disable=g-import-not-at-top

  b, p, n = args.batch, args.prompt, args.new
  cfg = smollm2_config(args.layers, max_position_embeddings=max(8192, p + n))
  graphdef, state = nnx.split(decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  backend = jax.default_backend()
  settings = [1] + args.segments
  samplers, first = {}, {}
  for g in settings:
    config = sampler_lib.SamplingConfig(max_new_tokens=n, prompt_buckets=(p,), cache_segments=g)
    samplers[g] = sampler_lib.Sampler(graphdef, config, model_config=cfg)
    t0 = time.perf_counter()
    out = jax.block_until_ready(samplers[g](state, tokens, mask, jax.random.key(0)))
    first[g] = (time.perf_counter() - t0, np.asarray(out.response_tokens),
                np.asarray(out.response_logprobs))
  print(f"jax {jax.__version__} ({backend}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"decoder: SmolLM2-135M shapes, {args.layers} layers, random weights; batch {b}, "
        f"prompt {p}, {n} new tokens (no EOS), float32")
  walls = {g: [] for g in settings}
  for r in range(args.rounds):
    order = settings[r % len(settings):] + settings[:r % len(settings)]
    for g in order:
      t0 = time.perf_counter()
      jax.block_until_ready(samplers[g](state, tokens, mask, jax.random.key(r + 1)))
      walls[g].append(time.perf_counter() - t0)
  base = np.asarray(walls[1])
  results = {}
  for g in settings:
    config = samplers[g].config
    ends = config.cache_segment_ends(backend)
    same = bool((first[g][1] == first[1][1]).all())
    lp_diff = float(np.abs(first[g][2] - first[1][2]).max())
    med = float(np.median(walls[g]))
    line = (f"G={g}: segment ends {ends}, peak cache slots {config.peak_cache_slots(p, backend)} "
            f"(G=1: {p + n}); {med:.2f} s per call, {b * n / med:.0f} tok/s (median of "
            f"{args.rounds}; first call {first[g][0]:.1f} s); tokens as G=1: {same}, "
            f"max |log-prob diff| {lp_diff:.1e}")
    results[g] = {"seconds": med, "same_tokens": same, "logprob_diff": lp_diff}
    if g != 1:
      d = stats.differs(np.asarray(walls[g]), base, paired=True)
      line += (f"\n  G={g} - G=1: {d.diff:+.2f} s, 95% CI [{d.low:+.2f}, {d.high:+.2f}], "
               f"p = {d.p_value:.3g} ({'supported' if d.significant else 'not supported'}); "
               f"speed-up {float(np.median(base)) / med:.2f}x")
      results[g].update(diff=d.diff, low=d.low, high=d.high, p=d.p_value)
    print(line)
  return results


if __name__ == "__main__":
  main()
