"""Logical sharding on the 8-device fake CPU mesh (2 data × 2 fsdp × 2 tensor).

Tolerance: sharded vs single-device logits / gradients differ by float32
rounding only (partial sums are reduced across shards in another order), which
is proportional to their magnitude: logits are bounded relative to max |logit|
by tolerances.DECODER_RTOL, gradients relative to each leaf's largest entry by
tolerances.DECODER_GRAD_RTOL (eps × accumulation depth; see tests/tolerances.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from onpo_jax.testing import tiny_hf
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec
from onpo_jax.models import hf_io
from onpo_jax.models import sharding
import tolerances


def _spec(spec, ndim):
  """PartitionSpec as a tuple padded with None (P('a') == P('a', None))."""
  t = tuple(spec)
  return t + (None,) * (ndim - len(t))


def _rbg(seed):
  # unsafe_rbg keys compile much faster than threefry on CPU.
  return nnx.Rngs(params=jax.random.key(seed, impl="unsafe_rbg"))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((2, 2, 2))


def test_logical_to_spec():
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"),
           ("embed", "tensor"), ("vocab", "tensor"), ("length", None))
  shape = {"data": 2, "fsdp": 2, "tensor": 2}
  assert _spec(sharding.logical_to_spec(("vocab", "embed"), rules, shape,
                                        (8, 4)), 2) == ("tensor", "fsdp")
  # 'fsdp' is taken by batch, so embed falls back to its next rule, 'tensor'.
  assert _spec(sharding.logical_to_spec(("batch", "length", "embed"), rules,
                                        shape, (4, 3, 8)), 3) == (
                                            ("data", "fsdp"), None, "tensor")
  # A dimension the mesh axes do not divide stays replicated.
  assert _spec(sharding.logical_to_spec(("vocab", "embed"), rules, shape,
                                        (7, 5)), 2) == (None, None)
  # Unknown names and None are replicated; axes absent from the mesh skipped.
  assert _spec(sharding.logical_to_spec(("norm", None), rules, {"fsdp": 2},
                                        (4, 4)), 2) == (None, None)
  with pytest.raises(ValueError, match="names"):
    sharding.logical_to_spec(("vocab",), rules, shape, (4, 4))


EXPECTED = {  # logical names under DEFAULT_RULES on (data, fsdp, tensor)
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "q": ("fsdp", "tensor", None),
    "k": ("fsdp", "tensor", None),
    "v": ("fsdp", "tensor", None),
    "o": ("tensor", None, "fsdp"),
    "gate": ("fsdp", "tensor"),
    "up": ("fsdp", "tensor"),
    "down": ("tensor", "fsdp"),
    "scale": (None,),
}


def _check_param_specs(model):
  seen = set()
  for path, v in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param)):
    name = path[-1].key if hasattr(path[-1], "key") else path[-2].key
    assert _spec(v.sharding.spec, v.ndim) == EXPECTED[name], (path,
                                                              v.sharding)
    # Each device really holds only its shard.
    shard = v.addressable_shards[0].data.shape
    assert np.prod(shard) * np.prod(
        [2 for a in EXPECTED[name] if a]) == v.size
    seen.add(name)
  assert seen == set(EXPECTED)


def test_create_sharded_model_specs(mesh):
  cfg = config_lib.DecoderConfig.tiny()
  model = sharding.create_sharded_model(cfg, mesh, sharding.DEFAULT_RULES,
                                        _rbg(0))
  _check_param_specs(model)


@pytest.mark.parametrize("attention_impl", ["dense", "chunked", "splash"])
def test_sharded_logits_and_grads_match_single_device(mesh, attention_impl):
  # chunked: blocks of 2 over 6 positions; splash runs in shard_map, one
  # shard of batch rows and kv heads per device.
  cfg = config_lib.DecoderConfig.tiny(attention_impl=attention_impl,
                                      attention_chunk_size=2)
  model = sharding.create_sharded_model(cfg, mesh, rngs=_rbg(1))
  graphdef, state = nnx.split(model)
  single_state = jax.device_put(jax.tree.map(np.asarray, state),
                                jax.devices()[0])
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(3, 128, (4, 6)), jnp.int32)
  mask = jnp.asarray(np.arange(6)[None] >= np.array([[2], [0], [1], [0]]))
  pos = dec.positions_from_mask(mask)

  def run(state):
    def loss(s):
      return nnx.merge(graphdef, s).token_logprobs(
          tokens, pos, mask, chunk_size=2).sum()
    logits = nnx.merge(graphdef, state)(tokens, pos, mask)[0]
    return logits, jax.grad(loss)(state)

  ref_logits, ref_grads = jax.jit(run)(single_state)
  # A train step pins gradient shardings to the parameters' (out_shardings).
  param_shardings = sharding.state_shardings(state, mesh)
  with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
    fn = jax.jit(run, out_shardings=(None, param_shardings))
    hlo = fn.lower(state).as_text()
    logits, grads = fn(state)
  # The logical activation constraints reach the compiled program.
  assert hlo.count("sharding_constraint") + hlo.count("@Sharding") > 0
  assert ("manual_computation" in hlo) == (attention_impl == "splash")
  real = np.asarray(mask)
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref_logits),
                              mask=real, rtol=tolerances.DECODER_RTOL,
                              what="sharded logits")
  tolerances.assert_tree_close_rel(grads, ref_grads,
                                   rtol=tolerances.DECODER_GRAD_RTOL,
                                   what="sharded grads")
  assert _spec(grads["embed"].sharding.spec, 2) == EXPECTED["embed"]
  # The logits follow the ('batch', 'length', 'vocab') constraint.
  assert _spec(logits.sharding.spec, 3) == (("data", "fsdp"), None, "tensor")


def test_hf_import_places_shards(mesh, tmp_path):
  path = tiny_hf.make_tiny_checkpoint(tmp_path / "c", "llama", vocab_size=128)
  model = hf_io.load_hf_checkpoint(path, mesh=mesh)
  _check_param_specs(model)
  plain = hf_io.load_hf_checkpoint(path)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(plain, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def llama3_8b_config():
  return config_lib.DecoderConfig(
      model_type="llama", vocab_size=128256, hidden_size=4096,
      intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
      head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192},
      max_position_embeddings=131072, param_dtype="bfloat16",
      dtype="bfloat16", bos_token_id=128000, eos_token_ids=(128001, 128009))


def test_llama3_8b_param_bytes_without_allocating(mesh):
  cfg = llama3_8b_config()
  live_before = len(jax.live_arrays())
  got = sharding.param_bytes_per_device(cfg, mesh)
  assert len(jax.live_arrays()) <= live_before  # nothing was allocated
  d, f, v, layers = 4096, 14336, 128256, 32
  norms = (2 * layers + 1) * d
  n = 2 * v * d + layers * (2 * d * 4096 + 2 * d * 1024 + 3 * d * f) + norms
  assert n == 8_030_261_248  # the published Llama-3-8B size
  assert got.num_params == n
  assert got.total_bytes == 2 * n
  # fsdp × tensor = 4-way on every matrix; norms replicated.
  assert got.bytes_per_device == 2 * ((n - norms) // 4 + norms)
  # An abstract 256-chip plan (fsdp 64 × tensor 4) needs no real devices.
  big = jax.sharding.AbstractMesh((1, 64, 4), sharding.MESH_AXES)
  plan = sharding.param_bytes_per_device(cfg, big)
  assert plan.total_bytes == 2 * n
  assert abs(plan.bytes_per_device - 2 * n / 256) / (2 * n / 256) < 0.01


def test_sharded_decode_with_sharded_cache(mesh):
  cfg = config_lib.DecoderConfig.tiny()
  model = sharding.create_sharded_model(cfg, mesh, rngs=_rbg(2))
  graphdef, state = nnx.split(model)
  cache = dec.init_cache(cfg, 4, 8)
  shardings = sharding.cache_shardings(cache, mesh)
  for s in shardings.k + shardings.v:
    assert _spec(s.spec, 4) == (("data", "fsdp"), "tensor", None, None)
  cache = jax.device_put(cache, shardings)
  tokens = jnp.asarray(np.random.RandomState(1).randint(3, 128, (4, 5)),
                       jnp.int32)
  mask = jnp.ones((4, 5), bool)
  pos = dec.positions_from_mask(mask)
  with sharding.activation_sharding(mesh):
    step = jax.jit(lambda s, t, p, m, c: nnx.merge(graphdef, s)(t, p, m, c),
                   out_shardings=(None, shardings), donate_argnums=4)
    logits, cache = step(state, tokens[:, :4], pos[:, :4], mask[:, :4], cache)
    last, cache = step(state, tokens[:, 4:], pos[:, 4:], mask[:, 4:], cache)
  for x, s in zip(cache.k + cache.v, shardings.k + shardings.v):
    assert _spec(x.sharding.spec, 4) == _spec(s.spec, 4)
  full = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, pos, mask)[0])(
      jax.device_put(jax.tree.map(np.asarray, state), jax.devices()[0]))
  tolerances.assert_close_rel(np.asarray(last[:, 0]), np.asarray(full[:, 4]),
                              rtol=tolerances.DECODER_RTOL,
                              what="sharded cached decode")
  # A prefill builds its cache already laid out by the sharding rules (no
  # out_shardings needed) and decodes the same next step.
  with sharding.activation_sharding(mesh):
    prefill = jax.jit(lambda s, t, p, m: nnx.merge(graphdef, s).prefill(t, p, m, 8))
    _, filled = prefill(state, tokens[:, :4], pos[:, :4], mask[:, :4])
    after_prefill, _ = step(state, tokens[:, 4:], pos[:, 4:], mask[:, 4:], filled)
  for x, s in zip(filled.k + filled.v, shardings.k + shardings.v):
    assert _spec(x.sharding.spec, 4) == _spec(s.spec, 4)
  tolerances.assert_close_rel(np.asarray(after_prefill[:, 0]), np.asarray(full[:, 4]),
                              rtol=tolerances.DECODER_RTOL,
                              what="sharded decode after a prefill")


def test_feature_major_decode_on_the_mesh(mesh):
  """`feature_major.decode_step` of a sharded model after a prefill: its
  transposed kernels keep the heads and MLP columns over 'tensor', the cache
  keeps its shardings, and the logits are the unsharded model's."""
  from onpo_jax.models import feature_major
  cfg = config_lib.DecoderConfig.tiny(num_heads=4, num_kv_heads=2)
  model = sharding.create_sharded_model(cfg, mesh, rngs=_rbg(3))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(2).randint(3, 128, (4, 5)), jnp.int32)
  mask = jnp.ones((4, 5), bool)
  pos = dec.positions_from_mask(mask)

  def run(s):
    m = nnx.merge(graphdef, s)
    _, cache = m.prefill(tokens[:, :4], pos[:, :4], mask[:, :4], 8)
    weights = feature_major.decode_weights(m)
    logits, cache = feature_major.decode_step(weights, cfg, tokens[:, 4], pos[:, 4], cache)
    return logits, cache, weights.layers[0]

  with sharding.activation_sharding(mesh):
    logits, cache, layer = jax.jit(run)(state)
  assert _spec(layer.q.sharding.spec, 3) == ("tensor", None, "fsdp")
  assert _spec(layer.o.sharding.spec, 3) == ("fsdp", "tensor", None)
  assert _spec(layer.gate.sharding.spec, 2) == ("tensor", "fsdp")
  shardings = sharding.cache_shardings(cache, mesh)
  for x, s in zip(cache.k + cache.v, shardings.k + shardings.v):
    assert _spec(x.sharding.spec, 4) == _spec(s.spec, 4)
  full = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, pos, mask)[0])(
      jax.device_put(jax.tree.map(np.asarray, state), jax.devices()[0]))
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(full[:, 4]),
                              rtol=tolerances.DECODER_RTOL,
                              what="sharded feature-major decoding step")


def test_shared_prefill_on_the_mesh(mesh):
  """A batch of 16 rows holding 4 prompts prefills 4 rows, one per batch shard;
  the rows' caches come back laid out by the sharding rules and the samples
  are those of a prefill of every row."""
  from onpo_jax import prompt_batches
  from onpo_jax import sampler as sampler_lib
  cfg = config_lib.DecoderConfig.tiny()
  model = sharding.create_sharded_model(cfg, mesh, rngs=_rbg(4))
  graphdef, state = nnx.split(model)
  prompts = np.random.RandomState(3).randint(3, 128, (4, 6))
  tokens, mask = prompts.repeat(4, 0), np.ones((16, 6), bool)
  mask[:4, :2] = False  # the first prompt is shorter

  def sample(share_prefill):
    config = sampler_lib.SamplingConfig(max_new_tokens=4, prompt_buckets=(8,),
                                        share_prefill=share_prefill, decode_layout="tokens")
    smp = sampler_lib.Sampler(graphdef, config, model_config=cfg)
    with sharding.activation_sharding(mesh):
      assert sharding.batch_shards() == 4  # ('data', 'fsdp') of the (2, 2, 2) mesh
      return smp(state, tokens, mask, jax.random.key(5)), smp

  shared, smp = sample(True)
  alone, _ = sample(False)
  np.testing.assert_array_equal(np.asarray(shared.sequences), np.asarray(alone.sequences))
  tolerances.assert_close_rel(np.asarray(shared.response_logprobs),
                              np.asarray(alone.response_logprobs),
                              rtol=tolerances.DECODER_RTOL, what="shared prefill on the mesh")
  padded, pmask = prompt_batches.pad_prompts_to_bucket(tokens, mask, (8,), 0)
  first, of_row = prompt_batches.distinct_prompt_rows(padded, pmask, 4)
  assert first.shape == (4,)
  with sharding.activation_sharding(mesh):
    caches, _ = smp.prefill((state,), jnp.asarray(padded[first]), jnp.asarray(pmask[first]),
                            jnp.asarray(of_row, jnp.int32))
  shardings = sharding.cache_shardings(caches[0], mesh)
  for x, s in zip(caches[0].k + caches[0].v, shardings.k + shardings.v):
    assert x.shape[0] == 16 and _spec(x.sharding.spec, 4) == _spec(s.spec, 4)
