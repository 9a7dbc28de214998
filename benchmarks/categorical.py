"""Per-step cost of drawing one token per row: two-stage inverse CDF vs Gumbel-max.

`onpo_jax.next_token.categorical` draws two uniforms per row and scans block
sums; the former sampler (kept below to compare against) added V Gumbel noises
per row and took the argmax. Each is timed inside a jitted loop of `--steps`
draws, as in the sampler's decoding loop, on [batch, V] log-probabilities that
change with every step, so nothing is hoisted out of the loop.

  python -m benchmarks.categorical --threads 2
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import set_xla_threads, timed
from onpo_jax import next_token


def former_categorical(key, logits):
  """The former sampler: Gumbel-max with the first maximal index (= jax.random.categorical)."""
  y = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  is_max = y == jnp.max(y, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, y.shape, y.ndim - 1)
  return jnp.min(jnp.where(is_max, iota, y.shape[-1]), axis=-1)


def draw_loop(sample, steps):
  """Jitted: `steps` draws, each from log-probs shifted by the previous draws."""

  @jax.jit
  def run(key, logp):
    def body(step, acc):
      shifted = logp + 1e-3 * acc[:, None].astype(logp.dtype)
      return acc + sample(jax.random.fold_in(key, step), shifted)

    return jax.lax.fori_loop(0, steps, body, jnp.zeros(logp.shape[0], jnp.int32))

  return run


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
  p.add_argument("--steps", type=int, default=32, help="draws per jitted call")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="XLA:CPU threads: 1 = one, > 1 = one per core, 0 = default")
  args = p.parse_args(argv)
  set_xla_threads(args.threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), load average "
        f"{os.getloadavg()[0]:.1f}; ms per draw of [batch, {args.vocab}] float32, median of "
        f"{args.repeats} calls of {args.steps} draws (cpu ms in brackets)")
  print(f"{'batch':>6}{'Gumbel-max (before)':>24}{'inverse CDF (now)':>22}{'speed-up':>10}")
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  for batch in args.batches:
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(batch, args.vocab)) * 3.0,
                                          jnp.float32))
    per_draw = {}
    for name, sample in (("before", former_categorical), ("now", next_token.categorical)):
      run = draw_loop(sample, args.steps)
      _, wall, cpu = timed(lambda: run(key, logp).block_until_ready(), args.repeats)
      per_draw[name] = (1e3 * wall / args.steps, 1e3 * cpu / args.steps)
    (bw, bc), (nw, nc) = per_draw["before"], per_draw["now"]
    print(f"{batch:>6}{f'{bw:.2f} ({bc:.2f})':>24}{f'{nw:.2f} ({nc:.2f})':>22}{bw / nw:>9.1f}x")


if __name__ == "__main__":
  main()
