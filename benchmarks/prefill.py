"""A prompt's prefill: `Decoder.prefill` against a forward into an empty cache.

The sampler fills each model's KV cache with `Decoder.prefill`, whose
queries attend to the prompt's own L keys through the configured
self-attention kernel. The peer is what the sampler ran before, and what
`Decoder.hidden_states` still does with a cache: the same prompt written
into a fresh cache of S = prompt + new slots, its queries attending to all S
slots (the later ones masked). Both jitted functions return the last
position's logits and the cache; their results are compared once, then timed
in alternating pairs (`timing.paired_calls`), and the paired difference gets
a 95% t interval.

Decoder of SmolLM2-135M's shapes with random weights (`--layers` of its 30),
every prompt `--prompt` tokens long (the first rows left-padded by up to a
quarter of it).

  python -m benchmarks.prefill --threads 2 --batch 64 --prompt 32 --new 64
  python -m benchmarks.prefill --threads 2 --batch 8 --prompt 512 --new 1024
"""

from __future__ import annotations

import argparse
import os

from benchmarks import timing


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=0,
                 help="XLA:CPU threads (0: default; 1: no intra-op threads)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--prompt", type=int, default=32, help="prompt slots L")
  p.add_argument("--new", type=int, default=64, help="slots for new tokens (S = L + new)")
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--attention-impl", default="dense")
  p.add_argument("--repeats", type=int, default=8, help="timed pairs")
  args = p.parse_args(argv)
  for name in ("batch", "prompt", "layers", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
  if args.new < 0:
    p.error(f"--new: expected an int >= 0, got {args.new}")
  if args.repeats < 2:
    p.error(f"--repeats: expected at least 2 pairs for an interval, got {args.repeats}")
  return args


def main(argv=None) -> dict:
  """Runs the comparison; returns the numbers it printed."""
  args = parse_args(argv)
  timing.set_xla_threads(args.threads)
  # After XLA_FLAGS: the CPU backend reads them when it starts.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from onpo_jax.infra import stats  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  from benchmarks.shapes import smollm2_config  # pylint: disable=g-import-not-at-top

  b, l = args.batch, args.prompt
  s = l + args.new
  cfg = smollm2_config(args.layers, max_position_embeddings=max(8192, s),
                       attention_impl=args.attention_impl)
  graphdef, state = nnx.split(decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (b, l)), jnp.int32)
  pads = rng.randint(0, l // 4 + 1, b)
  mask = jnp.asarray(np.arange(l)[None, :] >= pads[:, None])
  positions = decoder_lib.positions_from_mask(mask)

  def last_logits(model, h):
    return model.logits_from_hidden(h[:, -1:, :])[:, 0]

  @jax.jit
  def prefill(state):
    model = nnx.merge(graphdef, state)
    h, cache = model.prefill(tokens, positions, mask, s)
    return last_logits(model, h), cache

  @jax.jit
  def cache_forward(state):
    model = nnx.merge(graphdef, state)
    h, cache = model.hidden_states(tokens, positions, mask,
                                   decoder_lib.init_cache(cfg, b, s))
    return last_logits(model, h), cache

  ours, theirs = prefill(state), cache_forward(state)
  scale = float(jnp.abs(theirs[0]).max())
  logit_err = float(jnp.abs(ours[0] - theirs[0]).max()) / scale
  real = np.asarray(mask)
  key_err = max(
      float(np.abs(np.asarray(k1 - k2)[..., :l].transpose(0, 3, 1, 2)[real]).max())
      for k1, k2 in zip(ours[1].k, theirs[1].k))
  print(f"jax {jax.__version__} ({jax.default_backend()}), XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}, load average {os.getloadavg()[0]:.1f}")
  print(f"decoder: SmolLM2-135M shapes, {args.layers} layers, random weights, attention "
        f"{args.attention_impl}; batch {b}, prompt {l} slots, cache {s} slots")
  print(f"same results: last logits max |prefill - cache forward| = {logit_err:.2e} of "
        f"max |logit|; keys of real tokens max |diff| = {key_err:.2e}")

  def run(fn):
    return lambda: jax.block_until_ready(fn(state))

  (first_a, walls_a, _), (first_b, walls_b, _) = timing.paired_calls(
      run(prefill), run(cache_forward), args.repeats)
  ms_a, ms_b = 1e3 * np.asarray(walls_a), 1e3 * np.asarray(walls_b)
  d = stats.differs(ms_a, ms_b, paired=True)
  med_a, med_b = float(np.median(ms_a)), float(np.median(ms_b))
  print(f"prefill        {med_a:9.1f} ms (median of {args.repeats}; first call "
        f"{first_a:.1f} s)")
  print(f"cache forward  {med_b:9.1f} ms (median of {args.repeats}; first call "
        f"{first_b:.1f} s)")
  print(f"ratio cache forward / prefill {med_b / med_a:.2f}x; prefill - cache forward "
        f"{d.diff:+.1f} ms, 95% CI [{d.low:+.1f}, {d.high:+.1f}], p = {d.p_value:.3g} "
        f"(paired t over {args.repeats} pairs): "
        f"{'supported' if d.significant else 'not supported'}")
  return {"prefill_ms": med_a, "cache_forward_ms": med_b, "ratio": med_b / med_a,
          "diff_ms": d.diff, "diff_low": d.low, "diff_high": d.high, "p": d.p_value,
          "logit_err": logit_err, "key_err": key_err}


if __name__ == "__main__":
  main()
