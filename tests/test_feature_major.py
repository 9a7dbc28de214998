"""Feature-major decoding steps (`models.feature_major`, `SamplingConfig.decode_layout`).

`decode_step` keeps a decoding step's activations [D, B] and multiplies
transposed copies of the kernels; it must give the decoder's own cached
forward (`Decoder.__call__` with a KV cache, tokens-major) up to float
rounding: the same logits and the same cache after several steps, for every
architecture option (grouped-query and multi-head attention, Qwen2 biases, a
sliding window, untied embeddings, Llama-3 RoPE scaling), in float32 and
float64, under jit and without. The sampler's two layouts must draw the same
samples.

Tolerances: both sides sum the same terms in another order (the products'
blocking differs with the operands' layouts), so they are bounded like two
whole-decoder float32 programs: tests/tolerances.py's DECODER_DEPTH × eps
relative to the largest entry (6.7e-5 in float32; with float64's eps 1.2e-13).
Observed: at most 4.7e-7 relative in float32 and 8e-16 in float64. bfloat16
compute rounds each product's float32 result once on both sides; its bound is
a few bfloat16 ulps (4 × 2**-7) of the largest logit (observed: 1 ulp). A kernel left
untransposed, a bias on the wrong axis or a rotation by the wrong positions
changes the logits by 1e-2 relative and more.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tolerances
from test_cache_segments import N_NEW, _assert_same_samples, _sampler
from test_decoder import _batch
from test_sampler import policy, reference  # noqa: F401
from onpo_jax import sampler as sampler_lib
from onpo_jax.llm import memory as memory_lib
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec
from onpo_jax.models import feature_major
from onpo_jax.models import layers
from onpo_jax.models import rope as rope_lib

EPS = {np.float32: tolerances.F32_EPS, np.float64: float(np.finfo(np.float64).eps)}
PROMPT, SLOTS, STEPS = 5, 9, 3

ARCHITECTURES = {
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mha": dict(num_heads=4, num_kv_heads=4),
    "qwen2_bias": dict(model_type="qwen2", attention_bias=True, num_heads=4, num_kv_heads=2),
    "window_untied": dict(sliding_window=3, tie_word_embeddings=False),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8}),
}


def _x64(dtype):
  return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def _random_model(cfg, seed=0):
  """A Decoder whose every parameter (norms and zero-initialised biases too) is random."""
  model = dec.Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(seed, impl="unsafe_rbg")))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1, impl="unsafe_rbg"), len(leaves))
  leaves = [(1.0 + 0.3 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            if x.ndim == 1 else (0.1 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _steps(cfg, use_jit, features):
  """Logits [B, STEPS, V] of STEPS decoding steps after a prefill, and the final cache."""
  model = _random_model(cfg)
  graphdef, state = nnx.split(model)
  tokens, pos, mask = _batch(cfg.vocab_size, b=3, l=PROMPT + STEPS, pad=(2, 0, 4))

  def run(state):
    m = nnx.merge(graphdef, state)
    _, cache = m.prefill(tokens[:, :PROMPT], pos[:, :PROMPT], mask[:, :PROMPT], SLOTS)
    weights = feature_major.decode_weights(m)
    logits = []
    for t in range(PROMPT, PROMPT + STEPS):
      if features:
        lg, cache = feature_major.decode_step(weights, cfg, tokens[:, t], pos[:, t], cache)
      else:
        lg, cache = m(tokens[:, t:t + 1], pos[:, t:t + 1], jnp.ones((3, 1), bool), cache)
        lg = lg[:, 0]
      logits.append(lg)
    return jnp.stack(logits, axis=1), cache

  return (jax.jit(run) if use_jit else run)(state)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dtype,use_jit", [(np.float32, True), (np.float32, False),
                                           (np.float64, True)])
def test_decode_step_is_the_decoders_cached_forward(arch, dtype, use_jit):
  name = np.dtype(dtype).name
  with _x64(dtype):
    cfg = config_lib.DecoderConfig.tiny(vocab_size=128, dtype=name, param_dtype=name,
                                        **ARCHITECTURES[arch])
    logits, cache = _steps(cfg, use_jit, features=True)
    ref_logits, ref_cache = _steps(cfg, use_jit, features=False)
  rtol = tolerances.DECODER_DEPTH * EPS[dtype]
  assert logits.shape == ref_logits.shape == (3, STEPS, 128) and logits.dtype == dtype
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref_logits), rtol=rtol,
                              what=f"{arch}: logits")
  for layer in range(cfg.num_layers):
    for what, ours, ref in (("keys", cache.k[layer], ref_cache.k[layer]),
                            ("values", cache.v[layer], ref_cache.v[layer])):
      assert ours.shape == ref.shape and ours.dtype == ref.dtype
      tolerances.assert_close_rel(np.asarray(ours), np.asarray(ref), rtol=rtol,
                                  what=f"{arch}: layer {layer} {what}")
  np.testing.assert_array_equal(cache.mask, ref_cache.mask)
  assert int(cache.index) == int(ref_cache.index) == PROMPT + STEPS


def test_decode_step_in_bfloat16():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128, dtype="bfloat16", param_dtype="float32",
                                      num_heads=4, num_kv_heads=2)
  logits, cache = _steps(cfg, True, features=True)
  ref_logits, ref_cache = _steps(cfg, True, features=False)
  assert logits.dtype == ref_logits.dtype == jnp.float32
  assert cache.k[0].dtype == jnp.bfloat16
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref_logits),
                              rtol=4 * tolerances.BF16_EPS, what="bfloat16 logits")


def test_decode_weights_layouts():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=64, num_heads=4, num_kv_heads=2,
                                      tie_word_embeddings=False, dtype="bfloat16")
  model = _random_model(cfg)
  w = feature_major.decode_weights(model)
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  block, first = model.layers[0], w.layers[0]
  assert len(w.layers) == cfg.num_layers
  for name, shape, original, perm in (
      ("q", (4, hd, d), block.attn.q, (2, 0, 1)), ("k", (2, hd, d), block.attn.k, (2, 0, 1)),
      ("v", (2, hd, d), block.attn.v, (2, 0, 1)), ("o", (d, 4, hd), block.attn.o, (1, 2, 0)),
      ("gate", (f, d), block.mlp.gate, (1, 0)), ("up", (f, d), block.mlp.up, (1, 0)),
      ("down", (d, f), block.mlp.down, (1, 0))):
    kernel = getattr(first, name)
    assert kernel.shape == shape and kernel.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(jnp.transpose(kernel, perm), np.float32),
                                  np.asarray(original[...].astype(jnp.bfloat16), np.float32))
  assert first.q_bias is None and w.unembed.shape == (64, d)
  np.testing.assert_array_equal(np.asarray(w.unembed, np.float32),
                                np.asarray(model.lm_head[...].T.astype(jnp.bfloat16), np.float32))
  # A tied model reads its embedding in place; `dtype` overrides the compute dtype.
  tied = _random_model(cfg.replace(tie_word_embeddings=True))
  w32 = feature_major.decode_weights(tied, jnp.float32)
  assert w32.unembed is w32.embed and w32.layers[0].gate.dtype == jnp.float32


def test_decode_step_errors():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=64)
  model = _random_model(cfg)
  w = feature_major.decode_weights(model)
  cache = dec.init_cache(cfg, 2, 4)
  tok, pos = jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="tokens / positions / cache"):
    feature_major.decode_step(w, cfg, tok[:, None], pos, cache)
  with pytest.raises(ValueError, match="tokens / positions / cache"):
    feature_major.decode_step(w, cfg, tok, pos, dec.init_cache(cfg, 3, 4))
  with pytest.raises(ValueError, match="one key array per layer"):
    feature_major.decode_step(w._replace(layers=w.layers[:1]), cfg, tok, pos, cache)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_major_norm_and_rope_are_the_token_major_ones_transposed(dtype):
  with _x64(dtype):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(6, 16), dtype)  # [B, D]
    scale = jnp.asarray(rng.randn(16), dtype)
    np.testing.assert_allclose(layers.rms_norm(x.T, scale, 1e-5, axis=0),
                               layers.rms_norm(x, scale, 1e-5).T,
                               rtol=16 * EPS[dtype], atol=16 * EPS[dtype])
    q = jnp.asarray(rng.randn(6, 1, 3, 8), dtype)  # [B, 1, H, d]
    positions = jnp.asarray(rng.randint(0, 50, (6, 1)), jnp.int32)
    inv_freq = jnp.asarray(rope_lib.rope_inv_freq(8, 10000.0))
    want = rope_lib.apply_rope(q, positions, inv_freq)[:, 0]  # [B, H, d]
    got = rope_lib.apply_rope_features_major(jnp.transpose(q[:, 0], (1, 2, 0)), positions[:, 0],
                                             inv_freq)
    np.testing.assert_array_equal(np.asarray(jnp.transpose(got, (2, 0, 1))), np.asarray(want))
  with pytest.raises(ValueError, match="scale: expected shape"):
    layers.rms_norm(x.T, scale, 1e-5)
  with pytest.raises(ValueError, match=r"x / positions: expected \[..., d, B\]"):
    rope_lib.apply_rope_features_major(jnp.zeros((3, 8, 6)), jnp.zeros((5,), jnp.int32), inv_freq)


@pytest.mark.parametrize("mixture_alpha", [None, 0.5])
def test_the_samplers_layouts_give_the_same_samples(policy, reference, mixture_alpha):  # noqa: F811
  for kw in (dict(), dict(eos_ids=(3, 5), pad_id=0), dict(cache_segments=2),
             dict(temperature=0.7, top_k=5, top_p=0.9)):
    got = _sampler(policy, reference, mixture_alpha, decode_layout="features", **kw)[1](
        jax.random.key(7))
    ref = _sampler(policy, reference, mixture_alpha, decode_layout="tokens", **kw)[1](
        jax.random.key(7))
    assert got.response_tokens.shape == (3, N_NEW)
    _assert_same_samples(got, ref, f"features vs tokens, {kw}")


def test_decode_layout_config():
  auto = sampler_lib.SamplingConfig(max_new_tokens=4)
  assert auto.decode_layout == "auto"
  assert [auto.feature_major(b) for b in ("cpu", "gpu", "cuda", "tpu")] == [
      True, False, False, False]
  for layout, want in (("features", True), ("tokens", False)):
    cfg = sampler_lib.SamplingConfig(max_new_tokens=4, decode_layout=layout)
    assert cfg.feature_major("cpu") == cfg.feature_major("gpu") == want
  with pytest.raises(ValueError, match="decode_layout must be one of"):
    sampler_lib.SamplingConfig(max_new_tokens=4, decode_layout="columns")


def test_memory_plan_counts_the_transposed_kernels():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=64, tie_word_embeddings=False,
                                      param_dtype="float32", dtype="bfloat16")
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  plans = [memory_lib.estimate(cfg, optax.sgd(0.1), mesh, decode_copies=n) for n in (0, 1, 2)]
  model = _random_model(cfg)
  w = feature_major.decode_weights(model)
  kernels = sum(x.size * x.dtype.itemsize for layer in w.layers
                for x in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down))
  kernels += w.unembed.size * w.unembed.dtype.itemsize
  assert [p.decode_kernels for p in plans] == [0, kernels, 2 * kernels]
  assert plans[1].total - plans[0].total == kernels
  assert "decode_kernels" in plans[1].summary() and "decode_kernels" not in plans[0].summary()
  # Split over 'tensor', each device holds its share of the heads and MLP columns.
  split = memory_lib.estimate(cfg, optax.sgd(0.1), {"data": 1, "fsdp": 1, "tensor": 2},
                              decode_copies=1)
  assert split.decode_kernels < kernels


def test_decode_layout_benchmark_compares_both(capsys):
  from benchmarks import decode_layout as bench
  out = bench.main(["--layers", "1", "--batch", "2,3", "--prompt", "4", "--new", "3",
                    "--repeats", "2"])
  printed = capsys.readouterr().out
  assert "transposed copy" in printed and "95% CI" in printed
  assert out["copy_seconds"] > 0
  for b in (2, 3):
    assert out[b]["same_tokens"] and out[b]["logprob_diff"] < 1e-4
    assert out[b]["low"] <= out[b]["diff"] <= out[b]["high"]
  for argv, flag in ((["--repeats", "1"], "--repeats"), (["--batch", "0"], "--batch"),
                     (["--batch", "x"], "--batch"), (["--new", "0"], "--new")):
    with pytest.raises(SystemExit):
      bench.parse_args(argv)
    assert flag in capsys.readouterr().err
