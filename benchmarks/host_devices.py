"""`--cpu-devices`: the JAX side of a CPU benchmark split over several XLA host devices.

XLA:CPU runs a jitted call on one device with its matmuls threaded over the
cores. With `--xla_force_host_platform_device_count=N` the host instead holds N
devices; a batch spread over them (mesh axis 'data', weights replicated)
gives each device its own rows, so no matmul waits for a share computed on
another core, at the price of every per-call cost not split by rows done N
times (the optimizer's update of replicated weights, the gradients'
all-reduce). Whether that pays depends on the call (benchmarks/README.md,
"`sampler.py --cpu-devices`"). The torch peer is untouched: it keeps
`--threads` threads in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onpo_jax.models import sharding


def add_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cpu-devices", type=int, default=1,
                 help="JAX side only, CPU only: split the host into this many XLA devices and "
                      "spread each batch over them (mesh axis 'data', weights replicated); "
                      "the batches must divide by it. 1: one device, its matmuls threaded")


def check(args) -> None:
  """Raises ValueError naming the flag when a batch that runs does not divide by --cpu-devices."""
  n = args.cpu_devices
  if n < 1:
    raise ValueError(f"--cpu-devices: expected at least 1, got {n}")
  batches = [("--batch", args.batch)]
  if not getattr(args, "skip_train", False):
    batches.append(("--train-batch", args.train_batch))
  for flag, size in batches:
    if size % n:
      raise ValueError(f"--cpu-devices {n}: {flag} {size} must be a multiple of it")


def request(n: int) -> None:
  """Asks XLA for n host devices; read when the CPU backend starts, so call it before."""
  if n > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}")


def mesh(args) -> jax.sharding.Mesh | None:
  """The (data=N, 1, 1) mesh of the first N devices with --cpu-devices N > 1, else None."""
  n = getattr(args, "cpu_devices", 1)
  if n <= 1:
    return None
  devices = jax.devices()
  if devices[0].platform != "cpu" or len(devices) < n:
    raise ValueError(f"--cpu-devices {n}: needs {n} CPU devices, JAX has {len(devices)} "
                     f"{devices[0].platform} device(s) (the flag is for the CPU backend, and "
                     "must be set before JAX starts)")
  return sharding.make_mesh((n, 1, 1), devices=devices[:n])


def on_mesh(m: jax.sharding.Mesh | None):
  """The context in which the decoder's activations follow `m` (nothing with None)."""
  return contextlib.nullcontext() if m is None else sharding.activation_sharding(m)


def replicate(model: nnx.Module, m: jax.sharding.Mesh | None) -> nnx.Module:
  """Puts a copy of every weight of `model` on each device of `m` (in place); returns it."""
  if m is not None:
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(m, P())))
  return model


def batch_sharding(m: jax.sharding.Mesh | None) -> NamedSharding | None:
  """Rows spread over `m`'s 'data' axis (None: the default device)."""
  return None if m is None else NamedSharding(m, P("data"))
