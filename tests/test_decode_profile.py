"""benchmarks/decode_profile.py: the thunk breakdown of both decoding steps.

Run in a fresh process: XLA:CPU traces its thunks only with a flag set before
the backend starts (`benchmarks.xla_trace.enable_thunk_events`).
"""

import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
from benchmarks import decode_profile
for layout in ("tokens", "features"):
  decode_profile.main(["--layers", "2", "--batch", "4", "--cache-len", "24", "--layout", layout])
"""


def _kinds(block: str) -> dict[str, float]:
  return {m.group(1).strip(): float(m.group(2))
          for m in re.finditer(r"^  (\S.*?)\s+([0-9.]+) ms", block, re.M)}


def test_decode_profile_splits_both_layouts_by_kind():
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=_ROOT, check=True,
                       capture_output=True, text=True, timeout=600).stdout
  blocks = re.split(r"^decoding step ", out, flags=re.M)[1:]
  assert [b.split(",")[0] for b in blocks] == ["(tokens-major)", "(features-major)"], out
  for block in blocks:
    assert "batch 4, 2 layers" in block and "cache 24 slots" in block
    kinds = _kinds(block)
    # Every step multiplies by the layers' kernels and unembeds its rows.
    assert kinds["projection / MLP GEMMs"] > 0 and kinds["unembedding GEMM"] > 0, block
    total = kinds.pop("thunks, total")
    assert abs(total - sum(kinds.values())) < 0.01 * len(kinds) + 1e-6, block
