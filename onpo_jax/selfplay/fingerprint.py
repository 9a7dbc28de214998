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
def _fingerprint_device(tree):
  out = jnp.zeros((2,), jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    b = _bits(x).ravel()
    # Integer sums wrap exactly and do not depend on the reduction order, so the
    # value is identical on every mesh; a single changed bit changes the first.
    w = jnp.arange(1, b.size + 1, dtype=jnp.uint32) * jnp.uint32(2 * i + 1)
    out = out + jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * w, dtype=jnp.uint32)])
  return out


def fingerprint(tree) -> np.ndarray:
  """Identity of a parameter tree computed on device: two uint32 bit sums (as int64).

  Nothing is pulled to the host but the two sums, so it also works for trees
  sharded over several processes (gathered with `process_allgather`).
  """
  tree = roles.to_memory(tree, "device")  # offloaded trees are fingerprinted on device too
  return np.asarray(multihost_utils.process_allgather(_fingerprint_device(tree), tiled=True)
                    )[:2].astype(np.int64)
