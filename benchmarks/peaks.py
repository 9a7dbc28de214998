"""A machine's peaks for the benchmarks' bounds: XLA's GEMM rate and the memory read rate."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import torch

from benchmarks.timing import timed


def _square_matmuls(dtype, sizes):
  """(jitted matmul with a float32 result, one square `dtype` operand per size)."""
  f = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
  return f, [jnp.ones((n, n), dtype) for n in sizes]


def _matmul_gflops(x, seconds):
  """GFLOP/s of `x` @ `x` for a square `x` computed in `seconds`."""
  return 2.0 * x.shape[0] ** 3 / seconds / 1e9


def gemm_peak(repeats, dtype="float32", sizes=(1024, 2048)):
  """Best GFLOP/s of jitted square matmuls of the given sizes (XLA's GEMM peak).

  The operands are `dtype`, the result float32: the form of the model's
  products (`layers.dense`), which XLA:CPU runs natively in bfloat16 where
  the CPU has bfloat16 instructions. A GPU needs sizes of 4096 and more to
  come near its peak. Each size's rate is the median of `repeats` calls.
  """
  f, xs = _square_matmuls(dtype, sizes)
  best = 0.0
  for x in xs:
    _, wall, _ = timed(lambda: jax.block_until_ready(f(x, x)), repeats)
    best = max(best, _matmul_gflops(x, wall))
  return best


def gemm_probe(dtype="float32", sizes=(1024, 2048), calls=2):
  """probe() -> GFLOP/s: `calls` calls of each of `gemm_peak`'s matmuls, the best rate.

  Compiled here, so a probe call only computes. Run right after each timed call
  of a step, it gives that call's peak under the same load from other tenants:
  on a shared machine the peak moves by a quarter from one minute to the next.
  The best of several calls keeps one slow call from lowering the peak.
  """
  f, xs = _square_matmuls(dtype, sizes)
  for x in xs:
    jax.block_until_ready(f(x, x))

  def probe():
    best = 0.0
    for x in xs:
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, x))
        best = max(best, _matmul_gflops(x, time.perf_counter() - t0))
    return best

  return probe


def read_bandwidth(repeats, gigabytes=0.5, torch_device="cpu"):
  """Best GB/s of summing a float32 array far larger than the caches: (GB/s, by what).

  Both a jitted `jnp.sum` (on JAX's default device) and `torch.sum` (on
  `torch_device`) are timed and the faster counts: how fast XLA reduces
  depends on its CPU flags (its YNNPACK reduction read ~2.4x faster than its
  own loop on the 2-core machine), and the bound should not. On a GPU both
  read its memory (HBM); run them on the same kind of device.
  """
  x = jnp.ones((int(gigabytes * 2 ** 30) // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  t = torch.ones(x.shape, dtype=torch.float32, device=torch_device)
  best = {}
  for name, fn in (("jitted jnp.sum", lambda: jax.block_until_ready(f(x))),
                   ("torch.sum", lambda: float(t.sum()))):
    fn()
    walls = []
    for _ in range(max(repeats, 3)):
      t0 = time.perf_counter()
      fn()
      walls.append(time.perf_counter() - t0)
    best[name] = x.nbytes / min(walls) / 1e9
  name = max(best, key=best.get)
  return best[name], name
