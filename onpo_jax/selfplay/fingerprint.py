"""Identity of a parameter tree, to catch stale cached anchor log-probs.

Anchor log-probs are computed once per regression (docs/algorithm.md §3); the
anchor's fingerprint is taken before and checked after the regression, so a
change of the anchor while its cached log-probs are used stops the run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from onpo_jax.selfplay import roles


def _bits(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    width = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    x = jax.lax.bitcast_convert_type(x, width)
  return x.astype(jnp.uint32)


@jax.jit
def _add_leaf(out, x, index):
  """out + the two bit sums of leaf number `index`.

  One program per leaf shape and dtype (a model repeats a dozen shapes over its
  layers), not one program over every leaf, whose compile time grows with the
  number of leaves (seconds for a 30-layer model).
  """
  b = _bits(x).ravel()
  # Integer sums wrap exactly and do not depend on the reduction order, so the
  # value is identical on every mesh; a single changed bit changes the first.
  w = jnp.arange(1, b.size + 1, dtype=jnp.uint32) * (2 * index + 1)
  return out + jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * w, dtype=jnp.uint32)])


def _fingerprint_device(tree):
  out = jnp.zeros((2,), jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    out = _add_leaf(out, x, jnp.uint32(i))
  return out


def fingerprint(tree) -> np.ndarray:
  """Identity of a parameter tree computed on device: two uint32 bit sums (as int64).

  With u the leaf's bits (floats bit-cast to unsigned integers of their width,
  then all as uint32), flattened, and i the leaf's index in `jax.tree.leaves`:
  Σ_leaves Σ_j u_j and Σ_leaves Σ_j u_j·(j + 1)·(2i + 1), both modulo 2^32.

  Nothing is pulled to the host but the two sums, so it also works for trees
  sharded over several processes (gathered with `process_allgather`).
  """
  tree = roles.to_memory(tree, "device")  # offloaded trees are fingerprinted on device too
  return np.asarray(multihost_utils.process_allgather(_fingerprint_device(tree), tiled=True)
                    )[:2].astype(np.int64)
