"""Top-k / top-p filtering: `filter_logits`'s bisections against the former sort.

Run by `python -m benchmarks.sampler --filter-logits` (its setup of threads
and malloc applies): jitted, float32 logits [16, 49152] and [64, 49152],
top-p 0.9 with and without top-k 50.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import timed
from onpo_jax import sampler as sampler_lib


def _former_filter_logits(x, top_k, top_p):
  """the former filter_logits: lax.top_k, then sort + cumsum + threshold for top-p."""
  if top_k:
    x = jnp.where(x < jax.lax.top_k(x, top_k)[0][..., -1:], -jnp.inf, x)
  sorted_desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
  return jnp.where(x < threshold, -jnp.inf, x)


def bench_filter_logits(args, vocab=49152, batches=(16, 64), top_p=0.9):
  """Wall ms (median of --repeats calls) of jitted filter_logits: bisections vs the former
  lax.top_k + full sort."""
  rng = np.random.default_rng(args.seed)
  print(f"filter_logits, float32, top_p={top_p}, logits normal(0, 3); wall ms, median of "
        f"{args.repeats} calls (cpu ms in brackets)")
  print(f"{'shape':<14}{'top_k':>6}{'sort (before)':>22}{'bisection (now)':>22}{'speed-up':>10}"
        f"{'same kept set':>15}")
  for batch in batches:
    x = jnp.asarray(rng.normal(size=(batch, vocab)) * 3.0, jnp.float32)
    for top_k in (0, 50):
      new = jax.jit(lambda x, k=top_k: sampler_lib.filter_logits(x, top_k=k, top_p=top_p))
      old = jax.jit(lambda x, k=top_k: _former_filter_logits(x, k, top_p))
      same = bool(jnp.all(jnp.isfinite(new(x)) == jnp.isfinite(old(x))))
      _, old_wall, old_cpu = timed(lambda: old(x).block_until_ready(), args.repeats)
      _, new_wall, new_cpu = timed(lambda: new(x).block_until_ready(), args.repeats)
      print(f"{str([batch, vocab]):<14}{top_k:>6}"
            f"{f'{1e3 * old_wall:.1f} ({1e3 * old_cpu:.1f})':>22}"
            f"{f'{1e3 * new_wall:.1f} ({1e3 * new_cpu:.1f})':>22}"
            f"{old_wall / new_wall:>9.1f}x{str(same):>15}")
