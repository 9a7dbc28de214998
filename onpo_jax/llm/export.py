"""Host copies of sharded arrays and the policy's export as a Hugging Face directory.

Both work on one host or many: a multi-host sharded array is gathered with
`multihost_utils.process_allgather`, and every process takes part in an export
while only process 0 writes files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils


def host_gather(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as a full numpy copy on every process.

  Args:
    x: a jax.Array (any sharding) or anything `np.asarray` accepts.

  Returns:
    The whole array as numpy, identical on every process.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def export_policy(graphdef, params, path: str, *, dtype: str, max_shard_size, tokenizer=None):
  """Writes the policy as a HF directory (process 0 writes; every process must call).

  Each tensor is cast to `dtype` on device before it is gathered to the host,
  one tensor at a time.

  Args:
    graphdef: the policy's graphdef.
    params: its parameter state (any sharding, any number of processes).
    path: output directory.
    dtype: dtype of the written tensors (and of config.json's torch_dtype).
    max_shard_size: safetensors shard size, e.g. "5GB".
    tokenizer: written next to the weights when given.

  Returns:
    `path`.
  """
  from onpo_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  from onpo_jax.models.decoder import Decoder  # pylint: disable=g-import-not-at-top
  cfg = nnx.merge(graphdef, params).config.replace(param_dtype=dtype, remat=False)
  host = jax.tree.map(lambda x: host_gather(x.astype(jnp.dtype(dtype))), params)
  if jax.process_index() == 0:
    export_graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0))))[0]
    hf_io.save_hf_checkpoint(nnx.merge(export_graphdef, host), path, max_shard_size=max_shard_size)
    if tokenizer is not None:
      tokenizer.save_pretrained(path)
  multihost_utils.sync_global_devices(f"export {path}")
  return path
