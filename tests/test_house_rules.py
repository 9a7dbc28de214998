"""House rules the repo enforces on itself.

* `ruff check` (config in `ruff.toml`: one quote style, no unused imports or
  undefined names, syntax errors) is clean on the whole repo.
* The import graph of `onpo_jax` has no circle. The graph is read statically
  from the source (ast), so an import inside a function counts as an edge just
  like one at the top of a module: a lazy import hides a circle from Python's
  import machinery, not from the design. Only `if TYPE_CHECKING:` blocks, which
  never run, are skipped.
* `import onpo_jax` stays light: it imports neither tensorflow_datasets nor
  transformers nor torch (those belong to the LLM jobs and the tests).
* Nothing unsafe at run time: the package loads no pickle (no pickle-family
  import, `torch.load`, `allow_pickle`), runs no remote code
  (`trust_remote_code`) and reaches no network (no HTTP client or Hub download
  import, every `from_pretrained` with `local_files_only=True`).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "onpo_jax"


# ---------------------------------------------------------------------- ruff


def test_ruff_check_is_clean():
  # No skip when ruff is missing: a house rule that silently stops being checked is no rule.
  proc = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", "."],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, (
      "`python -m ruff check .` failed (config: ruff.toml; ruff is pinned in the `test` extra,"
      f" `pip install -e .[test]`; `ruff check --fix FILE` fixes most):\n{proc.stdout}{proc.stderr}")


# -------------------------------------------------------------- import graph


def _package_modules(root: str = REPO, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: file path} for every module of `package`."""
  modules = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    rel = os.path.relpath(dirpath, root).split(os.sep)
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      parts = rel if name == "__init__.py" else rel + [name[:-3]]
      modules[".".join(parts)] = os.path.join(dirpath, name)
  return modules


def _is_type_checking(test: ast.expr) -> bool:
  return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
          or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
  """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:`."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      stack.extend(node.orelse)
      continue
    stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of dotted `name` that is one of our modules."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def _edges(module: str, path: str, modules) -> dict[str, int]:
  """{imported module of ours: line of the first such import} for one module."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_pkg = os.path.basename(path) == "__init__.py"
  out: dict[str, int] = {}

  def add(target, lineno):
    if target is not None and target != module:
      out[target] = min(out.get(target, lineno), lineno)

  for node in _import_nodes(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(_resolve(alias.name, modules), node.lineno)
      continue
    if node.level:  # relative: `from . import x`, `from ..pkg import y`
      base = module.split(".") if is_pkg else module.split(".")[:-1]
      base = base[:len(base) - (node.level - 1)]
      source = ".".join(base + ([node.module] if node.module else []))
    else:
      source = node.module
    for alias in node.names:
      # `from pkg import mod` imports the submodule; `from mod import name` the module.
      sub = f"{source}.{alias.name}"
      add(sub if sub in modules else _resolve(source, modules), node.lineno)
  return out


def import_graph(root: str = REPO, package: str = PACKAGE) -> dict[str, dict[str, int]]:
  modules = _package_modules(root, package)
  return {m: _edges(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """One circle per strongly connected component that has one (Tarjan + a path)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  on_stack: set[str] = set()
  stack: list[str] = []
  components: list[list[str]] = []

  def strongconnect(v):  # iterative would be overkill: the graph is ~60 modules
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        components.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)

  cycles = []
  for comp in components:
    members = set(comp)
    start = comp[0]
    # Breadth-first search for the shortest path start -> ... -> start inside the component.
    parent = {start: None}
    frontier = [start]
    closing = None
    while frontier and closing is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v]):
          if w == start:
            closing = v
            break
          if w in members and w not in parent:
            parent[w] = v
            nxt.append(w)
        if closing is not None:
          break
      frontier = nxt
    path = [closing]
    while parent[path[-1]] is not None:
      path.append(parent[path[-1]])
    cycles.append(list(reversed(path)) + [start])
  return cycles


def _describe(cycle, graph) -> str:
  return "\n    ".join(f"{a} -> {b}  (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_find_cycles_sees_lazy_and_package_edges(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from pkg.sub import b\n")
  (pkg / "a.py").write_text("import os\n\ndef f():\n  from pkg.sub import b\n  return b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from .. import c\n")
  (pkg / "c.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import a\n"
      "from pkg.a import f\n")
  graph = import_graph(str(tmp_path), "pkg")
  assert graph["pkg"] == {"pkg.sub.b": 1}
  assert graph["pkg.a"] == {"pkg.sub.b": 4}
  assert graph["pkg.sub.b"] == {"pkg.c": 1}
  assert graph["pkg.c"] == {"pkg.a": 4}
  assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
  (pkg / "c.py").write_text("X = 1\n")
  assert find_cycles(import_graph(str(tmp_path), "pkg")) == []


def test_onpo_jax_import_graph_has_no_circle():
  graph = import_graph()
  assert len(graph) > 20 and "onpo_jax.models.decoder" in graph
  cycles = find_cycles(graph)
  assert not cycles, "import circles in onpo_jax (lazy imports count):\n  " + "\n  ".join(
      _describe(c, graph) for c in cycles)


# ----------------------------------------------------------- light top level


def test_import_onpo_jax_is_light():
  heavy = ("tensorflow_datasets", "tensorflow", "transformers", "torch")
  code = ("import sys, onpo_jax\n"
          f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]", f"`import onpo_jax` imported {proc.stdout.strip()}"


# ------------------------------------------------------- nothing unsafe at run time

# Modules whose import in the package would load pickles or reach the network.
UNSAFE_MODULES = ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "urllib.request", "http.client", "requests", "httpx", "aiohttp", "ftplib",
                  "huggingface_hub")
# Calls that do either, whatever they are imported as.
UNSAFE_CALLS = ("torch.load", "hf_hub_download", "snapshot_download", "urlopen",
                "create_connection")


def _unsafe_name(name: str) -> bool:
  return any(name == c or name.endswith("." + c) for c in UNSAFE_CALLS)


def _unsafe_module(module: str) -> bool:
  return module in UNSAFE_MODULES or module.split(".")[0] in UNSAFE_MODULES


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
  """Each pickle load, remote-code load or network access in `source`, as 'line: what'."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    line = getattr(node, "lineno", 0)
    if isinstance(node, ast.Import):
      found += [f"{line}: import {a.name}" for a in node.names if _unsafe_module(a.name)]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if _unsafe_module(node.module) or any(
          _unsafe_name(f"{node.module}.{a.name}") or _unsafe_name(a.name) for a in node.names):
        found.append(f"{line}: from {node.module} import ...")
    elif isinstance(node, ast.Call):
      name = ast.unparse(node.func)
      if _unsafe_name(name):
        found.append(f"{line}: {name}()")
      kw = {k.arg: k.value for k in node.keywords if k.arg}
      if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                            and kw["trust_remote_code"].value is False):
        found.append(f"{line}: trust_remote_code")
      if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                       and kw["allow_pickle"].value is False):
        found.append(f"{line}: allow_pickle")
      # Hub loaders download whatever is not local unless told not to.
      if name.endswith("from_pretrained") and not (
          isinstance(kw.get("local_files_only"), ast.Constant)
          and kw["local_files_only"].value is True):
        found.append(f"{line}: {name}() without local_files_only=True")
  return found


def test_unsafe_uses_finds_each_kind():
  source = """
import pickle
from urllib.request import urlopen
from huggingface_hub import snapshot_download
import torch
torch.load("x.pt")
np.load("x.npy", allow_pickle=True)
transformers.AutoModel.from_pretrained("x", trust_remote_code=True, local_files_only=True)
transformers.AutoTokenizer.from_pretrained("org/name")
transformers.AutoTokenizer.from_pretrained("dir", local_files_only=True)
np.load("y.npy")
"""
  assert unsafe_uses(source) == [
      "2: import pickle", "3: from urllib.request import ...",
      "4: from huggingface_hub import ...", "6: torch.load()", "7: allow_pickle",
      "8: trust_remote_code",
      "9: transformers.AutoTokenizer.from_pretrained() without local_files_only=True"]


def test_package_loads_no_pickle_no_remote_code_and_reaches_no_network():
  found = []
  for root, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path, encoding="utf-8") as f:
          found += [f"{os.path.relpath(path, REPO)}:{u}" for u in unsafe_uses(f.read(), path)]
  assert not found, "unsafe at run time:\n  " + "\n  ".join(found)
