"""Decoder math against independent numpy references, KV cache, remat, dtypes.

Tolerances: pure functions on O(1) inputs are compared with float64 numpy
references at rtol/atol 1e-5 in float32 (a few ulps of O(1) values after O(10)
accumulated products; rtol makes it relative) and 1e-12 in float64. Whole-model
float32 comparisons (cache vs full forward, chunked vs unchunked, remat) sum the
same terms in a different order: their rounding is proportional to the
magnitude of the logits / gradients, so they are bounded relative to it by
tests/tolerances.py (float32 eps × the accumulation depth of these tiny
decoders, with the derivation there).
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec
from onpo_jax.models import layers
from onpo_jax.models import rope
import tolerances

F32_TOL = 1e-5
F64_TOL = 1e-12


def _x64(dtype):
  return jax.enable_x64(True) if dtype == np.float64 else (
      contextlib.nullcontext())


def _maybe_jit(fn, use_jit, **kw):
  return jax.jit(fn, **kw) if use_jit else fn


# ---------------------------------------------------------------- numpy refs


def np_positions(mask):
  """Index of the latest real token among real tokens (0 before any)."""
  out = np.zeros(mask.shape, np.int64)
  for b in range(mask.shape[0]):
    seen = 0
    for t in range(mask.shape[1]):
      seen += int(mask[b, t])
      out[b, t] = max(seen - 1, 0)
  return out


def np_rms_norm(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps)


def np_rope(x, positions, inv_freq):
  """Rotates pairs (i, i + d/2) by angle p·inv_freq[i], written per pair."""
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for i in range(half):
    ang = positions[..., None] * inv_freq[i]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * c - b * s
    out[..., i + half] = b * c + a * s
  return out


def np_llama3_inv_freq(d, theta, factor, low, high, old_len):
  out = []
  for i in range(0, d, 2):
    f = theta ** (-i / d)
    wavelen = 2 * math.pi / f
    if wavelen < old_len / high:
      out.append(f)
    elif wavelen > old_len / low:
      out.append(f / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def np_aligned_logprobs(logits, tokens, mask):
  """out[b, t] = log softmax(logits[b, t-1])[tokens[b, t]] on valid pairs."""
  b, l, _ = logits.shape
  out = np.zeros((b, l))
  for i in range(b):
    for t in range(1, l):
      if not (mask[i, t] and mask[i, t - 1]):
        continue
      z = logits[i, t - 1]
      lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
      out[i, t] = z[tokens[i, t]] - lse
  return out


# ------------------------------------------------------------- pure functions


@pytest.mark.parametrize("use_jit", [False, True])
def test_positions_from_mask(use_jit):
  rng = np.random.RandomState(0)
  mask = rng.rand(4, 9) > 0.3
  mask[0, :3] = False  # left padding
  got = np.asarray(_maybe_jit(dec.positions_from_mask, use_jit)(
      jnp.asarray(mask)))
  np.testing.assert_array_equal(got, np_positions(mask))
  assert got.dtype == np.int32
  # The first real token of a left-padded row has position 0.
  first = int(np.argmax(mask[0]))
  assert got[0, first] == 0 and got[0, first + 1:][mask[0, first + 1:]][0] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_rms_norm(dtype, use_jit):
  rng = np.random.RandomState(1)
  x = rng.randn(2, 3, 16).astype(dtype)
  scale = (1 + 0.3 * rng.randn(16)).astype(dtype)
  tol = F32_TOL if dtype == np.float32 else F64_TOL
  with _x64(dtype):
    fn = _maybe_jit(lambda x, s: layers.rms_norm(x, s, 1e-5), use_jit)
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(scale)))
  assert got.dtype == dtype
  want = np_rms_norm(x.astype(np.float64), scale.astype(np.float64), 1e-5)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_apply_rope(dtype, use_jit):
  rng = np.random.RandomState(2)
  x = rng.randn(2, 5, 3, 8).astype(dtype)
  pos = rng.randint(0, 50, (2, 5))
  inv = rope.rope_inv_freq(8, 10000.0)
  with _x64(dtype):
    fn = _maybe_jit(rope.apply_rope, use_jit)
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv)))
  assert got.dtype == dtype
  want = np_rope(x.astype(np.float64), pos, inv.astype(np.float64))
  # float32: angles p·θ up to 50 carry ~4e-6 rounding, hence 2e-5.
  tol = 2e-5 if dtype == np.float32 else F64_TOL
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("window", [None, 2])
def test_attention_weights_mask(use_jit, window):
  rng = np.random.RandomState(4)
  key_mask = rng.rand(2, 6) > 0.3
  q_slots = np.array([3, 4, 5])
  fn = _maybe_jit(layers.attention_weights_mask, use_jit,
                  static_argnums=3)
  got = np.asarray(fn(jnp.asarray(q_slots), jnp.arange(6),
                      jnp.asarray(key_mask), window))
  want = np.zeros((2, 3, 6), bool)
  for b in range(2):
    for i, q in enumerate(q_slots):
      for k in range(6):
        want[b, i, k] = (key_mask[b, k] and k <= q
                         and (window is None or q - k < window))
  np.testing.assert_array_equal(got, want)


def test_rope_inv_freq_llama3_and_linear():
  got = rope.rope_inv_freq(
      16, 500000.0, (("factor", 8.0), ("high_freq_factor", 4.0),
                     ("low_freq_factor", 1.0),
                     ("original_max_position_embeddings", 64),
                     ("rope_type", "llama3")))
  want = np_llama3_inv_freq(16, 500000.0, 8.0, 1.0, 4.0, 64)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The three bands are all exercised at these settings.
  base = np_llama3_inv_freq(16, 500000.0, 1.0, 1.0, 4.0, 64)
  ratio = want / base
  assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 1 / 8))
  assert np.any((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3))
  lin = rope.rope_inv_freq(8, 100.0, (("factor", 2.0), ("rope_type", "linear")))
  np.testing.assert_allclose(lin, 100.0 ** (-np.arange(0, 8, 2) / 8) / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="head_dim"):
    rope.rope_inv_freq(7, 10.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
@pytest.mark.parametrize("first_target", [1, 5])
def test_chunked_token_logprobs_vs_numpy(dtype, use_jit, chunk_size, first_target):
  rng = np.random.RandomState(3)
  b, l, d, v = 2, 8, 6, 11
  h = rng.randn(b, l, d).astype(dtype)
  w = rng.randn(d, v).astype(dtype)
  tokens = rng.randint(0, v, (b, l))
  mask = np.ones((b, l), bool)
  mask[1, :2] = False
  with _x64(dtype):
    def fn(h, w, tokens, mask):
      return dec.chunked_token_logprobs(h, tokens, mask, lambda x: x @ w,
                                        chunk_size, first_target)
    got = np.asarray(_maybe_jit(fn, use_jit)(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(tokens),
        jnp.asarray(mask)))
  assert got.dtype == dtype
  want = np_aligned_logprobs(h.astype(np.float64) @ w.astype(np.float64),
                             tokens, mask)
  # Targets before first_target are not computed: 0, as masked positions are.
  want[:, :first_target] = 0.0
  tol = F32_TOL if dtype == np.float32 else F64_TOL
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  assert np.all(got[:, 0] == 0) and np.all(got[1, :3] == 0)
  assert np.all(got[0, first_target:] != 0)  # row 0 has no padding


def test_chunked_token_logprobs_bad_inputs():
  h = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="attention_mask"):
    dec.chunked_token_logprobs(h, jnp.zeros((2, 4), jnp.int32),
                               jnp.ones((2, 5), bool), lambda x: x)
  with pytest.raises(ValueError, match="chunk_size"):
    dec.chunked_token_logprobs(h, jnp.zeros((2, 4), jnp.int32),
                               jnp.ones((2, 4), bool), lambda x: x, 0)
  for first in (0, 5, 2.0, True):
    with pytest.raises(ValueError, match=r"first_target: expected an int in \[1, 4\]"):
      dec.chunked_token_logprobs(h, jnp.zeros((2, 4), jnp.int32),
                                 jnp.ones((2, 4), bool), lambda x: x, None, first)
  # first_target = L: no target left, all zeros.
  out = dec.chunked_token_logprobs(h, jnp.zeros((2, 4), jnp.int32),
                                   jnp.ones((2, 4), bool), lambda x: x, None, 4)
  assert out.shape == (2, 4) and not np.any(np.asarray(out))


# -------------------------------------------------------------- whole model
# Models are built with one jitted init and run under jit: eager op-by-op
# execution compiles every primitive separately and dominates test time.


def _make(cfg, seed=0):
  # unsafe_rbg keys compile far faster than threefry on CPU; eager init
  # compiles one kernel per parameter shape, shared by tests of equal shapes.
  return dec.Decoder(cfg, rngs=nnx.Rngs(
      params=jax.random.key(seed, impl="unsafe_rbg")))


def _batch(vocab, b=2, l=7, pad=(2, 0), seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, vocab, (b, l)).astype(np.int32)
  mask = np.ones((b, l), bool)
  for i, p in enumerate(pad):
    mask[i, :p] = False
    tokens[i, :p] = 0
  pos = np.asarray(dec.positions_from_mask(jnp.asarray(mask)))
  return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(mask)


def _forward(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t, p, m, c: nnx.merge(graphdef, s)(t, p, m, c))
  return lambda t, p, m, c=None: fn(state, t, p, m, c)


def test_token_logprobs_model():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  graphdef, state = nnx.split(_make(cfg))
  tokens, pos, mask = _batch(128)

  def loss(state, chunk):
    return nnx.merge(graphdef, state).token_logprobs(
        tokens, pos, mask, chunk_size=chunk).sum()

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    logits, none = model(tokens, pos, mask)
    assert none is None
    return (logits, model.token_logprobs(tokens, pos, mask),
            model.token_logprobs(tokens, pos, mask, chunk_size=4),
            jax.grad(loss)(state, None), jax.grad(loss)(state, 4))

  logits, full, chunked, g1, g4 = run(state)
  assert logits.dtype == jnp.float32 and full.dtype == jnp.float32
  want = np_aligned_logprobs(np.asarray(logits, np.float64),
                             np.asarray(tokens), np.asarray(mask))
  # token_logprobs recomputes the forward and a log-sum-exp over 128 entries:
  # relative to |logit| + |log-prob| (tolerances.LOGPROB_RTOL).
  lp_scale = tolerances.logprob_scale(logits, want)
  tolerances.assert_close_rel(full, want, rtol=tolerances.LOGPROB_RTOL,
                              scale=lp_scale, what="token_logprobs")
  tolerances.assert_close_rel(chunked, full, rtol=tolerances.LOGPROB_RTOL,
                              scale=lp_scale, what="chunked token_logprobs")
  # Gradients through the rematerialised chunks match the single chunk.
  tolerances.assert_tree_close_rel(g4, g1, rtol=tolerances.DECODER_GRAD_RTOL,
                                   what="chunked grads")
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-3


def test_token_logprobs_from_a_first_target_skip_the_earlier_positions():
  """Response-only log-probs: the same values and gradients, fewer unembedded rows."""
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  graphdef, state = nnx.split(_make(cfg))
  tokens, pos, mask = _batch(128, l=9)
  first = 5
  later = np.arange(9) >= first

  def lp(state, chunk, first_target):
    return nnx.merge(graphdef, state).token_logprobs(
        tokens, pos, mask, chunk_size=chunk, first_target=first_target)

  def loss(state, chunk, first_target):
    return jnp.sum(jnp.where(later, lp(state, chunk, first_target), 0.0))

  @jax.jit
  def run(state):
    logits, _ = nnx.merge(graphdef, state)(tokens, pos, mask)
    return (logits, lp(state, None, 1), lp(state, None, first), lp(state, 2, first),
            jax.grad(loss)(state, None, 1), jax.grad(loss)(state, None, first),
            jax.grad(loss)(state, 2, first))

  logits, full, skipped, chunked, g_full, g_skipped, g_chunked = run(state)
  assert not np.any(np.asarray(skipped)[:, :first])
  # The kept positions are the same math on a subset of rows (LOGPROB_RTOL,
  # relative to |logit| + |log-prob| as in test_token_logprobs_model).
  lp_scale = tolerances.logprob_scale(logits, full)
  for got, what in ((skipped, "first_target"), (chunked, "chunked first_target")):
    tolerances.assert_close_rel(got, full, rtol=tolerances.LOGPROB_RTOL, scale=lp_scale,
                                mask=np.broadcast_to(later, full.shape), what=what)
  for got, what in ((g_skipped, "first_target grads"), (g_chunked, "chunked grads")):
    tolerances.assert_tree_close_rel(got, g_full, rtol=tolerances.DECODER_GRAD_RTOL, what=what)

  # Only the L - first targets are unembedded: the products with the
  # vocabulary axis have B·(L - first) rows, against B·(L - 1) from 1.
  def unembedded_rows(first_target):
    jaxpr = jax.make_jaxpr(lambda s: loss(s, None, first_target))(state)
    rows = {int(np.prod(e.outvars[0].aval.shape[:-1])) for e in jaxpr.eqns
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == 128}
    assert len(rows) == 1, rows
    return rows.pop()
  assert unembedded_rows(first) == 2 * (9 - first)
  assert unembedded_rows(1) == 2 * 8


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_cache_matches_full_forward(sliding_window):
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128,
                                      sliding_window=sliding_window)
  step = _forward(_make(cfg, 1))
  tokens, pos, mask = _batch(128, l=8)
  full, _ = step(tokens, pos, mask)
  cache = dec.init_cache(cfg, 2, 10)
  outs = []
  logits, cache = step(tokens[:, :4], pos[:, :4], mask[:, :4], cache)
  outs.append(logits)
  for t in range(4, 8):  # decode one token at a time
    logits, cache = step(tokens[:, t:t + 1], pos[:, t:t + 1],
                         mask[:, t:t + 1], cache)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  real = np.asarray(mask)
  tolerances.assert_close_rel(np.asarray(got), np.asarray(full), mask=real,
                              rtol=tolerances.DECODER_RTOL,
                              what="cached decode vs full forward")
  assert int(cache.index) == 8
  np.testing.assert_array_equal(cache.mask[:, :8], mask)
  assert not cache.mask[:, 8:].any()


def test_sliding_window_changes_logits():
  base = config_lib.DecoderConfig.tiny(vocab_size=128)
  tokens, pos, mask = _batch(128, l=8, pad=(0, 0))
  full = _forward(_make(base, 1))(tokens, pos, mask)[0]
  win = _forward(_make(base.replace(sliding_window=3), 1))(
      tokens, pos, mask)[0]
  # Positions < window see the same keys; later ones do not.
  tolerances.assert_close_rel(win[:, :3], full[:, :3],
                              rtol=tolerances.DECODER_RTOL,
                              what="sliding window, first positions")
  assert np.abs(np.asarray(win[:, 3:] - full[:, 3:])).max() > 1e-3


def test_init_cache_and_donation():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  cache = dec.init_cache(cfg, 3, 6)
  # One buffer per layer for keys [B, kv heads, head_dim, slots] and values
  # [B, kv heads, slots, head_dim], none shared (donated).
  leaves = cache.k + cache.v
  assert len(cache.k) == len(cache.v) == 2
  assert all(x.shape == (3, 2, 8, 6) for x in cache.k)
  assert all(x.shape == (3, 2, 6, 8) for x in cache.v)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert len({id(x) for x in leaves}) == 4
  assert cache.mask.shape == (3, 6) and cache.mask.dtype == jnp.bool_
  assert cache.index.dtype == jnp.int32 and int(cache.index) == 0
  assert dec.init_cache(cfg, 1, 2, jnp.bfloat16).v[1].dtype == jnp.bfloat16
  m = _make(cfg)
  graphdef, state = nnx.split(m)
  step = jax.jit(lambda s, t, p, mk, c: nnx.merge(graphdef, s)(t, p, mk, c),
                 donate_argnums=4)
  t = jnp.ones((3, 2), jnp.int32)
  _, cache = step(state, t, jnp.zeros_like(t), jnp.ones((3, 2), bool), cache)
  assert int(cache.index) == 2
  with pytest.raises(ValueError, match="overflows"):
    m(jnp.ones((3, 5), jnp.int32), jnp.zeros((3, 5), jnp.int32),
      jnp.ones((3, 5), bool), cache)
  with pytest.raises(ValueError, match="batch"):
    m(t[:2], t[:2], jnp.ones((2, 2), bool), cache)
  # A cache of another model, or laid out [layers, B, S, kv heads, d].
  other = dec.init_cache(cfg.replace(num_layers=3), 3, 6)
  with pytest.raises(ValueError, match=r"cache\.k: expected 2 arrays of shape"):
    m(t, t, jnp.ones((3, 2), bool), other)
  stacked = cache._replace(v=jnp.stack(cache.v).transpose(0, 1, 3, 2, 4))
  with pytest.raises(ValueError, match=r"cache\.v: expected 2 arrays"):
    m(t, t, jnp.ones((3, 2), bool), stacked)
  # Keys laid out like the values (slots before head_dim).
  value_layout = cache._replace(k=tuple(jnp.swapaxes(x, 2, 3) for x in cache.k))
  with pytest.raises(ValueError, match=r"cache\.k: expected 2 arrays of shape \(3, 2, 8, 6\)"):
    m(t, t, jnp.ones((3, 2), bool), value_layout)


def test_bad_inputs():
  model = _make(config_lib.DecoderConfig.tiny(vocab_size=128))
  t = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="positions"):
    model(t, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match="attention_mask"):
    model(t, t, jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="tokens"):
    model(t.astype(jnp.float32), t, jnp.ones((2, 3), bool))


def test_remat_same_values_and_grads():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  tokens, pos, mask = _batch(128)
  grads = []
  for remat in (False, True):
    graphdef, state = nnx.split(_make(cfg.replace(remat=remat), 2))
    loss = lambda s: nnx.merge(graphdef, s)(tokens, pos, mask)[0].sum()
    grads.append(jax.jit(jax.value_and_grad(loss))(state))
    # One rematerialised region per block, and none without remat.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
    assert jaxpr.count("remat") == (cfg.num_layers if remat else 0)
  # Same ops recomputed: equal up to float32 reassociation. The loss (a sum of
  # 14 × 128 logits) at rtol 1e-6 ≈ 8 ulps of itself; the gradients relative to
  # each leaf's largest entry (tolerances.DECODER_GRAD_RTOL).
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
  tolerances.assert_tree_close_rel(grads[1][1], grads[0][1],
                                   rtol=tolerances.DECODER_GRAD_RTOL,
                                   what="remat grads")

def test_remat_model_samples_like_the_plain_one():
  # Remat only changes the backward pass: a cached decode (the sampler's
  # while_loop) of a remat=True model gives the same tokens as remat=False.
  from onpo_jax import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  tokens, _, mask = _batch(128)
  outs = []
  for remat in (False, True):
    model = _make(cfg.replace(remat=remat), 2)
    graphdef, state = nnx.split(model)
    smp = sampler_lib.Sampler(graphdef, sampler_lib.SamplingConfig(
        max_new_tokens=5, prompt_buckets=(tokens.shape[1],)), model_config=model.config)
    outs.append(np.asarray(smp(state, tokens, mask, jax.random.key(3)).response_tokens))
  np.testing.assert_array_equal(outs[1], outs[0])


def test_bfloat16_params_and_compute():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128)
  tokens, pos, mask = _batch(128)
  ref = _forward(_make(cfg, 3))(tokens, pos, mask)[0]
  m = _make(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), 3)
  assert m.embed[...].dtype == jnp.bfloat16
  graphdef, state = nnx.split(m)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    return (model(tokens, pos, mask)[0],
            model.token_logprobs(tokens, pos, mask, chunk_size=2))

  logits, lp = run(state)
  assert logits.dtype == jnp.float32 and lp.dtype == jnp.float32
  # Same initial weights rounded to bfloat16 (8 significant bits, eps 2**-7):
  # the logits agree to a few bf16 ulps of their scale, 4 · eps = 3.1e-2
  # relative to max |logit| (observed ~5e-3; the bound was 2e-2 absolute on
  # logits of size ~0.4, i.e. 5e-2 relative).
  real = np.asarray(mask)
  tolerances.assert_close_rel(np.asarray(logits), np.asarray(ref), mask=real,
                              rtol=4 * tolerances.BF16_EPS, what="bfloat16 logits")
  assert np.abs(np.asarray(logits - ref)[real]).max() > 0  # really bf16


# --------------------------------------------------------------------- config


def test_config_roundtrip_and_errors():
  cfg = config_lib.DecoderConfig.tiny(
      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16},
      eos_token_ids=[2, 5])
  hash(cfg)  # usable as a jit static argument
  assert cfg.eos_token_ids == (2, 5)
  again = config_lib.DecoderConfig.from_hf(cfg.to_hf_dict())
  assert again == cfg
  with pytest.raises(ValueError, match="model_type"):
    config_lib.DecoderConfig.tiny(model_type="gpt2")
  with pytest.raises(ValueError, match="num_kv_heads"):
    config_lib.DecoderConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    config_lib.DecoderConfig.tiny(dtype="float16")
  with pytest.raises(ValueError, match="attention_bias"):
    config_lib.DecoderConfig.tiny(model_type="qwen2")
  with pytest.raises(NotImplementedError, match="rope_type"):
    config_lib.DecoderConfig.tiny(rope_scaling={"rope_type": "yarn",
                                                "factor": 2.0})
  with pytest.raises(NotImplementedError, match="attention_bias"):
    config_lib.DecoderConfig.tiny(attention_bias=True)
  with pytest.raises(ValueError, match="hidden_size"):
    config_lib.DecoderConfig.from_hf({"model_type": "llama"})


def test_chunked_logprobs_never_materialise_full_logits():
  # A 128k vocabulary, as in Llama 3: the full [B, L, V] float32 logits are
  # 2 × 256 × 128256 × 4 B = 263 MB; a chunk of 8 positions is 8 MB.
  cfg = config_lib.DecoderConfig.tiny(vocab_size=128256, num_layers=1,
                                      hidden_size=16, intermediate_size=16,
                                      num_heads=2, num_kv_heads=1)
  abstract = nnx.eval_shape(lambda: dec.Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  b, l = 2, 256
  tokens = jax.ShapeDtypeStruct((b, l), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, l), jnp.bool_)
  full_bytes = b * l * cfg.vocab_size * 4

  def temp_bytes(chunk):
    def loss(s, t, m):
      return nnx.merge(graphdef, s).token_logprobs(
          t, dec.positions_from_mask(m), m, chunk_size=chunk).sum()
    compiled = jax.jit(jax.grad(loss)).lower(state, tokens, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked, unchunked = temp_bytes(8), temp_bytes(None)
  assert unchunked >= full_bytes  # the check can fail: one chunk = all logits
  # What remains (~36 MB observed) is a few chunk-sized buffers and the
  # 8 MB embedding / unembedding gradients, independent of L.
  assert chunked < full_bytes / 5, (chunked, full_bytes)


def test_single_chunk_logprobs_are_not_rematerialised():
  # One chunk holds all the logits anyway: the backward pass reuses them
  # instead of recomputing the unembedding (no checkpoint, no scan); several
  # chunks keep the rematerialised scan.
  h = jnp.ones((2, 5, 3))
  w = jnp.ones((3, 7))
  tokens = jnp.zeros((2, 5), jnp.int32)
  mask = jnp.ones((2, 5), bool)

  def jaxpr(chunk):
    loss = lambda h, w: dec.chunked_token_logprobs(  # noqa: E731
        h, tokens, mask, lambda x: x @ w, chunk).sum()
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w))

  for chunk in (None, 4, 100):
    text = jaxpr(chunk)
    assert "remat" not in text and "checkpoint" not in text and "scan" not in text
  text = jaxpr(2)
  assert "scan" in text and ("remat" in text or "checkpoint" in text)


def test_token_logprobs_of_ids_outside_the_vocabulary_are_nan():
  # As a gather out of bounds would: a wrong id must not pass as -logsumexp.
  rng = np.random.RandomState(5)
  h = jnp.asarray(rng.randn(1, 4, 3), jnp.float32)
  w = jnp.asarray(rng.randn(3, 7), jnp.float32)
  tokens = jnp.asarray([[1, 7, 2, -1]], jnp.int32)
  for chunk in (None, 2):
    out = np.asarray(dec.chunked_token_logprobs(
        h, tokens, jnp.ones((1, 4), bool), lambda x: x @ w, chunk))
    assert np.isnan(out[0, 1]) and np.isnan(out[0, 3]) and np.isfinite(out[0, 2])
