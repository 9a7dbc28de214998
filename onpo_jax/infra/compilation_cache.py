"""Persistent XLA compilation cache (a process-wide JAX setting)."""

import os

import jax


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache in `path` (process-wide JAX setting).

  Compilation dominates a CPU run of this size; with the cache a resumed or
  repeated run reuses the compiled executables (bit-identical results).
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(path)
  # JAX decides once per process whether the cache is used; re-decide now.
  compilation_cache.reset_cache()
