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
"""

from __future__ import annotations

import contextlib
import os
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

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree, meta: dict) -> None:
    """Saves `tree` (any pytree of arrays) and JSON-serialisable `meta` as `step`."""
    arrays, _ = _leaves(tree)
    with _quiet():
      self._manager.save(int(step), args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(dict(meta))))
      self._manager.wait_until_finished()

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
