"""Pallas's splash kernel (attention.splash_attention) on CPU.

Off TPU the kernel runs in Pallas's interpreter: the kernel code a TPU would
compile, evaluated op by op, so these tests check our use of it (mask and
segment-id mapping, GQA layout, padding to whole blocks, the scale, the
queries without a visible key) against `np_attention` (tests/test_attention.py,
float64 loops from the definition) and against the dense kernel, values under
jit and without, gradients under jit. The kernel is float32 / bfloat16 only
(TPUs have no float64): float64 inputs are routed to the dense kernel, which
is checked here too.

Tolerances (tests/tolerances.py conventions: eps × accumulation depth,
relative to the largest reference entry). Masked keys and padded slots get
probability exactly 0, so the depth counts real slots only: the score (d = 8
terms, after one rounding of the scaled query), the softmax denominator and
the weighted sum (S terms each): n = d + 1 + 3·S, with S = 140 on the longest
case: n = 429. Gradients: 2n plus the sums over the Lq ≤ 140 queries into dk,
dv and over the keys into dq (S): 2n + 280 = 1138. Observed: values ≤ 2.1e-7
and gradients ≤ 5.3e-7 relative; treating the pads as valid keys moves the
values by ≥ 0.79 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from test_attention import CASES, D_HEAD, np_attention
from onpo_jax.models import attention as attn
from onpo_jax.models import splash_attention

MAX_S = 140
SPLASH_DEPTH = D_HEAD + 1 + 3 * MAX_S
SPLASH_GRAD_DEPTH = 2 * SPLASH_DEPTH + 2 * MAX_S
SCALE = D_HEAD ** -0.5

# Self-attention cases: (L, window, Hkv, G, invalid keys per row, chunk).
# The first three are test_attention's (one block after padding to 128);
# "two_blocks" pads 140 slots to 2 blocks of 128, with a window of 40 that
# hides whole blocks and 30 left pads (queries that see no key).
SPLASH_CASES = {
    name: CASES[name][:1] + CASES[name][3:7] + (128,)
    for name in ("causal_left_pad", "gqa", "sliding_window")
}
SPLASH_CASES["two_blocks"] = (140, 40, 2, 2, {0: list(range(30)), 1: [70]}, 128)


def _case(name, seed=0, dtype=np.float32):
  length, window, hkv, g, invalid, chunk = SPLASH_CASES[name]
  rng = np.random.RandomState(seed)
  q = rng.randn(2, length, hkv, g, D_HEAD).astype(dtype)
  k = rng.randn(2, length, hkv, D_HEAD).astype(dtype)
  v = rng.randn(2, length, hkv, D_HEAD).astype(dtype)
  key_mask = np.ones((2, length), bool)
  for row, cols in invalid.items():
    key_mask[row, cols] = False
  cot = rng.randn(*q.shape).astype(dtype)
  return q, k, v, np.arange(length, dtype=np.int32), key_mask, window, chunk, cot


def _fn(impl, window, chunk):
  def fn(q, k, v, q_slots, key_mask):
    return attn.attend(impl, q, k, v, attn.AttentionMask(q_slots, key_mask),
                       sliding_window=window, scale=SCALE, chunk_size=chunk)
  return fn


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_matches_numpy_and_dense(case):
  q, k, v, q_slots, key_mask, window, chunk, cot = _case(case)
  args = [jnp.asarray(x) for x in (q, k, v, q_slots, key_mask)]
  want = np_attention(q, k, v, q_slots, key_mask, window, SCALE)
  dense = _fn("dense", window, chunk)
  splash = _fn("splash", window, chunk)
  rtol = SPLASH_DEPTH * tolerances.F32_EPS
  for name, fn in (("eager", splash), ("jit", jax.jit(splash))):
    got = np.asarray(fn(*args))
    assert got.dtype == np.float32 and got.shape == q.shape
    tolerances.assert_close_rel(got, want, rtol=rtol, what=f"{case} {name} vs numpy")
    tolerances.assert_close_rel(got, np.asarray(dense(*args)), rtol=rtol,
                                what=f"{case} {name} vs dense")

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, *args[3:]) * cot)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args[:3])

  ref = grads(dense)
  tolerances.assert_tree_close_rel(grads(splash), ref,
                                   rtol=SPLASH_GRAD_DEPTH * tolerances.F32_EPS,
                                   what=f"{case} grads")
  assert min(float(jnp.abs(x).max()) for x in ref) > 1e-3


def test_attend_routes_decoding_and_float64_and_rejects_bad_input():
  # Cached decoding (3 queries over 20 slots) goes to the chunked kernel.
  lq, s_len, offset, window, hkv, g, invalid = CASES["decode_three_window"]
  rng = np.random.RandomState(3)
  q = jnp.asarray(rng.randn(2, lq, hkv, g, D_HEAD), jnp.float32)
  k, v = (jnp.asarray(rng.randn(2, s_len, hkv, D_HEAD), jnp.float32) for _ in "kv")
  key_mask = np.ones((2, s_len), bool)
  for row, cols in invalid.items():
    key_mask[row, cols] = False
  args = (q, k, v, jnp.arange(offset, offset + lq, dtype=jnp.int32), jnp.asarray(key_mask))
  np.testing.assert_array_equal(_fn("splash", window, 4)(*args), _fn("chunked", window, 4)(*args))
  with pytest.raises(ValueError, match="key slots"):
    attn.splash_attention(
        q, k, v, attn.AttentionMask(args[3], args[4]), sliding_window=window,
        scale=SCALE, chunk_size=128)
  # float64 (exact-mode reference models) stays on the dense kernel.
  with jax.enable_x64(True):
    q64, k64, v64, q_slots, key_mask, window, chunk, _ = _case("gqa", dtype=np.float64)
    args64 = [jnp.asarray(x) for x in (q64, k64, v64, q_slots, key_mask)]
    got = _fn("splash", window, chunk)(*args64)
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(got, _fn("dense", window, chunk)(*args64))
  with pytest.raises(ValueError, match="chunk_size"):
    attn.splash_attention(
        q, q[:, :, :, 0], q[:, :, :, 0], attn.AttentionMask(jnp.arange(lq), jnp.ones((2, lq), bool)),
        sliding_window=None, scale=SCALE, chunk_size=0)


def test_bfloat16_and_block_sizes():
  # bfloat16 q/k/v with float32 softmax statistics in both kernels: they
  # differ by a few bfloat16 roundings of the output (4 eps_bf16 relative).
  q, k, v, q_slots, key_mask, window, chunk, _ = _case("sliding_window", seed=4)
  args = [jnp.asarray(x).astype(jnp.bfloat16) for x in (q, k, v)] + [
      jnp.asarray(q_slots), jnp.asarray(key_mask)]
  got = jax.jit(_fn("splash", window, chunk))(*args)
  assert got.dtype == jnp.bfloat16
  tolerances.assert_close_rel(np.asarray(got.astype(jnp.float32)),
                              np.asarray(_fn("dense", window, chunk)(*args).astype(jnp.float32)),
                              rtol=4 * tolerances.BF16_EPS, what="bfloat16 splash vs dense")
  # Blocks are whole TPU lane tiles: 128-slot multiples, at most the padded length.
  assert splash_attention.block_size(13, 512) == 128
  assert splash_attention.block_size(300, 512) == 384
  assert splash_attention.block_size(4096, 512) == 512
  assert splash_attention.block_size(4096, 200) == 256
