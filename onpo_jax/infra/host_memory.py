"""glibc malloc settings for XLA:CPU runs (a process-wide setting).

XLA:CPU allocates each execution's temporary buffer, hundreds of MB for a
train step, from its worker threads with `posix_memalign`. A block that large
does not fit a thread's malloc arena, so glibc maps it fresh and unmaps it on
free: every step then page-faults its whole temporary buffer in again, one
4 KiB page at a time (about 166,000 faults and a fifth of the benchmark
model's step spent in the kernel, `benchmarks/README.md`). Two ways out:

* "hugepages" (`experiments.run`'s default): glibc advises the kernel to back
  its mappings with 2 MiB transparent huge pages (the tunable
  `glibc.malloc.hugetlb=1`, glibc 2.35+), so the same buffer faults in 512
  times fewer pieces, and is still returned to the system when freed. glibc
  reads tunables only when a process starts, hence `restart_with_huge_pages`
  (`start` in an entry point). It needs the kernel's transparent huge pages
  set to "madvise" or "always" (`transparent_huge_pages`); without them the
  process runs on glibc's defaults and its log says why.
* "reuse": one arena that never maps and never trims keeps freed blocks in the
  heap for the next step. The heap then never shrinks below its high-water
  mark, blocks stranded between live ones add to it (the SmolLM2 job's peak:
  24.2 GB instead of 23.6 GB), and one arena serialises the mallocs of every
  host thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

MODES = ("hugepages", "reuse", "default")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_HUGETLB = "glibc.malloc.hugetlb"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def _hugetlb_setting(environ: Mapping[str, str]) -> str | None:
  """The value GLIBC_TUNABLES gives `glibc.malloc.hugetlb` (the last one wins), if any."""
  value = None
  for entry in environ.get("GLIBC_TUNABLES", "").split(":"):
    name, _, setting = entry.partition("=")
    if name == _HUGETLB:
      value = setting
  return value


def huge_pages_requested(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment asks glibc malloc for transparent huge pages."""
  return _hugetlb_setting(environ) not in (None, "0")


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES asks malloc for huge pages.

  Other tunables are kept, and so is a `glibc.malloc.hugetlb` value the user
  already chose (0 included).
  """
  env = dict(environ)
  if _hugetlb_setting(env) is None:
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{_HUGETLB}=1"])
  return env


def transparent_huge_pages(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" else None


def huge_pages_available() -> bool:
  """Whether "hugepages" can take effect: glibc 2.35+ and the kernel's THP not "never"."""
  version = _glibc_version()
  return (version is not None and version >= (2, 35)
          and transparent_huge_pages() in ("madvise", "always"))


def restart_with_huge_pages() -> None:
  """Restarts this process with `with_huge_pages` applied, unless it already is.

  Runs the same command line (`sys.orig_argv`) in place of this process
  (same PID, so launchers and signals see no difference). Nothing happens
  where GLIBC_TUNABLES already sets `glibc.malloc.hugetlb` (to any value, so
  a restarted process does not restart again) or huge pages are not
  available. Call it first thing in a program's entry point, before any work
  that a restart would repeat; it returns only when no restart is needed.
  """
  if _hugetlb_setting(os.environ) is not None or not huge_pages_available():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, with_huge_pages(os.environ))


def start(mode: str) -> None:
  """What `mode` needs at a program's start: the restart of "hugepages".

  For command-line entry points only (a program calling its own `main` in
  process, as tests do, must not be replaced); `configure` follows it.
  """
  if mode == "hugepages":
    restart_with_huge_pages()


def configure(mode: str) -> str:
  """Applies the `--host_malloc` choice in this process; returns what is in effect.

  "hugepages" is applied by `restart_with_huge_pages` when the process
  starts; here it is only reported.

  Args:
    mode: one of `MODES`.

  Returns:
    A phrase for the run's log, e.g. "glibc's defaults".

  Raises:
    ValueError: another mode.
  """
  if mode not in MODES:
    raise ValueError(f"host_malloc: expected one of {', '.join(MODES)}, got {mode!r}")
  if mode == "reuse":
    return "reuses freed memory" if reuse_freed_memory() else "glibc's defaults (no glibc)"
  if mode == "hugepages":
    if not huge_pages_available():
      return (f"glibc's defaults (huge pages need glibc 2.35+ and transparent huge pages; "
              f"glibc {_glibc_version()}, THP {transparent_huge_pages()})")
    if not huge_pages_requested():
      return "glibc's defaults (huge pages need GLIBC_TUNABLES=glibc.malloc.hugetlb=1 at start)"
    return f"huge pages (transparent huge pages: {transparent_huge_pages()})"
  if huge_pages_requested():  # inherited, e.g. from a restarted parent process
    return "huge pages (GLIBC_TUNABLES set in the environment)"
  return "glibc's defaults"
