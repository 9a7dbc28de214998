"""Sharded model construction: meshes, parameter / cache shardings, sharded init.

The logical-name rules themselves (`DEFAULT_RULES`, `logical_to_spec`) and the
activation constraints (`activation_sharding`, `constrain`) live in
`partitioning`, which `layers` and `decoder` import; they are re-exported here
so `sharding` stays the one module callers need. This module imports `decoder`
(to build sharded Decoders); nothing it imports imports it back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from onpo_jax.models.decoder import KEY_CACHE_AXES, VALUE_CACHE_AXES, Decoder
from onpo_jax.models.partitioning import activation_sharding as activation_sharding
from onpo_jax.models.partitioning import axes_tuple
from onpo_jax.models.partitioning import batch_shards as batch_shards
from onpo_jax.models.partitioning import constrain as constrain
from onpo_jax.models.partitioning import DEFAULT_RULES as DEFAULT_RULES
from onpo_jax.models.partitioning import logical_to_spec as logical_to_spec
from onpo_jax.models.partitioning import MESH_AXES as MESH_AXES


def make_mesh(shape: Sequence[int] = (1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (GSPMD propagation between our constraints)."""
  if len(shape) != len(axis_names):
    raise ValueError(
        f"shape: expected {len(axis_names)} entries for axes {axis_names}, "
        f"got {tuple(shape)}")
  kwargs = {} if devices is None else {"devices": devices}
  return jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names), **kwargs)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes(state) -> Any:
  """Tree of the logical axis names of each Variable in `state`."""
  def names(v):
    n = v.get_metadata().get("out_sharding")
    if n is None:
      return (None,) * len(v.get_value().shape)
    return tuple(n)
  return jax.tree.map(names, state, is_leaf=_is_var)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an (abstract or concrete) nnx state, same structure.

  Args:
    state: nnx.State (e.g. from nnx.split of an eval_shape'd model).
    mesh: target mesh.
    rules: (logical, mesh_axis) pairs.

  Returns:
    A state-shaped tree whose Variables hold NamedShardings, usable as
    jit out_shardings or with jax.device_put.
  """
  mesh_shape = dict(mesh.shape)

  def one(v):
    value = v.get_value()
    names = v.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    spec = logical_to_spec(tuple(names), rules, mesh_shape, value.shape)
    return v.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=_is_var)


def create_sharded_model(config, mesh: jax.sharding.Mesh | None,
                         rules=DEFAULT_RULES, rngs: nnx.Rngs | int = 0):
  """Builds a Decoder whose parameters are created already sharded.

  The shapes come from `nnx.eval_shape` (nothing allocated), the shardings
  from the logical names and `rules`, and the parameters from one
  `jax.jit(init, out_shardings=...)`, so no device ever holds a full copy.

  Args:
    config: DecoderConfig.
    mesh: target mesh; None builds on the default device (still one jitted
      init, much faster than eager op-by-op initialisation).
    rules: (logical, mesh_axis) pairs.
    rngs: nnx.Rngs or an int seed for the parameter initialisers.

  Returns:
    The Decoder, its parameters sharded over `mesh`.
  """
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  key = rngs.params()

  def init(key):
    model = Decoder(config, rngs=nnx.Rngs(params=key))
    return nnx.split(model)[1]

  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
  graphdef, abstract_state = nnx.split(abstract)
  if mesh is None:
    state = jax.jit(init)(key)
  else:
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(key)
  return nnx.merge(graphdef, state)


class ParamBytes(NamedTuple):
  """Parameter footprint: totals and the largest per-device share."""
  num_params: int
  total_bytes: int
  bytes_per_device: int


def param_bytes_per_device(config, mesh, rules=DEFAULT_RULES) -> ParamBytes:
  """Parameter bytes held by each device, without allocating anything.

  Args:
    config: DecoderConfig (param_dtype sets the bytes per parameter).
    mesh: a jax Mesh or AbstractMesh (only its axis sizes are read, so a mesh
      bigger than the local machine can be planned).
    rules: (logical, mesh_axis) pairs.

  Returns:
    ParamBytes(num_params, total_bytes, bytes_per_device), where
    bytes_per_device is the largest per-device share (shards are ceil-sized).
  """
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
  state = nnx.state(abstract, nnx.Param)
  mesh_shape = dict(mesh.shape)
  num = total = per_device = 0
  for v in jax.tree.leaves(state, is_leaf=_is_var):
    value = v.get_value()
    names = v.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    spec = logical_to_spec(tuple(names), rules, mesh_shape, value.shape)
    shard = list(value.shape)
    for d, axes in enumerate(spec):
      size = math.prod(mesh_shape[a] for a in axes_tuple(axes))
      shard[d] = -(-shard[d] // size)
    itemsize = jnp.dtype(value.dtype).itemsize
    num += math.prod(value.shape)
    total += math.prod(value.shape) * itemsize
    per_device += math.prod(shard) * itemsize
  return ParamBytes(num, total, per_device)


def cache_shardings(cache, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a decoder KVCache: batch and kv heads split.

  Args:
    cache: a KVCache (or one of ShapeDtypeStructs, e.g. from jax.eval_shape).
    mesh: target mesh.
    rules: (logical, mesh_axis) pairs.

  Returns:
    A KVCache of NamedShardings (usable as jit in/out_shardings or with
    jax.device_put).
  """
  mesh_shape = dict(mesh.shape)

  def named(x, names):
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh_shape,
                                               x.shape))

  return type(cache)(
      k=tuple(named(x, KEY_CACHE_AXES) for x in cache.k),
      v=tuple(named(x, VALUE_CACHE_AXES) for x in cache.v),
      mask=named(cache.mask, ("batch", "length")),
      index=NamedSharding(mesh, PartitionSpec()))
