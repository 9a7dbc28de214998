"""Thunk-by-thunk timing of a jitted program on XLA:CPU, from a profiler trace.

XLA:CPU reports every thunk it runs (a fusion, a dot, a library call) to
`jax.profiler` when `--xla_cpu_enable_xprof_traceme=true` is in XLA_FLAGS
before the backend starts: scripts call `enable_thunk_events()` before they
import jax. `thunk_ms` sums each thunk's duration over traced calls and
`thunks` reads from the compiled HLO what each thunk is (its output shape,
whether it multiplies matrices, and the JAX operation it came from). The two
threads of XLA:CPU run independent thunks concurrently, so summed thunk time
can exceed the wall time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time


def enable_thunk_events() -> None:
  """Adds the flag that makes XLA:CPU trace its thunks (before jax starts)."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_enable_xprof_traceme=true").strip()


@dataclasses.dataclass(frozen=True)
class Thunk:
  """One instruction of the compiled HLO (the trace names those XLA:CPU runs).

  Attributes:
    name: the instruction (and trace event) name.
    dims: its output dimensions.
    gemm: a dot, or a fusion (YNNPACK / XNNPACK library fusions included) whose
      body holds a dot.
    op_name: the JAX operation in its metadata ('jit(step)/jvp(...)/dot_general'):
      `jvp(` marks forward-pass work of a gradient, `transpose(` backward work.
    sizes: every dimension of every shape in the instruction and, for a fusion,
      its body (operands included).
  """
  name: str
  dims: tuple[int, ...]
  gemm: bool
  op_name: str
  sizes: frozenset[int]


def thunks(hlo: str) -> dict[str, Thunk]:
  """Every instruction of the compiled HLO text, by name."""
  bodies = dict(re.findall(r"^(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
  lines = re.findall(
      r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)$", hlo, re.M)
  dims_of = {name: tuple(int(d) for d in dims.split(",") if d) for name, dims, _, _ in lines}
  out = {}
  for name, _, op, rest in lines:
    called = re.search(r"calls=(%[\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    op_name = re.search(r'op_name="([^"]*)"', rest)
    sizes = {int(d) for shape in re.findall(r"\w+\[([\d,]*)\]", body)
             for d in shape.split(",") if d}
    for operand in re.findall(r"%([\w.\-]+)", rest.split(")")[0]):
      sizes.update(dims_of.get(operand, ()))
    out[name] = Thunk(name, dims_of[name], op == "dot" or " dot(" in body,
                      op_name.group(1) if op_name else "",
                      frozenset(sizes.union(dims_of[name])))
  return out


def thunk_ms(run, steps: int) -> tuple[collections.Counter, list[float]]:
  """Traces `steps` calls of `run` (which blocks until its result is ready).

  Returns:
    (thunk name -> summed milliseconds per call, the wall seconds of each call).
  """
  import jax  # pylint: disable=g-import-not-at-top
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as fh:
      trace = json.load(fh)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ms = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      ms[e.get("name", "")] += e.get("dur", 0) / 1e3 / steps
  return ms, walls
