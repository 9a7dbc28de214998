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
import json, os, resource, sys, time
import numpy as np
print("started", os.getpid(), flush=True)
from onpo_jax.infra import host_memory
host_memory.start(sys.argv[1])
malloc = host_memory.configure(sys.argv[1])
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
print(json.dumps({"malloc": malloc, "faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "checksum": float(want.astype(np.float64).sum())}))
"""


def _run_child(mode):
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  env.pop("GLIBC_TUNABLES", None)
  lines = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, cwd=_ROOT, check=True,
                         capture_output=True, text=True, timeout=300).stdout.strip().splitlines()
  result = json.loads(lines[-1])
  result["starts"] = [line.split()[1] for line in lines if line.startswith("started ")]
  return result


@pytest.fixture(scope="module")
def glibc_defaults():
  return _run_child("default")


def test_reusing_freed_memory_stops_the_per_call_page_faults(glibc_defaults):
  default, reuse = glibc_defaults, _run_child("reuse")
  assert default["malloc"] == "glibc's defaults" and reuse["malloc"] == "reuses freed memory"
  assert len(reuse["starts"]) == 1  # only "hugepages" restarts
  assert reuse["checksum"] == default["checksum"]
  # sin(x), a 64 MB temporary (16384 pages), is mapped fresh and faulted in
  # on every call by default. Reused, the heap grows over the first calls,
  # then serves every call from memory already faulted in.
  assert min(default["faults"]) >= 16384, default
  assert sum(reuse["faults"][-8:]) <= sum(default["faults"][-8:]) // 8, (reuse, default)


def test_configure_reports_huge_pages_the_environment_already_asks_for(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert host_memory.configure("default").startswith("huge pages")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert host_memory.configure("default") == "glibc's defaults"


def test_configure_rejects_an_unknown_mode():
  with pytest.raises(ValueError, match="host_malloc.*hugepages, reuse, default.*'auto'"):
    host_memory.configure("auto")


def test_huge_pages_restart_the_process_and_fault_in_2_mib_pages(glibc_defaults):
  """The restart keeps the PID and adds the tunable; each 2 MiB page faults once."""
  default, huge = glibc_defaults, _run_child("hugepages")
  assert default["starts"] == [default["starts"][0]] and default["tunables"] is None
  assert huge["checksum"] == default["checksum"]
  if host_memory.huge_pages_available():
    assert huge["starts"] == [huge["starts"][0]] * 2, huge["starts"]  # restarted in place
    assert huge["tunables"] == "glibc.malloc.hugetlb=1"
    assert huge["malloc"].startswith("huge pages"), huge["malloc"]
    # The 64 MB temporary: 16384 small pages by default; with the tunable 32
    # huge pages, plus small ones where the mapping's ends leave part of a
    # 2 MiB range: mostly 33 faults a call, but up to two partial ranges of
    # 512 small pages each (546 seen when the mapping landed unaligned).
    assert max(huge["faults"][-8:]) <= 32 + 2 * 512 + 64, (huge, default)
    assert min(default["faults"][-8:]) >= 16384, default
  else:
    # glibc before 2.35 or THP "never": no restart, and the log says why.
    assert len(huge["starts"]) == 1 and huge["tunables"] is None
    assert "huge pages need" in huge["malloc"], huge["malloc"]


def test_with_huge_pages_keeps_other_tunables_and_the_users_choice():
  assert host_memory.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
  assert host_memory.huge_pages_requested(env)
  for chosen in ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2"):
    assert host_memory.with_huge_pages({"GLIBC_TUNABLES": chosen})["GLIBC_TUNABLES"] == chosen
  assert not host_memory.huge_pages_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert not host_memory.huge_pages_requested({})
  # glibc reads the tunables left to right: the last setting wins.
  assert host_memory.huge_pages_requested(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.hugetlb=1"})
  assert not host_memory.huge_pages_requested({"GLIBC_TUNABLES": "xglibc.malloc.hugetlb=1"})


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("garbage\n", None)])
def test_transparent_huge_pages_reads_the_kernels_mode(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert host_memory.transparent_huge_pages(str(path)) == mode
  assert host_memory.transparent_huge_pages(str(tmp_path / "absent")) is None
