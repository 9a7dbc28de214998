"""A small orbax wrapper: save/restore an arbitrary pytree of arrays plus JSON metadata.

The pytree (policies, auxiliary policy, optimizer and `onpo_step` states, RNG key
data, counters) is flattened to a dict of leaves (jax.Arrays are handed to orbax
as they are, so arrays sharded over several processes are saved and restored by
every process), so structures orbax does not
know (e.g. `nnx.State` with `Param` nodes, optax NamedTuples) round-trip through
a template built by the caller: `restore(step, template)` unflattens the saved
leaves with `template`'s tree structure and checks every shape and dtype.
Orbax writes each step into a temporary directory and renames it when complete,
so a run killed at any moment (SIGKILL) leaves only complete checkpoints; saving
is synchronous, so a step is on disk when `save` returns.

A complete checkpoint can still be damaged later (a truncated or flipped file,
a deleted one). After each save the main process writes `CHECKSUM_FILE` into
the step directory: the size and CRC-32 of every file. `verify` compares them;
`latest_valid_step` skips damaged steps (with a warning naming the step and the
file) and moves them aside to `<directory>_corrupt/`, so a resume never reads
damaged state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


@contextlib.contextmanager
def _quiet():
  """Orbax logs every save at INFO; a run saves after every round, so mute it."""
  old = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(old)


def _leaves(tree) -> tuple[dict[str, Any], Any]:
  """Numbered leaves for orbax: jax.Arrays as they are, anything else as numpy.

  Orbax writes a (possibly multi-process sharded) jax.Array from every process
  that holds a shard; `np.asarray` would need every shard on one host.
  """
  leaves, treedef = jax.tree.flatten(tree)
  return {f"{i:05d}": x if isinstance(x, jax.Array) else np.asarray(x)
          for i, x in enumerate(leaves)}, treedef


CHECKSUM_FILE = "onpo_checksums.json"
# How tensorstore names the errno of a failed write inside its error text.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def file_sums(folder: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file under `folder` but the checksum file."""
  sums = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel.startswith(CHECKSUM_FILE):
        continue
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
          crc = zlib.crc32(chunk, crc)
      sums[rel] = [os.path.getsize(path), crc]
  return sums


def _abstract(x) -> jax.ShapeDtypeStruct:
  """Restore target of one template leaf: jax.Arrays keep their sharding."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


class Checkpointer:
  """Numbered checkpoints of (pytree, metadata) in `directory`.

  Args:
    directory: where step directories live (created if missing).
    max_to_keep: most recent checkpoints kept.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    os.makedirs(self.directory, exist_ok=True)
    with _quiet():
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=False,
                                               create=True))

  def latest_step(self) -> int | None:
    """Newest complete step, or None when there is none."""
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def verify(self, step: int) -> str | None:
    """None when `step`'s files match their checksums, else what is wrong.

    A step saved without a checksum file (killed between orbax's rename and the
    checksum write) is accepted: orbax's rename already made it complete.
    """
    folder = self.step_dir(step)
    path = os.path.join(folder, CHECKSUM_FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        want = json.load(f)
    except (OSError, ValueError) as e:
      return f"{CHECKSUM_FILE} is unreadable ({e})"
    got = file_sums(folder)
    for name in sorted(set(want) | set(got)):
      if name not in got:
        return f"{name} is missing"
      if name not in want:
        return f"{name} was not part of the saved checkpoint"
      if got[name] != want[name]:
        size, crc = want[name]
        return (f"{name} is damaged ({got[name][0]} bytes, crc32 {got[name][1]:08x}; saved "
                f"{size} bytes, crc32 {crc:08x})")
    return None

  def latest_valid_step(self, *, move_aside: bool = True) -> int | None:
    """Newest step whose files match their checksums; None when there are no steps.

    Damaged newer steps are reported with a warning and, with `move_aside`,
    moved to `<directory>_corrupt/` (a later save may then reuse their number).

    Raises:
      RuntimeError: every step is damaged; the message lists them.
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      problem = self.verify(step)
      if problem is None:
        break
      problems.append((step, problem))
      logging.warning("checkpoint step %d in %s is corrupt (%s); falling back to an earlier one",
                      step, self.directory, problem)
    else:
      step = None
    if problems and move_aside:
      aside = self.directory + "_corrupt"
      os.makedirs(aside, exist_ok=True)
      for bad, _ in problems:
        shutil.move(self.step_dir(bad), os.path.join(aside, f"{bad}-{int(time.time())}"))
      self.reload()
    if step is None and problems:
      raise RuntimeError(f"no valid checkpoint in {self.directory}: " + "; ".join(
          f"step {s}: {p}" for s, p in problems) + ". Use a new workdir to start afresh.")
    return step

  def reload(self) -> None:
    """Re-lists the steps on disk (after another process moved some)."""
    self._manager.reload()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree, meta: dict) -> None:
    """Saves `tree` (any pytree of arrays) and JSON-serialisable `meta` as `step`.

    Raises:
      OSError: the files could not be written. Orbax's array writer
        (tensorstore) reports a full disk as a ValueError carrying
        `os_error_code='28'`; that is raised as the OSError it stands for.
    """
    arrays, _ = _leaves(tree)
    try:
      with _quiet():
        self._manager.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(dict(meta))))
        self._manager.wait_until_finished()
    except ValueError as e:
      code = _OS_ERROR_CODE.search(str(e))
      if code is None:
        raise
      raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e
    if jax.process_index() == 0:
      folder = self.step_dir(step)
      tmp = os.path.join(folder, CHECKSUM_FILE + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(file_sums(folder), f, indent=0, sort_keys=True)
      os.replace(tmp, os.path.join(folder, CHECKSUM_FILE))

  def restore_meta(self, step: int) -> dict:
    """Only the metadata of `step`."""
    with _quiet():
      out = self._manager.restore(int(step),
                                  args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, step: int, template) -> tuple[Any, dict]:
    """(tree, meta) of `step`, the tree shaped like `template`.

    A leaf whose template is a jax.Array comes back as a jax.Array with the
    template's sharding (across processes too); any other leaf as a writable
    numpy copy (callers update counters in place).

    Raises:
      ValueError: if the saved leaves do not match `template` (count, shape, dtype).
    """
    template_arrays, treedef = _leaves(template)
    abstract = {k: _abstract(v) for k, v in template_arrays.items()}
    with _quiet():
      out = self._manager.restore(int(step), args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    arrays = out["arrays"]
    if set(arrays) != set(template_arrays):
      raise ValueError(f"checkpoint step {step} in {self.directory} has {len(arrays)} arrays; "
                       f"the template has {len(template_arrays)}")
    leaves = []
    for k in sorted(template_arrays):
      got, want = arrays[k], abstract[k]
      if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise ValueError(f"checkpoint step {step}: leaf {k} is {tuple(got.shape)} {got.dtype}, "
                         f"expected {tuple(want.shape)} {want.dtype}")
      leaves.append(got if isinstance(template_arrays[k], jax.Array) else np.array(got))
    return jax.tree.unflatten(treedef, leaves), dict(out["meta"])

  def close(self) -> None:
    with _quiet():
      self._manager.close()
