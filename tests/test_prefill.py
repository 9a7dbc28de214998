"""`Decoder.prefill` against a forward pass into an empty KV cache.

A prefill attends the prompt's queries to the prompt's own keys with the
configured self-attention kernel, where `hidden_states` with a fresh cache
attends them to every slot of that cache (the later ones masked). Both must
give the same hidden states on real tokens, the same cache (keys and values
of real tokens in slots [0, L), zeros after, the prompt's mask, index L) and
so the same decoding steps afterwards.

Tolerances: the two sum the same terms in a different order (the softmax
over L keys or over S slots whose extra terms are exactly zero, another
kernel), so they are bounded like two whole-decoder float32 programs:
tests/tolerances.py's DECODER_DEPTH × eps relative to the largest entry, with
float64's eps in float64 (6.7e-5 and 1.2e-13). Observed: at most 1.6e-7
relative in float32 and 3.2e-16 in float64; a mask that lets the prompt's
pads be attended, or keys stored at the wrong slots, changes them by 1e-2
and more.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from test_decoder import _batch
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec

EPS = {np.float32: tolerances.F32_EPS, np.float64: float(np.finfo(np.float64).eps)}
PROMPT, SLOTS, STEPS = 6, 10, 3


def _x64(dtype):
  return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def _prefill_and_decode(cfg, use_jit, fresh):
  """(prefill hidden states, cache, logits of STEPS decoding steps after it)."""
  model = dec.Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(1, impl="unsafe_rbg")))
  graphdef, state = nnx.split(model)
  tokens, pos, mask = _batch(128, l=PROMPT + STEPS, pad=(2, 0))

  def run(state):
    m = nnx.merge(graphdef, state)
    p = slice(0, PROMPT)
    if fresh:
      h, cache = m.prefill(tokens[:, p], pos[:, p], mask[:, p], SLOTS)
    else:
      h, cache = m.hidden_states(tokens[:, p], pos[:, p], mask[:, p],
                                 dec.init_cache(cfg, 2, SLOTS))
    steps = []
    for t in range(PROMPT, PROMPT + STEPS):
      logits, cache = m(tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
      steps.append(logits)
    return h, cache, jnp.concatenate(steps, axis=1)

  h, cache, logits = (jax.jit(run) if use_jit else run)(state)
  return h, cache, logits, np.asarray(mask[:, :PROMPT])


@pytest.mark.parametrize("impl,dtype,use_jit", [
    ("dense", np.float32, True), ("dense", np.float32, False),
    ("dense", np.float64, True), ("chunked", np.float32, True),
    ("chunked", np.float64, False), ("dot_product_attention", np.float32, True),
    ("splash", np.float32, True)])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_prefill_is_a_forward_into_an_empty_cache(impl, dtype, use_jit, sliding_window):
  with _x64(dtype):
    cfg = config_lib.DecoderConfig.tiny(
        vocab_size=128, num_heads=4, num_kv_heads=2, sliding_window=sliding_window,
        attention_impl=impl, attention_chunk_size=4, dtype=np.dtype(dtype).name,
        param_dtype=np.dtype(dtype).name)
    h, cache, logits, real = _prefill_and_decode(cfg, use_jit, fresh=True)
    ref_h, ref_cache, ref_logits, _ = _prefill_and_decode(cfg, use_jit, fresh=False)
  rtol = tolerances.DECODER_DEPTH * EPS[dtype]
  assert h.dtype == ref_h.dtype == dtype
  tolerances.assert_close_rel(np.asarray(h), np.asarray(ref_h), mask=real, rtol=rtol,
                              what="prefill hidden states")
  # Pads' keys and values are written but never attended (their mask is
  # False), and a pad query sees no key: only real slots are compared.
  for layer in range(cfg.num_layers):
    k, ref_k = np.asarray(cache.k[layer]), np.asarray(ref_cache.k[layer])
    v, ref_v = np.asarray(cache.v[layer]), np.asarray(ref_cache.v[layer])
    assert k.shape == ref_k.shape and v.shape == ref_v.shape
    assert k.dtype == ref_k.dtype == v.dtype == dtype
    # Slots from PROMPT + STEPS on were never written: zeros in both.
    assert not k[..., PROMPT + STEPS:].any() and not v[:, :, PROMPT + STEPS:].any()
    written = np.concatenate([real, np.ones((2, STEPS), bool)], axis=1)
    tolerances.assert_close_rel(
        k[..., :PROMPT + STEPS].transpose(0, 3, 1, 2), ref_k[..., :PROMPT + STEPS].transpose(0, 3, 1, 2),
        mask=written, rtol=rtol, what=f"layer {layer} keys")
    tolerances.assert_close_rel(
        v[:, :, :PROMPT + STEPS].transpose(0, 2, 1, 3), ref_v[:, :, :PROMPT + STEPS].transpose(0, 2, 1, 3),
        mask=written, rtol=rtol, what=f"layer {layer} values")
  np.testing.assert_array_equal(cache.mask, ref_cache.mask)
  assert int(cache.index) == int(ref_cache.index) == PROMPT + STEPS
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref_logits), rtol=rtol,
                              what="decoding steps after the prefill")


def test_prefill_cache_layout_dtype_and_errors():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  model = dec.Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(0, impl="unsafe_rbg")))
  tokens, pos, mask = _batch(128, l=4, pad=(1, 0))
  h, cache = model.prefill(tokens, pos, mask, 7, jnp.bfloat16)
  empty = dec.init_cache(cfg, 2, 7, jnp.bfloat16)
  assert h.shape == (2, 4, cfg.hidden_size)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == jax.tree.map(
      lambda x: (x.shape, x.dtype), empty)
  np.testing.assert_array_equal(cache.mask[:, :4], mask)
  assert not cache.mask[:, 4:].any() and int(cache.index) == 4
  # One buffer per layer for keys and values: the sampler donates them.
  leaves = cache.k + cache.v
  assert len({id(x) for x in leaves}) == len(leaves)
  # A prompt filling the whole cache is allowed; a longer one is not.
  assert int(model.prefill(tokens, pos, mask, 4)[1].index) == 4
  with pytest.raises(ValueError, match="max_length: expected at least the prompt's length 4, got 3"):
    model.prefill(tokens, pos, mask, 3)
  with pytest.raises(ValueError, match="positions"):
    model.prefill(tokens, pos[:, :3], mask, 7)


def test_prefill_benchmark_compares_and_times_both(capsys):
  from benchmarks import prefill as bench
  out = bench.main(["--layers", "1", "--batch", "2", "--prompt", "8", "--new", "4",
                    "--repeats", "2"])
  printed = capsys.readouterr().out
  assert "prefill" in printed and "95% CI" in printed
  assert out["logit_err"] < tolerances.DECODER_RTOL and out["key_err"] < 1e-4
  assert out["prefill_ms"] > 0 and out["cache_forward_ms"] > 0
  assert out["diff_low"] <= out["diff_ms"] <= out["diff_high"]
  for argv, flag in ((["--repeats", "1"], "--repeats"), (["--new", "-1"], "--new"),
                     (["--prompt", "0"], "--prompt")):
    with pytest.raises(SystemExit):
      bench.parse_args(argv)
    assert flag in capsys.readouterr().err
