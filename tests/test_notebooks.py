"""The Colab tutorials in colab/ run headlessly, start with the install cell, and stay small.

Each notebook is executed top to bottom with nbclient on the `python3` kernel
(jupyter_client launches it with this interpreter, i.e. the venv that has
onpo_jax installed), from a temporary copy, with ONPO_NOTEBOOK_FAST=1 so that it
runs its shrunk configuration; any cell error fails the test. The static checks
keep the committed files honest: they match colab/build_notebooks.py, install
the package in their first code cell without touching the network when it is
already importable, define no functions or classes of their own (all logic
lives in onpo_jax), and have small saved outputs.
"""

import ast
import importlib.util
import os
import pathlib
import shutil
import time

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_tabular_onpo.ipynb", "02_toy_llm_onpo.ipynb", "03_real_model.ipynb")
# Committed outputs are meant to be glanced at on GitHub, not to carry data.
MAX_NOTEBOOK_BYTES = 300 * 1024
# Per-cell limit. The whole CI budget for the three FAST runs is ~4 min on an idle
# machine; this only stops a hung kernel, it is not the budget.
CELL_TIMEOUT_S = 600


def _load_builder():
  spec = importlib.util.spec_from_file_location("build_notebooks", COLAB / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _code_sources(nb):
  return [c.source for c in nb.cells if c.cell_type == "code"]


def _read(name):
  return nbformat.read(str(COLAB / name), as_version=4)


def test_builder_lists_every_notebook():
  assert sorted(_load_builder().NOTEBOOKS) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_builder(name):
  # Cells are edited in build_notebooks.py; a hand edit of the .ipynb would drift.
  built = _load_builder().build(name)
  committed = _read(name)
  assert [(c.cell_type, c.source) for c in committed.cells] == [
      (c.cell_type, c.source) for c in built.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_small(name):
  path = COLAB / name
  nbformat.validate(_read(name))
  assert path.stat().st_size < MAX_NOTEBOOK_BYTES, (
      f"{name} is {path.stat().st_size} bytes; keep saved outputs under {MAX_NOTEBOOK_BYTES}")
  errors = [o for c in _read(name).cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, f"{name} was committed with an error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_code_cell_installs_only_when_missing(name):
  first = _code_sources(_read(name))[0]
  tree = ast.parse(first)
  guards = [n for n in ast.walk(tree) if isinstance(n, ast.If)]
  # The pip call must sit under `if find_spec("onpo_jax") is None`, so CI never installs.
  assert any("find_spec" in ast.unparse(g.test) and "onpo_jax" in ast.unparse(g.test)
             and "pip" in ast.unparse(g) for g in guards), first
  pip_outside = [n for n in tree.body if not isinstance(n, ast.If) and "pip" in ast.unparse(n)
                 and not isinstance(n, ast.Assign)]
  assert not pip_outside, "pip must only run under the find_spec guard"
  assert "import onpo_jax" in first


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_cells_define_no_logic(name):
  for source in _code_sources(_read(name)):
    # IPython magics (`%pip`, `!cmd`) are not Python; the notebooks use none.
    tree = ast.parse(source)
    defs = [n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
    assert not defs, f"{name}: a cell defines {type(defs[0]).__name__}; put it in onpo_jax"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
  # The kernel inherits this environment. CPU only, offline, and one device as on a
  # Colab CPU runtime (conftest's 8 fake devices are for the in-process tests).
  monkeypatch.setenv("ONPO_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("ONPO_REAL_MODEL", "0")  # notebook 03: tiny local checkpoints, no download
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip())
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  # The notebooks write their work directories with tempfile: keep them under pytest's tmp_path.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  shutil.copy(COLAB / name, tmp_path / name)
  nb = nbformat.read(str(tmp_path / name), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  start = time.perf_counter()
  # Raises CellExecutionError (with the traceback of the failing cell) on any error.
  nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  seconds = time.perf_counter() - start
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # Every code cell ran (a silently skipped cell would have no execution count).
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "FAST=True" in text, "the parameter cell did not pick up ONPO_NOTEBOOK_FAST=1"
  print(f"{name}: executed in {seconds:.1f} s")
