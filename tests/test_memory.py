"""Tests for onpo_jax.llm.device_bytes and onpo_jax.llm.memory: per-device bytes.

Parameters, optimizer states and KV caches, and the plans built from them.

References: a numpy ceil-division formula, JAX's own `NamedSharding.shard_shape`
on `jax.eval_shape` outputs, and the bytes actually allocated on a fake 8-device
CPU mesh. Byte counts are integers, so every comparison is exact.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from onpo_jax.llm import device_bytes
from onpo_jax.llm import memory
from onpo_jax.models import sharding
from onpo_jax.models.config import DecoderConfig
from onpo_jax.onpo_step import onpo_step

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
TINY = DecoderConfig.tiny(vocab_size=96, hidden_size=32, intermediate_size=48, num_heads=4,
                          num_kv_heads=2, head_dim=8)


def _np_shard_bytes(shape, itemsize, spec, mesh):
  out = itemsize
  for d, size in enumerate(shape):
    axes = spec[d] if d < len(spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
    div = int(np.prod([mesh[a] for a in axes])) if axes else 1
    out *= -(-size // div)
  return out


@pytest.mark.parametrize("shape, spec", [((8, 6), P("fsdp", "tensor")), ((7, 5), P(("data", "fsdp"))),
                                         ((3,), P()), ((4, 4, 4), P(None, "tensor", "data"))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shard_bytes_matches_formula(shape, spec, dtype):
  got = device_bytes.shard_bytes(shape, dtype, spec, MESH)
  assert got == _np_shard_bytes(shape, jnp.dtype(dtype).itemsize, spec, MESH)


def test_shard_bytes_rejects_bad_specs():
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    device_bytes.shard_bytes((4,), jnp.float32, P("model"), MESH)
  with pytest.raises(ValueError, match="3 entries for a 2-d shape"):
    device_bytes.shard_bytes((4, 4), jnp.float32, P(None, None, None), MESH)
  with pytest.raises(ValueError, match=r"mesh_shape\['fsdp'\]"):
    device_bytes.shard_bytes((4,), jnp.float32, P(), {"fsdp": 0})


def _allocated_bytes_on_device0(tree):
  dev = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
  return total


def test_estimates_equal_bytes_allocated_on_a_sharded_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  model = sharding.create_sharded_model(TINY, mesh)
  params = nnx.state(model, nnx.Param)
  abstract, specs = device_bytes.abstract_params(TINY, mesh_shape=MESH)
  assert device_bytes.tree_bytes_per_device(abstract, specs, MESH) == _allocated_bytes_on_device0(params)
  # Cross-check with the model package's own count.
  assert (device_bytes.tree_bytes_per_device(abstract, specs, MESH)
          == sharding.param_bytes_per_device(TINY, mesh).bytes_per_device)
  opt = onpo_step(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2).gradient_transformation(),
                  variant="two_step", init_from="policy")
  # Eager init keeps each moment / copy on its parameter's sharding.
  state = opt.init(params)
  assert device_bytes.optimizer_bytes_per_device(opt, abstract, specs, MESH) == \
      _allocated_bytes_on_device0(state)
  # The gradients of a step keep their parameters' shardings.
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))))(params)
  assert memory.estimate(TINY, opt, MESH).gradients == _allocated_bytes_on_device0(grads)


def test_kv_cache_bytes():
  got = device_bytes.kv_cache_bytes_per_device(TINY, batch_size=8, max_length=20, mesh_shape=MESH,
                                         dtype=jnp.bfloat16)
  # k and v, per layer: [B/(data·fsdp), kv_heads/tensor, S, head_dim] bf16; mask [B/4, S] bool.
  per = TINY.num_layers * (8 // 4) * 20 * (TINY.num_kv_heads // 2) * TINY.head_dim * 2
  assert got == 2 * per + (8 // 4) * 20 + 4


def _paper(name, arg):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name, variant, ref_resident", [
    ("llama3_8b_onpo", "gpu8", False), ("mistral_7b_onpo", "v5p-16", False),
    ("llama3_8b_inpo", "v4-32", True)])
def test_paper_configs_memory_plan(name, variant, ref_resident):
  config = _paper(name, variant)
  est = memory.estimate_memory(config, backend="gpu")
  dims = dict(zip(("data", "fsdp", "tensor"), config.mesh.shape))
  assert est.mesh_shape == dims
  policy, judge = memory.decoder_configs(config)
  expected_params = 8_030_261_248 if name.startswith("llama") else 7_248_023_552
  assert est.num_params == expected_params
  # float32; RMSNorm scales ((2L + 1)·D values) are replicated, every other
  # parameter is split 8 ways over 'fsdp' (all their dims divide 8).
  norms = (2 * policy.num_layers + 1) * policy.hidden_size
  assert est.policy_params == 4 * (expected_params - norms) // 8 + 4 * norms
  # ONPO: Adam mu and nu, π' in onpo_step and the MultiSteps accumulator = 4 copies;
  # INPO / DPO: 3 copies; the rest are a few scalar counters.
  copies = 4 if name.endswith("onpo") else 3
  assert 0 <= est.optimizer - copies * est.policy_params < 1024
  judge_norms = (2 * judge.num_layers + 1) * judge.hidden_size
  assert est.judge_params == 2 * (8_030_261_248 - judge_norms) // 8 + 2 * judge_norms
  assert (est.ref_params > 0) == ref_resident
  assert est.decode_kernels == 0  # tokens-major decoding on a GPU or TPU
  print(f"\n{name}:{variant} {est.summary()}")


def test_plan_counts_the_transposed_kernels_of_feature_major_decoding():
  """`sampling.decode_layout`: 'auto' copies the kernels on CPU only, once per
  model the sampler decodes at once (the policy; with π_ref, both)."""
  onpo = _paper("llama3_8b_onpo", "gpu8")
  plans = {backend: memory.estimate_memory(onpo, backend=backend) for backend in ("cpu", "gpu")}
  one = plans["cpu"].decode_kernels
  assert plans["gpu"].decode_kernels == 0 and one > 0
  assert plans["cpu"].total - plans["gpu"].total == one
  # Llama-3-8B's projections (the untied lm_head included) in the bfloat16 compute
  # dtype, split 8 ways over fsdp.
  policy, _ = memory.decoder_configs(onpo)
  assert policy.dtype == "bfloat16"
  d, f, v, layers = 4096, 14336, 128256, 32
  assert one == 2 * (layers * (2 * d * 4096 + 2 * d * 1024 + 3 * d * f) + v * d) // 8
  onpo.sampling.decode_layout = "features"
  assert memory.estimate_memory(onpo, backend="gpu").decode_kernels == one
  onpo.sampling.decode_layout = "tokens"
  assert memory.estimate_memory(onpo, backend="cpu").decode_kernels == 0
  inpo = _paper("llama3_8b_inpo", "gpu8")
  assert memory.estimate_memory(inpo, backend="cpu").decode_kernels == 2 * one


def test_paper_mesh_shardings_agree_with_jax_eval_shape():
  """gpu8 fits the 8 fake devices: JAX's own shard shapes give the same bytes."""
  config = _paper("llama3_8b_onpo", "gpu8")
  policy, _ = memory.decoder_configs(config)
  mesh = sharding.make_mesh(config.mesh.shape)
  abstract = nnx.eval_shape(lambda: __import__("onpo_jax.models.decoder", fromlist=["Decoder"])
                            .Decoder(policy, rngs=nnx.Rngs(params=0)))
  _, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh)
  out = jax.eval_shape(jax.jit(lambda s: s, out_shardings=shardings), abstract_state)
  jax_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(out))
  assert jax_bytes == memory.estimate_memory(config).policy_params


def test_estimate_needs_a_mesh_without_minus_one():
  config = _paper("llama3_8b_onpo", "gpu8")
  config.mesh.shape = (1, -1, 1)
  with pytest.raises(ValueError, match="mesh_dims"):
    memory.estimate_memory(config)


def test_host_available_bytes_reads_meminfo(tmp_path):
  table = tmp_path / "meminfo"
  table.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\n"
                   "MemAvailable:   12345678 kB\nBuffers:  0 kB\n")
  assert memory.host_available_bytes(str(table)) == 12345678 * 1024
  table.write_text("MemTotal:       24000000 kB\n")
  assert memory.host_available_bytes(str(table)) is None
  assert memory.host_available_bytes(str(tmp_path / "absent")) is None


class _Device:
  def __init__(self, platform, stats=None, kind="fake"):
    self.platform, self.device_kind, self._stats = platform, kind, stats

  def memory_stats(self):
    return self._stats


def test_device_capacity_shares_host_ram_and_reads_accelerator_limits(tmp_path):
  table = tmp_path / "meminfo"
  table.write_text("MemAvailable:   8000000 kB\n")
  got, where = memory.device_capacity(jax.devices(), meminfo=str(table))
  assert len(jax.devices()) == 8 and got == 8000000 * 1024 // 8
  assert "shared by 8 CPU device(s)" in where and str(table) in where
  assert memory.device_capacity(jax.devices(), meminfo=str(tmp_path / "absent")) is None
  gpus = [_Device("gpu", {"bytes_limit": 80 * 2**30}, "H100"),
          _Device("gpu", {"bytes_limit": 70 * 2**30}, "H100")]
  assert memory.device_capacity(gpus) == (70 * 2**30, "memory limit of a H100 (memory_stats)")
  # A device that reports nothing leaves nothing to check against.
  assert memory.device_capacity(gpus + [_Device("gpu", None)]) is None
  assert memory.device_capacity([_Device("tpu", {"bytes_in_use": 0})]) is None


def test_check_fits_stops_a_plan_beyond_the_capacity():
  plan = memory.estimate_memory(_paper("llama3_8b_onpo", "gpu8"))
  memory.check_fits(plan, (plan.total, "exactly enough"))
  memory.check_fits(plan, None)
  with pytest.raises(memory.MemoryPlanError,
                     match=(rf"{plan.total / memory.GIB:.2f} GiB per device .* exceeds the "
                            r"16\.00 GiB of one device \(a V100\).*fsdp.*check_memory=False")):
    memory.check_fits(plan, (16 * memory.GIB, "a V100"))  # the plan: 27.31 GiB
