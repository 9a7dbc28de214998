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
from test_attention import CASES, D_HEAD, _case, _kernel, np_attention, random_case
from onpo_jax.models import attention as attn
from onpo_jax.models import splash_attention

MAX_S = 140
SPLASH_DEPTH = D_HEAD + 1 + 3 * MAX_S
SPLASH_GRAD_DEPTH = 2 * SPLASH_DEPTH + 2 * MAX_S
SCALE = D_HEAD ** -0.5  # the scale of test_attention's `_kernel`
CHUNK = 128  # one block of the kernel's 128-slot tiles

# Self-attention cases, in test_attention's CASES format. The first three are
# its own (one block after padding to 128); "two_blocks" pads 140 slots to 2
# blocks of 128, with a window of 40 that hides whole blocks and 30 left pads
# (queries that see no key).
SPLASH_CASES = {name: CASES[name] for name in ("causal_left_pad", "gqa", "sliding_window")}
SPLASH_CASES["two_blocks"] = (140, 140, 0, 40, 2, 2, {0: list(range(30)), 1: [70]})


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_matches_numpy_and_dense(case):
  q, k, v, q_slots, key_mask, window, cot = random_case(SPLASH_CASES[case], np.float32)
  args = [jnp.asarray(x) for x in (q, k, v, q_slots, key_mask)]
  want = np_attention(q, k, v, q_slots, key_mask, window, SCALE)
  dense = _kernel("dense", window, CHUNK)
  splash = _kernel("splash", window, CHUNK)
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
  q, k, v, q_slots, key_mask, window, _ = _case("decode_three_window", np.float32, seed=3)
  args = [jnp.asarray(x) for x in (q, k, v, q_slots, key_mask)]
  np.testing.assert_array_equal(_kernel("splash", window, 4)(*args),
                                _kernel("chunked", window, 4)(*args))
  with pytest.raises(ValueError, match="key slots"):
    attn.splash_attention(
        q, k, v, attn.AttentionMask(args[3], args[4]), sliding_window=window,
        scale=SCALE, chunk_size=128)
  # float64 (exact-mode reference models) stays on the dense kernel.
  with jax.enable_x64(True):
    q64, k64, v64, q_slots64, key_mask64, window64, _ = _case("gqa", np.float64)
    args64 = [jnp.asarray(x) for x in (q64, k64, v64, q_slots64, key_mask64)]
    got = _kernel("splash", window64, CHUNK)(*args64)
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(got, _kernel("dense", window64, CHUNK)(*args64))
  with pytest.raises(ValueError, match="chunk_size"):
    attn.splash_attention(
        args[0], args[0][:, :, :, 0], args[0][:, :, :, 0],
        attn.AttentionMask(args[3], jnp.ones((2, len(q_slots)), bool)),
        sliding_window=None, scale=SCALE, chunk_size=0)


def test_bfloat16_and_block_sizes():
  # bfloat16 q/k/v with float32 softmax statistics in both kernels: they
  # differ by a few bfloat16 roundings of the output (4 eps_bf16 relative).
  q, k, v, q_slots, key_mask, window, _ = _case("sliding_window", np.float32, seed=4)
  args = [jnp.asarray(x).astype(jnp.bfloat16) for x in (q, k, v)] + [
      jnp.asarray(q_slots), jnp.asarray(key_mask)]
  got = jax.jit(_kernel("splash", window, CHUNK))(*args)
  assert got.dtype == jnp.bfloat16
  tolerances.assert_close_rel(np.asarray(got.astype(jnp.float32)),
                              np.asarray(_kernel("dense", window, CHUNK)(*args).astype(jnp.float32)),
                              rtol=4 * tolerances.BF16_EPS, what="bfloat16 splash vs dense")
  # Blocks are whole TPU lane tiles: 128-slot multiples, at most the padded length.
  assert splash_attention.block_size(13, 512) == 128
  assert splash_attention.block_size(300, 512) == 384
  assert splash_attention.block_size(4096, 512) == 512
  assert splash_attention.block_size(4096, 200) == 256
