"""Executes a Colab tutorial of colab/ headlessly, as CI runs it.

The notebook runs top to bottom with nbclient on the `python3` kernel
(jupyter_client launches it with this interpreter, i.e. the venv that has
onpo_jax installed), from a copy in `folder`, with ONPO_NOTEBOOK_FAST=1 so that
it runs its shrunk configuration; any cell error raises.
"""

import os
import pathlib
import shutil
import time

import nbclient
import nbformat
import pytest

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
# Per-cell limit: it only stops a hung kernel, it is not the budget.
CELL_TIMEOUT_S = 900


def execute(name: str, folder: pathlib.Path) -> tuple[nbformat.NotebookNode, float]:
  """Runs colab/`name` in `folder` (its temporary files land there); (notebook, seconds)."""
  with pytest.MonkeyPatch.context() as mp:
    # The kernel inherits this environment. CPU only, offline, and one device as on a
    # Colab CPU runtime (conftest's 8 fake devices are for the in-process tests).
    mp.setenv("ONPO_NOTEBOOK_FAST", "1")
    mp.setenv("ONPO_REAL_MODEL", "0")  # notebook 03: its CPU mode, no download
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip())
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    # The notebooks write their work directories with tempfile: keep them in `folder`.
    mp.setenv("TMPDIR", str(folder))
    shutil.copy(COLAB / name, folder / name)
    nb = nbformat.read(str(folder / name), as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    # Raises CellExecutionError (with the traceback of the failing cell) on any error.
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    return nb, time.perf_counter() - start


def stream_text(nb: nbformat.NotebookNode) -> str:
  """Everything the notebook's cells printed."""
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs if o.output_type == "stream")


def check_ran_fully(nb: nbformat.NotebookNode) -> None:
  """Asserts that every code cell ran, without an error, in the FAST configuration."""
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # A silently skipped cell would have no execution count.
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  assert "FAST=True" in stream_text(nb), "the parameter cell did not pick up ONPO_NOTEBOOK_FAST=1"
