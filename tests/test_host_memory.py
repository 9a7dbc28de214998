"""glibc malloc settings (onpo_jax/infra/host_memory.py).

The effect is checked where it matters: minor page faults of a jitted
computation whose temporary buffer XLA:CPU allocates on every call, in fresh
processes (the settings are process-wide and must precede JAX's threads).
"""

import json
import os
import subprocess
import sys

import pytest

from onpo_jax.infra import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 24 calls after a warm-up; prints the minor faults of each call and the result.
_CHILD = """
import json, resource, sys, time
import numpy as np
from onpo_jax.infra import host_memory
reused = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sin(x) @ w)
x = jnp.linspace(0.0, 1.0, 8192 * 2048, dtype=jnp.float32).reshape(8192, 2048)
w = jnp.linspace(-1.0, 1.0, 2048 * 64, dtype=jnp.float32).reshape(2048, 64)
want = np.asarray(f(x, w))
faults = []
for _ in range(24):
  # The executing thread frees the temporary after the result is ready: let
  # it, so that one call's temporary is never live during the next.
  time.sleep(0.05)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  got = f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  assert np.array_equal(np.asarray(got), want)
print(json.dumps({"reused": reused, "faults": faults, "checksum": float(want.astype(np.float64).sum())}))
"""


def _run_child(mode):
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, cwd=_ROOT, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_reusing_freed_memory_stops_the_per_call_page_faults():
  default, reuse = _run_child("default"), _run_child("reuse")
  assert not default["reused"] and reuse["reused"]
  assert reuse["checksum"] == default["checksum"]
  # sin(x), a 64 MB temporary (16384 pages), is mapped fresh and faulted in
  # on every call by default. Reused, the heap grows over the first calls,
  # then serves every call from memory already faulted in.
  assert min(default["faults"]) >= 16384, default
  assert sum(reuse["faults"][-8:]) <= sum(default["faults"][-8:]) // 8, (reuse, default)


def test_configure_rejects_an_unknown_mode():
  with pytest.raises(ValueError, match="host_malloc"):
    host_memory.configure("auto")
