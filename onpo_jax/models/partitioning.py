"""Logical axis names -> mesh axes, and activation constraints by logical name.

Every parameter of the decoder carries logical axis names in its
`out_sharding` metadata ('vocab', 'embed', 'mlp', 'heads', 'kv_heads',
'head_dim', 'norm'); activations are constrained with ('batch', 'length', ...).
The mapping to mesh axes ('data', 'fsdp', 'tensor') is config data: a tuple of
(logical_name, mesh_axis) pairs, where mesh_axis is a mesh axis name, a tuple
of names, or None (replicated). A logical name may appear several times; the
first candidate whose mesh axes are unused in the same spec and divide the
dimension wins, so one rule set serves every tensor shape.

This module is the bottom of the models package: `layers` and `decoder` use
`constrain`, and `sharding` (which builds sharded Decoders, so imports
`decoder`) re-exports the rest. It imports nothing from `onpo_jax`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over 'fsdp' on the embed dimension, tensor parallelism on heads / mlp /
# vocab, data parallelism of activations over ('data', 'fsdp').
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def axes_tuple(mesh_axis) -> tuple[str, ...]:
  """A rule's mesh_axis (a name, a tuple of names, or None) as a tuple of names."""
  if mesh_axis is None:
    return ()
  if isinstance(mesh_axis, str):
    return (mesh_axis,)
  return tuple(mesh_axis)


def logical_to_spec(names: Sequence[str | None], rules,
                    mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  Args:
    names: one logical name (or None) per array dimension.
    rules: tuple of (logical_name, mesh_axis) pairs.
    mesh_shape: {mesh axis: size}; when given, axes missing from the mesh are
      skipped and, with `shape`, axes that do not divide the dim are skipped.
    shape: the array shape, same length as names.

  Returns:
    The PartitionSpec; never uses a mesh axis twice.
  """
  if shape is not None and len(shape) != len(names):
    raise ValueError(
        f"names: expected {len(shape)} logical names for shape {tuple(shape)},"
        f" got {tuple(names)}")
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    chosen = None
    for logical, mesh_axis in rules:
      if name is None or logical != name:
        continue
      axes = axes_tuple(mesh_axis)
      if mesh_shape is not None:
        axes = tuple(a for a in axes if a in mesh_shape)
      if any(a in used for a in axes):
        continue
      if mesh_shape is not None and shape is not None and axes:
        size = math.prod(mesh_shape[a] for a in axes)
        if shape[dim] % size:
          continue
      chosen = axes
      break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


# Rules for activation constraints; set by `activation_sharding`.
_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar(
    "onpo_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Context in which decoder activations are constrained to `mesh`.

  Tracing (jit) must happen inside the context; outside it `constrain` is a
  no-op, so single-device code pays nothing.
  """
  token = _ACTIVE_RULES.set((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE_RULES.reset(token)


def active_sharding() -> tuple[jax.sharding.Mesh, tuple] | None:
  """(mesh, rules) of the enclosing `activation_sharding`, or None."""
  return _ACTIVE_RULES.get()


def constrain(x: jnp.ndarray, names: Sequence[str | None]) -> jnp.ndarray:
  """with_sharding_constraint by logical names, when a context is active."""
  active = active_sharding()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(names, rules, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_shards() -> int:
  """Devices over which the enclosing `activation_sharding` splits the batch (1: none)."""
  active = active_sharding()
  if active is None:
    return 1
  mesh, rules = active
  spec = logical_to_spec(("batch",), rules, dict(mesh.shape))
  return math.prod(mesh.shape[a] for a in axes_tuple(spec[0]))
