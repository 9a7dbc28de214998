"""What every benchmark measures with: a timer of first and repeated calls, and thread settings."""

from __future__ import annotations

import os
import time

import numpy as np
import torch


def set_xla_threads(threads: int) -> None:
  """Sets XLA:CPU's threading in XLA_FLAGS (0: leave the default).

  Read when the XLA CPU backend starts, i.e. at the first JAX computation, so
  call it before any. XLA:CPU has no thread-count flag: threads > 1 uses its
  default pool (one thread per core), 1 turns intra-op threading off.
  """
  if threads > 0:
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={multi}")


def sync(device):
  """Torch runs CUDA kernels asynchronously: wait for them before reading a clock."""
  if str(device).startswith("cuda"):
    torch.cuda.synchronize()


def _timed_call(fn):
  """(wall, process-CPU) seconds of one call of fn."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def timed_calls(fn, repeats, after=None):
  """First-call wall seconds, then the wall and process-CPU seconds of each of the next calls.

  `after(wall_seconds)`, if given, runs after each of the timed calls, outside
  the timing: a reference measured right after each call (e.g. the GEMM peak)
  sees the same load from other tenants as the call did.
  """
  first, _ = _timed_call(fn)
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = _timed_call(fn)
    walls.append(wall)
    cpus.append(cpu)
    if after is not None:
      after(walls[-1])
  return first, walls, cpus


def paired_calls(a, b, repeats, after_a=None):
  """`timed_calls` of a and of b, their timed calls run back to back in pairs.

  The pairs alternate their order (a then b, then b then a, ...), so a change
  of load from other tenants, or a slow drift, reaches both sides alike. That
  makes the ratio of a pair's two calls steadier only where the two do not
  change each other's speed: a JAX and a torch train step in one process do
  (benchmarks/README.md, "One process for both sides, or one each").
  `after_a(wall_seconds)` runs after each timed call of a, outside the timing.

  Returns:
    (a's, b's) (first-call wall seconds, wall seconds per call, CPU seconds
    per call); the i-th calls of the two form a pair.
  """
  calls = (a, b)
  firsts = [_timed_call(fn)[0] for fn in calls]
  walls, cpus = ([], []), ([], [])
  for i in range(repeats):
    for j in ((0, 1) if i % 2 == 0 else (1, 0)):
      wall, cpu = _timed_call(calls[j])
      walls[j].append(wall)
      cpus[j].append(cpu)
      if j == 0 and after_a is not None:
        after_a(wall)
  return tuple((firsts[j], walls[j], cpus[j]) for j in (0, 1))


def timed(fn, repeats, after=None):
  """First-call wall seconds, then medians of wall and process-CPU seconds of the next calls.

  CPU time (all threads of this process) is reported next to wall time because
  on a shared machine wall time mostly measures the other tenants. `after`: as
  in `timed_calls`.
  """
  return medians(timed_calls(fn, repeats, after))


def medians(calls):
  """(first, median wall, median CPU seconds) of what `timed_calls` returns."""
  first, walls, cpus = calls
  return first, float(np.median(walls)), float(np.median(cpus))
