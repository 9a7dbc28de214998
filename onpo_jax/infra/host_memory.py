"""glibc malloc settings for XLA:CPU runs (a process-wide setting).

XLA:CPU allocates each execution's temporary buffer, hundreds of MB for a
train step, from its worker threads with `posix_memalign`. A block that large
does not fit a thread's malloc arena, so glibc maps it fresh and unmaps it on
free: every step then page-faults its whole temporary buffer in again (about
166,000 faults and a fifth of the benchmark model's step spent in the
kernel, `benchmarks/README.md`). One arena that never maps and never trims
keeps freed blocks in the heap for the next step.

The price: the heap never shrinks below its high-water mark, freed blocks
stranded between live ones add to it (the SmolLM2 job's peak: 24.2 GB
instead of 23.6 GB, and 5 min 52 s instead of 6 min 22 s), and one arena
serialises the mallocs of every host thread. So it is a choice
(`experiments.run --host_malloc=reuse`), not the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it.

  All threads share one arena, no block is served by its own mapping, and the
  heap is never trimmed, so the process's resident memory stays at its peak
  and repeated executions reuse it without page faults. Call it before JAX
  runs anything: a thread keeps the arena of its first allocation.

  Returns:
    Whether the settings took effect (False without glibc).
  """
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def configure(mode: str) -> bool:
  """Applies the `--host_malloc` choice; returns whether memory is reused.

  Args:
    mode: "reuse" (`reuse_freed_memory`) or "default" (glibc's own settings).

  Raises:
    ValueError: another mode.
  """
  if mode not in ("reuse", "default"):
    raise ValueError(f"host_malloc: expected 'reuse' or 'default', got {mode!r}")
  return mode == "reuse" and reuse_freed_memory()
