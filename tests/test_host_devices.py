"""benchmarks/host_devices.py: the JAX side of a CPU benchmark on several host devices."""

import argparse
import tempfile

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from benchmarks import host_devices
from benchmarks import sampler
from benchmarks import train_step
from benchmarks import weights

_TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "64", "--vocab", "96", "--train-batch", "2", "--train-len", "8",
         "--batch", "4", "--prompt-len", "6", "--new-tokens", "3", "--repeats", "1",
         "--host-malloc", "default"]  # 'hugepages' would restart pytest's process


@pytest.fixture(scope="module")
def tiny_model():
  args = sampler.parse_args(_TINY)
  with tempfile.TemporaryDirectory() as workdir:
    weights.write_checkpoint(args, workdir)
    yield args, lambda: weights.load_jax_model(args, workdir)


def test_the_mesh_spreads_rows_and_replicates_every_weight(tiny_model):
  args, load = tiny_model
  assert host_devices.mesh(args) is None  # --cpu-devices 1: the default device, as before
  mesh = host_devices.mesh(argparse.Namespace(cpu_devices=2))
  assert mesh.shape == {"data": 2, "fsdp": 1, "tensor": 1}
  assert list(mesh.devices.flat) == jax.devices()[:2]
  model = host_devices.replicate(load(), mesh)
  for leaf in jax.tree.leaves(nnx.state(model)):
    assert leaf.sharding.device_set == set(mesh.devices.flat) and leaf.sharding.spec == P()
  rows = jax.device_put(np.zeros((4, 6), np.int32), host_devices.batch_sharding(mesh))
  assert sorted(s.index[0] for s in rows.addressable_shards) == [slice(0, 2), slice(2, 4)]


def test_the_train_step_on_two_devices_is_the_step_on_one(tiny_model):
  """Same loss and gradients (SGD with rate 1: new weights = weights - gradients); the
  flop count is the devices' sum, so at least one device's."""
  args, load = tiny_model
  tokens, attn, resp = train_step.train_batch(args, 96, np.random.default_rng(0))
  mesh = host_devices.mesh(argparse.Namespace(cpu_devices=2))
  results = []
  for m in (None, mesh):
    graphdef, params = nnx.split(host_devices.replicate(load(), m))
    tx = optax.sgd(1.0)
    with host_devices.on_mesh(m):
      batch = [jax.device_put(x, host_devices.batch_sharding(m))
               for x in (np.asarray(tokens, np.int32), attn, resp)]
      step = train_step.make_step(graphdef, tx, False, 1)
      params, _, loss = step(params, tx.init(params), *batch)
    results.append((float(loss), jax.tree.map(np.asarray, params)))
  (loss_one, after_one), (loss_two, after_two) = results
  # float32: the two devices' row sums are added in another order.
  assert loss_two == pytest.approx(loss_one, rel=1e-6)
  for a, b in zip(jax.tree.leaves(after_one), jax.tree.leaves(after_two)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  flops, meshes_seen_after = [], []
  for m in (None, mesh):
    model = host_devices.replicate(load(), m)  # loaded outside the mesh's context
    flops.append(train_step.jax_train_timing(
        model, tokens, attn, resp, False, 1, 1, mesh=m,
        after=lambda _: meshes_seen_after.append(jax.sharding.get_abstract_mesh().empty))[1])
  assert flops[0] <= flops[1] < 1.2 * flops[0]  # the replicated update counts twice
  # A GEMM probe in `after` must run on one device, not replicated over the mesh.
  assert meshes_seen_after == [True, True]


def test_bad_device_counts_are_refused_before_any_work(capsys):
  with pytest.raises(SystemExit):
    sampler.parse_args(_TINY + ["--cpu-devices", "3"])
  assert "--cpu-devices 3: --batch 4 must be a multiple of it" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sampler.parse_args(_TINY + ["--cpu-devices", "0"])
  assert "--cpu-devices: expected at least 1, got 0" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sampler.parse_args(_TINY + ["--batch", "6", "--cpu-devices", "3"])  # train batch 2
  assert "--cpu-devices 3: --train-batch 2 must be a multiple of it" in capsys.readouterr().err
  # Without the train step its batch does not matter.
  assert sampler.parse_args(_TINY + ["--batch", "6", "--cpu-devices", "3",
                                     "--skip-train"]).cpu_devices == 3
  with pytest.raises(ValueError, match="--cpu-devices 16: needs 16 CPU devices, JAX has 8"):
    host_devices.mesh(argparse.Namespace(cpu_devices=16))


def test_a_run_on_two_devices_samples_and_trains(capsys, monkeypatch):
  """The sampler's samples come back spread over both devices, half the rows on each."""
  spreads = []

  class Recording(sampler.sampler_lib.Sampler):
    def __call__(self, *args, **kwargs):
      out = super().__call__(*args, **kwargs)
      spreads.append(sorted((s.device.id, s.data.shape[0])
                            for s in out.sequences.addressable_shards))
      return out

  monkeypatch.setattr(sampler.sampler_lib, "Sampler", Recording)
  sampler.main(_TINY + ["--cpu-devices", "2"])
  ids = [d.id for d in jax.devices()[:2]]
  assert spreads and all(s == [(ids[0], 2), (ids[1], 2)] for s in spreads), spreads
  out = capsys.readouterr().out
  assert "batch 4, prompt<=6, 3 new tokens, jax on 2 cpu devices" in out
  for variant in ("token_logprobs", "full_logits", "response_logprobs"):
    assert f"adam, {variant}" in out
