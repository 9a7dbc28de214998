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


def timed_calls(fn, repeats, after=None):
  """First-call wall seconds, then the wall and process-CPU seconds of each of the next calls.

  `after(wall_seconds)`, if given, runs after each of the timed calls, outside
  the timing: a reference measured right after each call (e.g. the GEMM peak)
  sees the same load from other tenants as the call did.
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  walls, cpus = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
    if after is not None:
      after(walls[-1])
  return first, walls, cpus


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
