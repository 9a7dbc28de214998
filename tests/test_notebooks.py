"""The Colab tutorials in colab/ run headlessly, start with the install cell, and stay small.

Each notebook is executed top to bottom (`notebook_runs.execute`: nbclient,
ONPO_NOTEBOOK_FAST=1, any cell error fails the test); notebook 03 in
tests/test_smollm2.py, whose checks read its run. The static checks
keep the committed files honest: they match colab/build_notebooks.py, install
the package in their first code cell without touching the network when it is
already importable, define no functions or classes of their own (all logic
lives in onpo_jax), and have small saved outputs.
"""

import ast
import importlib.util
import pathlib

import nbformat
import notebook_runs
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_tabular_onpo.ipynb", "02_toy_llm_onpo.ipynb", "03_real_model.ipynb")
# Notebook 03's CPU mode is the SmolLM2 `:tiny` job: tests/test_smollm2.py executes it
# once and checks that run's outputs, so the real model's job runs once in CI.
EXECUTED_HERE = NOTEBOOKS[:2]
# Committed outputs are meant to be glanced at on GitHub, not to carry data.
MAX_NOTEBOOK_BYTES = 300 * 1024


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
@pytest.mark.parametrize("name", EXECUTED_HERE)
def test_notebook_executes(name, tmp_path):
  nb, seconds = notebook_runs.execute(name, tmp_path)
  notebook_runs.check_ran_fully(nb)
  print(f"{name}: executed in {seconds:.1f} s")
