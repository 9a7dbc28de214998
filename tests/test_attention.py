"""Attention kernels against a numpy reference and against each other.

Every kernel of onpo_jax/models/attention.py (dense, chunked online softmax,
jax.nn.dot_product_attention) is compared with `np_attention`, a float64 loop
over (batch, query, head) written from the definition (masked softmax, a
query without visible keys averaging all values), and the new kernels with
the dense one, values and gradients, under jit and without, in float32 and
float64: causal self-attention with left padding, a sliding window, GQA, and
KV-cache decoding (one and three queries at a slot offset, unwritten slots).
Every kernel is also run through `attend_cache` on keys and values laid out
as the decoder's cache (keys [B, Hkv, d, S], values [B, Hkv, S, d]).

Tolerances (tests/tolerances.py conventions: eps × accumulation depth,
relative to the largest reference entry). Along the path to one output entry
the float32 accumulations are: the score q·k (d = 8 terms), the softmax
denominator and the weighted sum of values (S ≤ 20 terms each), and in the
chunked kernel one rescaling e^(m - m') per key block (≤ S of them with
blocks of one key): n = d + 3·S = 68. Two float32 implementations differ by
at most about n·eps relative to max |value| (outputs are convex combinations
of the values, and a score error δ moves them by at most δ·max |v|; the
scores are O(1) here, |q·k|/√d ≲ 3, so δ stays a few ulps). Gradients run
those accumulations again, transposed (2n), plus the sums over the Lq ≤ 13
queries into dk, dv and over a block's keys into dq (≤ S): n_grad = 2n + 13
+ 20 = 169, relative to each gradient's largest entry. float64 uses the same
depths with float64 eps. Observed: values ≤ 1.3e-7 and gradients ≤ 3.6e-7
relative in float32, ≤ 7e-16 in float64; a wrong mask or head mapping
changes outputs by > 1e-1.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from test_decoder import _batch
from onpo_jax.models import attention as attn
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec

D_HEAD = 8
MAX_S = 20
ATTN_DEPTH = D_HEAD + 3 * MAX_S
ATTN_GRAD_DEPTH = 2 * ATTN_DEPTH + 13 + MAX_S
EPS = {np.float32: tolerances.F32_EPS, np.float64: float(np.finfo(np.float64).eps)}
NEW_IMPLS = ("chunked", "dot_product_attention")
# Pallas's splash kernel is tested on its own in test_splash_attention.py
# (it runs interpreted on CPU) and here inside a whole decoder.
DECODER_IMPLS = NEW_IMPLS + ("splash",)


def _x64(dtype):
  return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


# ----------------------------------------------------------------- reference


def np_attention(q, k, v, q_slots, key_mask, window, scale):
  """float64 loops: out[b, i, h] = Σ_s softmax_s(score + mask) v[b, s, h // G].

  Key s is visible to query i when key_mask[b, s], s ≤ q_slots[i] and (with a
  window w) q_slots[i] - s < w. A query with no visible key averages all S
  values (the softmax of S equal masked scores).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_size, lq, hkv, g, _ = q.shape
  s_len = k.shape[1]
  out = np.zeros(q.shape)
  for b in range(b_size):
    for i in range(lq):
      vis = [bool(key_mask[b, s]) and s <= q_slots[i]
             and (window is None or q_slots[i] - s < window) for s in range(s_len)]
      for kh in range(hkv):
        for gi in range(g):
          if not any(vis):
            out[b, i, kh, gi] = v[b, :, kh].mean(axis=0)
            continue
          scores = np.array([q[b, i, kh, gi] @ k[b, s, kh] * scale if vis[s] else -np.inf
                             for s in range(s_len)])
          p = np.exp(scores - scores.max())
          p /= p.sum()
          out[b, i, kh, gi] = p @ v[b, :, kh]
  return out


# Cases: (name, Lq, S, slot offset, window, Hkv, G, invalid keys per row).
CASES = {
    # Self-attention, row 0 left-padded by 3 (three queries see nothing).
    "causal_left_pad": (13, 13, 0, None, 2, 1, {0: [0, 1, 2]}),
    # GQA (3 query heads per kv head) and a hole in row 1.
    "gqa": (13, 13, 0, None, 1, 3, {0: [0, 1], 1: [6]}),
    # Window 3: most key blocks of a query block are skipped.
    "sliding_window": (13, 13, 0, 3, 2, 2, {0: [0, 1, 2, 3]}),
    # Cached decoding: one query at slot 11 over 20 slots, 12..19 unwritten.
    "decode_one": (1, 20, 11, None, 2, 2, {0: [0, 1] + list(range(12, 20)),
                                           1: list(range(12, 20))}),
    # The same with one query head per kv head (multi-head attention) and a
    # window 4 that leaves row 1's query no visible key.
    "decode_one_mha": (1, 20, 11, 4, 2, 1, {0: [9] + list(range(12, 20)),
                                            1: list(range(8, 20))}),
    # Three queries at slots 9..11 with a window, 12..19 unwritten.
    "decode_three_window": (3, 20, 9, 4, 1, 2, {0: list(range(12, 20)),
                                                1: [0] + list(range(12, 20))}),
}


def _case(name, dtype, seed=0):
  return random_case(CASES[name], dtype, seed)


def random_case(spec, dtype, seed=0):
  """Random q, k, v, cotangent and the mask of a case given as in CASES."""
  lq, s_len, offset, window, hkv, g, invalid = spec
  rng = np.random.RandomState(seed)
  b = 2
  q = rng.randn(b, lq, hkv, g, D_HEAD).astype(dtype)
  k = rng.randn(b, s_len, hkv, D_HEAD).astype(dtype)
  v = rng.randn(b, s_len, hkv, D_HEAD).astype(dtype)
  key_mask = np.ones((b, s_len), bool)
  for row, cols in invalid.items():
    key_mask[row, cols] = False
  q_slots = (offset + np.arange(lq)).astype(np.int32)
  cot = rng.randn(*q.shape).astype(dtype)  # cotangent for the gradient checks
  return q, k, v, q_slots, key_mask, window, cot


def _kernel(impl, window, chunk_size):
  def fn(q, k, v, q_slots, key_mask):
    return attn.attend(impl, q, k, v, attn.AttentionMask(q_slots, key_mask),
                       sliding_window=window, scale=D_HEAD ** -0.5,
                       chunk_size=chunk_size)
  return fn


def _cache_kernel(impl, window, chunk_size):
  """`attend_cache` on keys [B, Hkv, d, S] and values [B, Hkv, S, d] (the cache)."""
  def fn(q, k_heads, v_heads, q_slots, key_mask):
    return attn.attend_cache(impl, q, k_heads, v_heads,
                             attn.AttentionMask(q_slots, key_mask),
                             sliding_window=window, scale=D_HEAD ** -0.5,
                             chunk_size=chunk_size)
  return fn


def _variants(case, use_jit):
  """(kernel, block size) pairs to run, dense first.

  Blocks of 4 divide neither 13 nor 20 (padded last blocks); blocks of one
  key and a single block (512) are run under jit on the window case, where
  block skipping matters most. Eager runs compile every op on its own, so
  they take the one chunked variant.
  """
  out = [("dense", 512), ("chunked", 4), ("dot_product_attention", 512)]
  if use_jit and case == "sliding_window":
    out += [("chunked", 1), ("chunked", 512)]
  return out


# ------------------------------------------------------------------- values


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_kernels_match_numpy_and_dense(case, dtype, use_jit):
  q, k, v, q_slots, key_mask, window, _ = _case(case, dtype)
  want = np_attention(q, k, v, q_slots, key_mask, window, D_HEAD ** -0.5)
  rtol = ATTN_DEPTH * EPS[dtype]
  with _x64(dtype):
    args = [jnp.asarray(x) for x in (q, k, v, q_slots, key_mask)]
    outs = {}
    for impl, chunk in _variants(case, use_jit):
      fn = _kernel(impl, window, chunk)
      got = np.asarray((jax.jit(fn) if use_jit else fn)(*args))
      assert got.dtype == dtype and got.shape == q.shape
      outs[impl, chunk] = got
      tolerances.assert_close_rel(got, want, rtol=rtol, what=f"{case} {impl}/{chunk} vs numpy")
    # The same attention over the decoder's cache: `cache_attention` for the
    # dense kernel and single queries, `attend` on the transposed cache else.
    heads = [jnp.asarray(np.transpose(k, (0, 2, 3, 1))), jnp.asarray(np.swapaxes(v, 1, 2))]
    for impl, chunk in _variants(case, use_jit):
      fn = _cache_kernel(impl, window, chunk)
      got = np.asarray((jax.jit(fn) if use_jit else fn)(args[0], *heads, *args[3:]))
      assert got.dtype == dtype and got.shape == q.shape
      outs["cache " + impl, chunk] = got
      tolerances.assert_close_rel(got, want, rtol=rtol,
                                  what=f"{case} cache {impl}/{chunk} vs numpy")
  for key, got in outs.items():
    tolerances.assert_close_rel(got, outs["dense", 512], rtol=rtol,
                                what=f"{case} {key} vs dense")
  # The cases really exercise queries without any visible key (left pads).
  if case in ("causal_left_pad", "sliding_window"):
    uniform = np.broadcast_to(v[0].astype(np.float64).mean(axis=0)[:, None],
                              outs["chunked", 4][0, 0].shape)
    tolerances.assert_close_rel(outs["chunked", 4][0, 0], uniform, rtol=rtol,
                                what=f"{case} query without visible keys")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_gradients_match_dense(case, dtype):
  q, k, v, q_slots, key_mask, window, cot = _case(case, dtype, seed=1)
  rtol = ATTN_GRAD_DEPTH * EPS[dtype]
  with _x64(dtype):
    args = [jnp.asarray(x) for x in (q, k, v)]
    rest = (jnp.asarray(q_slots), jnp.asarray(key_mask))

    def grads(impl, chunk):
      fn = _kernel(impl, window, chunk)
      loss = lambda q, k, v: jnp.sum(fn(q, k, v, *rest) * cot)  # noqa: E731
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    ref = grads("dense", 512)
    for impl, chunk in _variants(case, True)[1:]:
      got = grads(impl, chunk)
      assert all(x.dtype == dtype for x in got)
      tolerances.assert_tree_close_rel(got, ref, rtol=rtol,
                                       what=f"{case} {impl}/{chunk} grads")
    assert min(float(jnp.abs(x).max()) for x in ref) > 1e-3


def test_chunked_eager_gradients_and_bfloat16():
  # Without jit (the custom VJP runs op by op) and in bfloat16: scores and
  # accumulators stay float32, only q/k/v and the probabilities fed to the
  # value product are bfloat16, as in the dense kernel; the two differ by a
  # few bf16 roundings of the output: 4 · eps_bf16 relative.
  q, k, v, q_slots, key_mask, window, cot = _case("sliding_window", np.float32, seed=2)
  args = [jnp.asarray(x) for x in (q, k, v)]
  rest = (jnp.asarray(q_slots), jnp.asarray(key_mask))

  def loss(impl, dtype):
    fn = _kernel(impl, window, 4)
    return lambda q, k, v: jnp.sum(
        fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), *rest).astype(jnp.float32) * cot)

  ref = jax.grad(loss("dense", jnp.float32), argnums=(0, 1, 2))(*args)
  got = jax.grad(loss("chunked", jnp.float32), argnums=(0, 1, 2))(*args)
  tolerances.assert_tree_close_rel(got, ref, rtol=ATTN_GRAD_DEPTH * tolerances.F32_EPS,
                                   what="eager chunked grads")
  fwd = {impl: np.asarray(_kernel(impl, window, 4)(
      *[a.astype(jnp.bfloat16) for a in args], *rest).astype(jnp.float32))
         for impl in ("dense", "chunked", "dot_product_attention")}
  for impl in ("chunked", "dot_product_attention"):
    tolerances.assert_close_rel(fwd[impl], fwd["dense"], rtol=4 * tolerances.BF16_EPS,
                                what=f"bfloat16 {impl} vs dense")


def test_cache_attention_bfloat16():
  # A decoding step over a bfloat16 cache: the output stays bfloat16 and
  # differs from the dense kernel by a few bf16 roundings (the dense kernel
  # rounds the probabilities to bf16, the single-query sum keeps them
  # float32): 4 · eps_bf16 relative, as for the other kernels.
  q, k, v, q_slots, key_mask, window, _ = _case("decode_one", np.float32, seed=3)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  mask = attn.AttentionMask(jnp.asarray(q_slots), jnp.asarray(key_mask))
  kw = dict(sliding_window=window, scale=D_HEAD ** -0.5)
  got = attn.cache_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2), mask,
                             **kw)
  want = attn.dense_attention(q, k, v, mask, **kw)
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  tolerances.assert_close_rel(np.asarray(got, np.float32), np.asarray(want, np.float32),
                              rtol=4 * tolerances.BF16_EPS, what="bfloat16 cache vs dense")


def test_single_query_cache_attention_has_no_dot():
  # A decoding step's two products over the cache are multiply-and-reduce
  # loops (XLA:CPU vectorises them along the minor axis), not batched dots of
  # B·Hkv tiny matrices; a prefill's block of queries still uses dots.
  # With one query head per kv head (g = 1) the loops' operands carry no
  # size-1 group axis: XLA:CPU ran those broadcasts about 25x slower.
  for lq, g, dots in ((1, 3, 0), (1, 1, 0), (3, 3, 2)):
    q = jnp.zeros((2, lq, 2, g, D_HEAD), jnp.float32)
    k = jnp.zeros((2, 2, D_HEAD, 20), jnp.float32)
    v = jnp.zeros((2, 2, 20, D_HEAD), jnp.float32)
    mask = attn.AttentionMask(jnp.arange(lq, dtype=jnp.int32) + 5, jnp.ones((2, 20), bool))
    jaxpr = jax.make_jaxpr(functools.partial(attn.cache_attention, sliding_window=None,
                                             scale=1.0))(q, k, v, mask)
    found = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(found) == dots, (lq, g, found)
    if g == 1:
      products = [e.outvars[0].aval.shape for e in jaxpr.jaxpr.eqns if e.primitive.name == "mul"]
      assert products and all(len(shape) == 4 for shape in products), products


def test_cache_attention_checks_values_against_keys():
  # Keys [B, Hkv, d, S] and values [B, Hkv, S, d] must agree on every axis.
  q = jnp.zeros((2, 1, 2, 3, D_HEAD), jnp.float32)
  k = jnp.zeros((2, 2, D_HEAD, 20), jnp.float32)
  mask = attn.AttentionMask(jnp.asarray([5], jnp.int32), jnp.ones((2, 20), bool))
  kw = dict(sliding_window=None, scale=1.0)
  assert attn.cache_attention(q, k, jnp.zeros((2, 2, 20, D_HEAD)), mask, **kw).shape == q.shape
  for bad in ((1, 2, 20, D_HEAD), (2, 3, 20, D_HEAD), (2, 2, 19, D_HEAD), (2, 2, D_HEAD, 20)):
    with pytest.raises(ValueError, match="q / k / v"):
      attn.cache_attention(q, k, jnp.zeros(bad), mask, **kw)


def test_has_visible_key_and_bad_inputs():
  key_mask = jnp.asarray([[False, False, True, True, False, True]])
  m = attn.AttentionMask(jnp.arange(6, dtype=jnp.int32), key_mask)
  np.testing.assert_array_equal(attn.has_visible_key(m, None)[0],
                                [False, False, True, True, True, True])
  # Window 1: only the query's own slot.
  np.testing.assert_array_equal(attn.has_visible_key(m, 1)[0],
                                [False, False, True, True, False, True])
  q = jnp.zeros((1, 6, 1, 1, 4))
  kv = jnp.zeros((1, 6, 1, 4))
  with pytest.raises(ValueError, match="chunk_size"):
    attn.chunked_attention(q, kv, kv, m, sliding_window=None, scale=1.0, chunk_size=0)
  with pytest.raises(ValueError, match="mask"):
    attn.dense_attention(q, kv, kv, attn.AttentionMask(jnp.arange(5), key_mask),
                         sliding_window=None, scale=1.0)
  with pytest.raises(ValueError, match="attention_impl"):
    attn.attend("flash", q, kv, kv, m, sliding_window=None, scale=1.0, chunk_size=4)


def test_chunked_never_builds_the_score_matrix():
  # Forward + backward of one head group at L = 2048: dense keeps [B, Hkv, G,
  # L, L] float32 scores (2 · 4 · 2048² · 4 B = 134 MB, and its softmax);
  # chunked blocks of 256 are 2 · 4 · 256² · 4 B = 2 MB each.
  b, l, hkv, g, d = 1, 2048, 2, 2, 16
  q = jax.ShapeDtypeStruct((b, l, hkv, g, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, l, hkv, d), jnp.float32)
  mask = attn.AttentionMask(jax.ShapeDtypeStruct((l,), jnp.int32),
                            jax.ShapeDtypeStruct((b, l), jnp.bool_))
  scores_bytes = b * hkv * g * l * l * 4

  def temp_bytes(impl):
    def loss(q, k, v, m):
      return jnp.sum(attn.attend(impl, q, k, v, m, sliding_window=None, scale=0.25,
                                 chunk_size=256))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

  dense, chunked = temp_bytes("dense"), temp_bytes("chunked")
  assert dense >= scores_bytes  # the check can fail: dense really builds them
  assert chunked < scores_bytes / 10, (chunked, scores_bytes)


# ------------------------------------------------------------- whole decoder


def _make(cfg, seed=0):
  return dec.Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(seed, impl="unsafe_rbg")))



@pytest.mark.parametrize("sliding_window", [None, 3])
def test_decoder_with_each_kernel(sliding_window):
  # Logits, a cached decode and the gradients of a log-prob loss of the same
  # weights agree across kernels (chunked with blocks of 4 over 9 positions),
  # at the whole-decoder bounds of tests/tolerances.py.
  base = config_lib.DecoderConfig.tiny(vocab_size=128, num_heads=4, num_kv_heads=2,
                                       sliding_window=sliding_window, attention_chunk_size=4)
  tokens, pos, mask = _batch(128, l=9, pad=(3, 0))
  results = {}
  for impl in ("dense",) + DECODER_IMPLS:
    # The kernel is static model config; the same seed gives the same weights.
    g, s = nnx.split(_make(base.replace(attention_impl=impl), 1))

    @jax.jit
    def run(s, g=g):
      m = nnx.merge(g, s)
      logits, _ = m(tokens, pos, mask)
      cache = dec.init_cache(m.config, 2, 12)
      lg, cache = m(tokens[:, :6], pos[:, :6], mask[:, :6], cache)
      steps = [lg]
      for t in range(6, 9):
        lg, cache = m(tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(lg)
      loss = lambda s: nnx.merge(g, s).token_logprobs(tokens, pos, mask).sum()  # noqa: E731
      return logits, jnp.concatenate(steps, axis=1), jax.grad(loss)(s)

    results[impl] = run(s)
  real = np.asarray(mask)
  ref_logits, _, ref_grads = results["dense"]
  for impl in DECODER_IMPLS:
    logits, cached, grads = results[impl]
    tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref_logits), mask=real,
                                rtol=tolerances.DECODER_RTOL, what=f"{impl} logits")
    tolerances.assert_close_rel(np.asarray(cached), np.asarray(ref_logits), mask=real,
                                rtol=tolerances.DECODER_RTOL, what=f"{impl} cached decode")
    tolerances.assert_tree_close_rel(grads, ref_grads, rtol=tolerances.DECODER_GRAD_RTOL,
                                     what=f"{impl} grads")


def test_config_field_is_runtime_only():
  cfg = config_lib.DecoderConfig.tiny(attention_impl="chunked", attention_chunk_size=64)
  hash(cfg)
  d = cfg.to_hf_dict()
  assert not any(k.startswith("attention_impl") or k.startswith("attention_chunk")
                 for k in d)
  again = config_lib.DecoderConfig.from_hf(d)
  assert again.attention_impl == "dense" and again == cfg.replace(
      attention_impl="dense", attention_chunk_size=512)
  assert config_lib.DecoderConfig.from_hf(d, attention_impl="chunked").attention_impl == "chunked"
  assert set(config_lib.ATTENTION_IMPLS) == set(attn.IMPLEMENTATIONS)
  with pytest.raises(ValueError, match="attention_impl"):
    config_lib.DecoderConfig.tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_chunk_size"):
    config_lib.DecoderConfig.tiny(attention_chunk_size=0)
