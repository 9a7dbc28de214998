"""Per-device bytes of sharded arrays, parameter trees, optimizer states and KV caches.

Shapes alone: parameters from `nnx.eval_shape` of the decoder, optimizer
states from `jax.eval_shape(opt.init, params)`, the KV cache from
`jax.eval_shape(init_cache, ...)`. Each leaf's share follows the logical-axis
rules the run uses (`onpo_jax.models.sharding`) on a mesh given only by its
axis sizes; `onpo_jax.llm.memory` adds these up into a run's plan.

Per-device bytes of a leaf of shape s sharded by spec p over mesh sizes m:
  Π_d ceil(s_d / Π_{a ∈ p_d} m_a) · itemsize (the largest shard, as XLA pads).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from onpo_jax.infra import checks
from onpo_jax.models import sharding as sharding_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import KEY_CACHE_AXES, VALUE_CACHE_AXES, Decoder
from onpo_jax.models.decoder import init_cache

GIB = 1024 ** 3


def check_mesh_shape(mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """`mesh_shape` as a dict, or a ValueError naming the entry that is not an axis size >= 1."""
  if not isinstance(mesh_shape, Mapping) or not mesh_shape:
    raise ValueError(f"mesh_shape must be a non-empty mapping axis -> size, got {mesh_shape!r}")
  for axis, size in mesh_shape.items():
    if not checks.is_int(size, 1):
      raise ValueError(f"mesh_shape[{axis!r}] must be an int >= 1, got {size!r}")
  return dict(mesh_shape)


def shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec,
                mesh_shape: Mapping[str, int]) -> int:
  """Bytes of the largest shard of an array (module docstring formula).

  Args:
    shape: global array shape.
    dtype: array dtype.
    spec: PartitionSpec, one entry per dimension (or fewer: the rest replicated).
    mesh_shape: {mesh axis name: size}.

  Returns:
    Per-device bytes (int).

  Raises:
    ValueError: `spec` has more entries than `shape` has dimensions, or names a
      mesh axis that `mesh_shape` lacks.
  """
  mesh_shape = check_mesh_shape(mesh_shape)
  shape = tuple(int(d) for d in shape)
  if len(spec) > len(shape):
    raise ValueError(f"spec {spec} has {len(spec)} entries for a {len(shape)}-d shape {shape}")
  shard = list(shape)
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in mesh_shape:
        raise ValueError(f"spec {spec} names mesh axis {a!r}; mesh axes are {sorted(mesh_shape)}")
    shard[d] = -(-shard[d] // math.prod(mesh_shape[a] for a in axes))
  return math.prod(shard) * jnp.dtype(dtype).itemsize


def abstract_params(config: DecoderConfig, rules=sharding_lib.DEFAULT_RULES,
                    mesh_shape: Mapping[str, int] | None = None):
  """(params, specs): pure-dict trees of ShapeDtypeStruct and PartitionSpec.

  Args:
    config: the decoder's config (param_dtype sets the leaf dtypes).
    rules: logical -> mesh axis rules.
    mesh_shape: mesh sizes; axes that do not divide a dimension are skipped,
      exactly as `create_sharded_model` does.
  """
  # Tracing a 32-layer decoder takes seconds; plans reuse it (all inputs hashable).
  mesh_key = None if mesh_shape is None else tuple(sorted(dict(mesh_shape).items()))
  return _abstract_params(config, tuple(rules), mesh_key)


@functools.lru_cache(maxsize=16)
def _abstract_params(config, rules, mesh_key):
  mesh_shape = None if mesh_key is None else dict(mesh_key)
  model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state.to_pure_dict())

  def spec(v):
    value = v.get_value()
    names = v.get_metadata().get("out_sharding") or (None,) * value.ndim
    return sharding_lib.logical_to_spec(tuple(names), rules, mesh_shape, value.shape)

  specs = jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return params, specs.to_pure_dict()


def tree_bytes_per_device(tree, specs, mesh_shape: Mapping[str, int]) -> int:
  """Σ of `shard_bytes` over matching leaves of `tree` and `specs`."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"tree has {len(leaves)} leaves but specs has {len(spec_leaves)}")
  return sum(shard_bytes(x.shape, x.dtype, p, mesh_shape) for x, p in zip(leaves, spec_leaves))


def path_key(path) -> tuple:
  """A pytree path as a tuple of its dict keys, sequence indices and attribute names."""
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def specs_by_path(specs) -> dict[tuple, PartitionSpec]:
  """A specs tree's PartitionSpecs by their `path_key`."""
  return {path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}


def optimizer_bytes_per_device(opt, params, specs, mesh_shape: Mapping[str, int]) -> int:
  """Per-device bytes of `opt.init(params)`, from `jax.eval_shape` only.

  Optax states embed the parameter tree (Adam's mu and nu, `onpo_step`'s
  anchor copy, MultiSteps' accumulator), so a state leaf whose path ends with
  a parameter's path and has its shape is sharded like that parameter; other
  leaves (step counters) are counted as replicated.

  Args:
    opt: an optax GradientTransformation.
    params: pure-dict tree of ShapeDtypeStruct (`abstract_params`).
    specs: the matching tree of PartitionSpec.
    mesh_shape: mesh sizes.
  """
  state = jax.eval_shape(opt.init, params)
  param_spec = {}
  for (path, x), p in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))):
    param_spec[path_key(path)] = (tuple(x.shape), p)
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = path_key(path)
    spec = PartitionSpec()
    for start in range(len(key)):
      hit = param_spec.get(key[start:])
      if hit is not None and hit[0] == tuple(x.shape):
        spec = hit[1]
        break
    total += shard_bytes(x.shape, x.dtype, spec, mesh_shape)
  return total


def kv_cache_bytes_per_device(config: DecoderConfig, batch_size: int, max_length: int,
                              mesh_shape: Mapping[str, int], rules=sharding_lib.DEFAULT_RULES,
                              dtype=None) -> int:
  """Per-device bytes of one KV cache of `batch_size` rows and `max_length` slots."""
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
  cache = jax.eval_shape(lambda: init_cache(config, batch_size, max_length, dtype))
  leaves = [(KEY_CACHE_AXES, x) for x in cache.k] + [(VALUE_CACHE_AXES, x) for x in cache.v]
  leaves += [(("batch", "length"), cache.mask), ((), cache.index)]
  total = 0
  for names, x in leaves:
    spec = sharding_lib.logical_to_spec(names, rules, dict(mesh_shape), x.shape)
    total += shard_bytes(x.shape, x.dtype, spec, mesh_shape)
  return total
