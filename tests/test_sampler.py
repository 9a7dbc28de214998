"""Tests for onpo_jax.sampler: filtering math, EOS bookkeeping, sampler vs teacher forcing.

Numpy references below are written independently of the implementation (loops
over sorted tokens instead of cumsum/threshold tricks). Tolerances:
  * float32: 1e-6 absolute on probabilities from the pure functions against
    float64 numpy (a few ulps of values ≤ 1 after exp of fixed logits of order
    1-10); log-probs of the sampler's cached decode against teacher forcing (two
    different XLA programs that accumulate attention and softmax sums in
    different orders, on a model whose weights are scaled by 10) differ by
    rounding proportional to the logits, so they are bounded relative to
    max |logit| + max |log-prob| by tolerances.LOGPROB_RTOL (eps × the
    accumulation depth of the forward and the log-sum-exp, ≈ 8.2e-5);
  * float64: 1e-12.
Distribution tests use scipy.stats.chisquare with fixed seeds and require
p > 1e-3; cells the reference gives probability 0 must never be sampled.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from onpo_jax import prompt_batches
from onpo_jax import sampler as sampler_lib
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as decoder_lib
import tolerances

VOCAB = 8
MODEL_CONFIG = config_lib.DecoderConfig.tiny(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8, max_position_embeddings=64)


def make_model(seed):
  """A tiny decoder whose next-token laws are far from uniform and depend on context.

  The default init (std 0.02) gives near-uniform logits, against which a
  chi-square test has no power; scaling every matrix by 10 fixes that.
  """
  model = decoder_lib.Decoder(MODEL_CONFIG, rngs=nnx.Rngs(seed))
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, state))
  return model, MODEL_CONFIG


positions_from_mask = decoder_lib.positions_from_mask


# ----------------------------------------------------------------- numpy references


def np_softmax(x):
  x = np.asarray(x, np.float64)
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Sampling distribution per row, by explicit loops over ranked tokens."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros_like(logits)
  for r, row in enumerate(logits.reshape(-1, logits.shape[-1])):
    z = row / temperature
    keep = np.ones(z.shape, bool)
    if top_k > 0:
      kth_value = np.sort(z)[::-1][min(top_k, z.size) - 1]
      keep &= z >= kth_value
    if top_p < 1.0:
      p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
      p /= p.sum()
      nucleus = np.zeros(z.shape, bool)
      mass = 0.0
      for i in np.argsort(-z, kind="stable"):
        if not keep[i]:
          continue
        if mass >= top_p:
          break
        nucleus[i] = True
        mass += p[i]
      # Tokens tied with the last kept one stay (threshold semantics).
      keep &= z >= z[nucleus].min()
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    out.reshape(-1, z.size)[r] = p / p.sum()
  return out


def np_top_p_margin(logits, temperature, top_k, top_p):
  """min over rows and distinct kept-by-top-k values v of |M(v) - top_p| / max(M(v), top_p).

  M(v) = mass(z > v), the docstring's definition, computed per distinct value in
  float64. The top-p decision of every token compares M with top_p, and the
  rounding error of a float sum of non-negative terms is relative to the sum
  (an empty sum is exactly 0); a relative margin far above the float32 /
  float64 rounding of a V-term sum means the expected kept set does not hinge
  on rounding.
  """
  margin = np.inf
  for row in np.asarray(logits, np.float64).reshape(-1, logits.shape[-1]):
    z = row / temperature
    if top_k > 0:
      z = np.where(z >= np.sort(z)[::-1][min(top_k, z.size) - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    values, group = np.unique(z[np.isfinite(z)], return_inverse=True)
    group_mass = np.bincount(group, weights=p[np.isfinite(z)], minlength=values.size)
    mass_above = np.concatenate([np.cumsum(group_mass[::-1])[::-1][1:], [0.0]])
    margin = min(margin, (np.abs(mass_above - top_p) / np.maximum(mass_above, top_p)).min())
  return margin


def former_filter_logits(x, temperature, top_k, top_p):
  """the former filter_logits (lax.top_k; sort + cumsum + threshold for top-p), kept
  as a second reference: the bisections must reproduce its kept sets."""
  x = x / temperature
  if 0 < top_k < x.shape[-1]:
    x = jnp.where(x < jax.lax.top_k(x, top_k)[0][..., -1:], -jnp.inf, x)
  if top_p < 1.0:
    sorted_desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def np_response_mask(tokens, eos_ids):
  tokens = np.asarray(tokens)
  mask = np.zeros(tokens.shape, bool)
  for b in range(tokens.shape[0]):
    for j in range(tokens.shape[1]):
      mask[b, j] = True
      if tokens[b, j] in eos_ids:
        break
  return mask


@jax.jit
def _forward(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  positions = positions_from_mask(mask)
  return model(tokens, positions, mask)[0], model.token_logprobs(tokens, positions, mask)


def full_logits(model, tokens, mask):
  """Teacher-forced next-token logits [B, L, V] (no cache), float64 numpy."""
  graphdef, state = nnx.split(model)
  logits, _ = _forward(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool))
  return np.asarray(logits, np.float64)


def teacher_logprobs(model, out):
  """Decoder.token_logprobs of the sampled sequences (aligned convention)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, out.sequences, out.attention_mask)[1])


# ----------------------------------------------------------------- pure functions


def _maybe_jit(fn, use_jit, **static):
  f = lambda *a: fn(*a, **static)
  return jax.jit(f) if use_jit else f


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (1.3, 5, 0.8), (1.0, 12, 0.999),
    (0.5, 1, 1.0), (1.0, 0, 1e-4)])
def test_filter_logits_matches_numpy(use_jit, x64, temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3, 12)) * 2.0
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    f = _maybe_jit(sampler_lib.filter_logits, use_jit, temperature=temperature, top_k=top_k,
                   top_p=top_p)
    got = f(jnp.asarray(logits, dtype))
    assert got.dtype == dtype
    probs = np.asarray(jax.nn.softmax(got, axis=-1))
  ref = np_filtered_probs(logits, temperature, top_k, top_p)
  np.testing.assert_allclose(probs, ref, atol=1e-12 if x64 else 1e-6, rtol=0)
  np.testing.assert_array_equal(probs == 0, ref == 0)


def test_filter_logits_keeps_ties_and_rejects_bad_args():
  logits = jnp.array([[2.0, 1.0, 1.0, 0.0]])
  kept = np.isfinite(np.asarray(sampler_lib.filter_logits(logits, top_k=2)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])
  with pytest.raises(ValueError, match="temperature"):
    sampler_lib.filter_logits(logits, temperature=0.0)
  for bad in (float("inf"), True, "1.0"):
    with pytest.raises(ValueError, match="SamplingConfig.temperature"):
      sampler_lib.SamplingConfig(max_new_tokens=4, temperature=bad)
  for bad in (float("nan"), 1.5, False):
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
      sampler_lib.SamplingConfig(max_new_tokens=4, top_p=bad)
  for bad in (True, 2.0, 0):
    with pytest.raises(ValueError, match="SamplingConfig.max_new_tokens"):
      sampler_lib.SamplingConfig(max_new_tokens=bad)
  # numpy scalars, e.g. read from an array of settings, are numbers like any other.
  cfg = sampler_lib.SamplingConfig(max_new_tokens=np.int64(4), temperature=np.float32(0.7))
  assert cfg.max_new_tokens == 4
  with pytest.raises(ValueError, match="top_p"):
    sampler_lib.filter_logits(logits, top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampler_lib.filter_logits(logits, top_k=-1)
  with pytest.raises(ValueError, match="logits"):
    sampler_lib.filter_logits(jnp.float32(1.0))


TOP_P_NEAR_ONE = 1 - 1e-7


def _top_p_logits(vocab, x64, top_p, seed):
  """Float32-representable logits with ties, -inf and well-separated nucleus masses.

  Small vocabularies: [2, 3, V] normal(0, 2) logits with a tie and one -inf per
  row. V = 32000: [3, V] logits on a grid of 0.5 in [-6, 0] (tie groups of
  ~2500 tokens; top_p = 0.95 ends in the top one) under a head of 20 distinct
  logits around 6 (most of the mass: top-k and the other top-p values choose
  among them), plus -inf entries. With top_p = 1 - 1e-7, every finite float32 token must be kept
  (no head and a grid {-0.5, 0}, so the smallest probability stays well above
  the float32 rounding of the mass sum), while in float64 a tail at max - 40
  (mass ~1e-17 each) must be dropped.
  """
  rng = np.random.default_rng(seed)
  near_one = top_p == TOP_P_NEAR_ONE
  if vocab < 1000:
    x = rng.normal(size=(2, 3, vocab)) * (1.0 if near_one else 2.0)
    if vocab >= 3:
      x[..., 1] = x[..., 2]  # a tie
      x[..., 0] = -np.inf
  else:
    float32_near_one = near_one and not x64
    x = rng.integers(-1 if float32_near_one else -12, 1, size=(3, vocab)) * 0.5
    if not float32_near_one:
      x[:, rng.choice(vocab, 20, replace=False)] = 6.0 + rng.normal(size=(3, 20))
    x[:, rng.choice(vocab, 50, replace=False)] = -np.inf
  if near_one and x64 and vocab >= 3:
    x[..., -1] = np.max(x, axis=-1) - 40.0
  return x.astype(np.float32).astype(np.float64)


TOP_P_CONFIGS = [  # temperature, top_k, top_p
    (1.0, 0, 0.5), (0.7, 0, 0.9), (1.0, 0, 1e-6), (1.0, 0, TOP_P_NEAR_ONE),
    (1.3, 5, 0.8), (1.0, 3, TOP_P_NEAR_ONE), (1.0, 1000, 0.95)]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("vocab", [1, 2, 7, 32000])
@pytest.mark.parametrize("temperature,top_k,top_p", TOP_P_CONFIGS)
def test_filter_logits_top_p_kept_set_matches_numpy(use_jit, x64, vocab, temperature, top_k,
                                                      top_p):
  """Bisection top-p keeps exactly the numpy loop's set (and the old sort version's)."""
  seed = 10 + TOP_P_CONFIGS.index((temperature, top_k, top_p))
  logits = _top_p_logits(vocab, x64, top_p, seed)
  # The expected set must not hinge on rounding: float32 sums of 32000 terms
  # are off by ~1e-6 relative (pairwise-ish order), float64 ones by ~1e-14.
  assert np_top_p_margin(logits, temperature, top_k, top_p) > (1e-10 if x64 else 1e-5)
  ref_kept = np_filtered_probs(logits, temperature, top_k, top_p) > 0
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    x = jnp.asarray(logits, dtype)
    f = _maybe_jit(sampler_lib.filter_logits, use_jit, temperature=temperature, top_k=top_k,
                   top_p=top_p)
    got = f(x)
    assert got.dtype == dtype
    got = np.asarray(got)
    old = np.asarray(former_filter_logits(x, temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(got), ref_kept)
  np.testing.assert_array_equal(np.isfinite(old), ref_kept)
  # Kept tokens keep their tempered logit exactly.
  np.testing.assert_array_equal(got[ref_kept], old[ref_kept])
  if top_p == 1e-6:  # only the argmax (and its ties) survives
    np.testing.assert_array_equal(ref_kept, logits == logits.max(-1, keepdims=True))
  if top_p == TOP_P_NEAR_ONE and top_k == 0 and vocab >= 3:
    # float32: every finite token kept; float64: only the max - 40 tail dropped.
    tail = np.zeros(logits.shape, bool)
    tail[..., -1] = x64
    np.testing.assert_array_equal(ref_kept, np.isfinite(logits) & ~tail)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("logits,top_p,kept", [
    # Masses strictly above: 2 → 0, 1 → 0.486, 0 → 0.844, -1 → 0.976.
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], 0.5, [1, 1, 1, 0, 0, 0, 0]),  # tie at threshold
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], 0.4, [1, 0, 0, 0, 0, 0, 0]),
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], 0.9, [1, 1, 1, 1, 1, 0, 0]),
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], TOP_P_NEAR_ONE, [1, 1, 1, 1, 1, 0, 1]),
    ([3.0, -5.0, 3.0], 1e-6, [1, 0, 1]),  # tied argmax: both have mass 0 above
    ([-1e30, 0.0], 0.5, [0, 1]),
    ([5.0], 1e-6, [1]),
    # top-k (top_p = 1): ties with the k-th are kept; fewer finite tokens than k keeps all.
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], (2, 1.0), [1, 1, 1, 0, 0, 0, 0]),
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], (4, 1.0), [1, 1, 1, 1, 1, 0, 0]),
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], (6, 1.0), [1, 1, 1, 1, 1, 0, 1]),
    ([1.0, -np.inf, -np.inf, 0.0], (3, 1.0), [1, 0, 0, 1]),
    ([3.0, -5.0, 3.0], (1, 1.0), [1, 0, 1]),
    ([-0.0, 0.0, -1e-30, 1e-30], (2, 1.0), [1, 1, 0, 1]),  # signed zeros tie
    # top-k then top-p on the renormalised top-k: 2 → 0, 1 → 0.576 above.
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], (3, 0.55), [1, 0, 0, 0, 0, 0, 0]),
    ([2.0, 1.0, 1.0, 0.0, 0.0, -np.inf, -1.0], (3, 0.6), [1, 1, 1, 0, 0, 0, 0]),
])
def test_filter_logits_hand_checked(use_jit, x64, logits, top_p, kept):
  top_k, top_p = top_p if isinstance(top_p, tuple) else (0, top_p)
  with jax.enable_x64(x64):
    x = jnp.asarray([logits, logits], jnp.float64 if x64 else jnp.float32)
    got = _maybe_jit(sampler_lib.filter_logits, use_jit, top_k=top_k, top_p=top_p)(x)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), [kept, kept])


def test_filter_logits_does_not_sort():
  """Top-k / top-p must not sort the vocabulary (nor call lax.top_k, a slow
  custom call on XLA:CPU)."""
  for top_k in (1, 50):
    jaxpr = str(jax.make_jaxpr(
        lambda x, k=top_k: sampler_lib.filter_logits(x, temperature=0.7, top_k=k, top_p=0.9))(
            jnp.zeros((4, 1000))))
    assert not any(name in jaxpr for name in ("sort", "cumsum", "top_k", "gather", "scatter"))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_geometric_mixture_matches_numpy(use_jit, x64, alpha):
  rng = np.random.default_rng(1)
  lp, lr = rng.normal(size=(2, 5, 9)) * 3.0
  lr[0, 2] = -np.inf  # a token the reference forbids: only α = 0 may sample it
  # Independent reference: normalised product of powers of the two distributions.
  ref = np_softmax(lp) ** (1 - alpha) * np_softmax(lr) ** alpha
  ref /= ref.sum(-1, keepdims=True)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    f = sampler_lib.geometric_mixture_logprobs
    f = jax.jit(f) if use_jit else f
    got = f(jnp.asarray(lp, dtype), jnp.asarray(lr, dtype), alpha)
    assert got.dtype == dtype
    got = np.asarray(jnp.exp(got))
  np.testing.assert_allclose(got, ref, atol=1e-12 if x64 else 1e-6, rtol=0)
  assert not np.isnan(got).any()


def test_geometric_mixture_rejects_bad_shapes():
  with pytest.raises(ValueError, match="same shape"):
    sampler_lib.geometric_mixture_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.5)
  with pytest.raises(ValueError, match="alpha"):
    sampler_lib.geometric_mixture_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("eos_ids", [(), (3,), (3, 5, 7)])
def test_response_mask_from_tokens_matches_numpy(use_jit, eos_ids):
  tokens = np.random.default_rng(2).integers(0, 8, size=(16, 7))
  f = _maybe_jit(sampler_lib.response_mask_from_tokens, use_jit, eos_ids=eos_ids)
  mask, lengths = f(jnp.asarray(tokens, jnp.int32))
  ref = np_response_mask(tokens, eos_ids)
  np.testing.assert_array_equal(np.asarray(mask), ref)
  np.testing.assert_array_equal(np.asarray(lengths), ref.sum(1))
  if eos_ids:
    assert not ref.all()  # the fixture really exercises stopping


def test_bucketing_and_prompt_validation():
  assert sampler_lib.bucket_length(1, (4, 8)) == 4
  assert sampler_lib.bucket_length(4, (4, 8)) == 4
  assert sampler_lib.bucket_length(5, (4, 8)) == 8
  with pytest.raises(ValueError, match="prompt_buckets"):
    sampler_lib.bucket_length(9, (4, 8))
  tokens = np.array([[0, 0, 0, 5, 6], [0, 7, 1, 2, 3]])
  mask = tokens > 0
  t, m = sampler_lib.pad_prompts_to_bucket(tokens, mask, (2, 6, 9), pad_id=4)
  np.testing.assert_array_equal(t, [[4, 4, 0, 0, 5, 6], [4, 4, 7, 1, 2, 3]])
  np.testing.assert_array_equal(m, [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
  assert t.dtype == np.int32 and m.dtype == bool
  # Extra all-pad columns on the left do not push the batch into a larger bucket.
  t2, m2 = sampler_lib.pad_prompts_to_bucket(np.pad(tokens, ((0, 0), (5, 0))),
                                             np.pad(mask, ((0, 0), (5, 0))), (2, 6, 9), 4)
  np.testing.assert_array_equal(t2, t)
  np.testing.assert_array_equal(m2, m)
  with pytest.raises(ValueError, match="left-padded"):
    sampler_lib.pad_prompts_to_bucket(tokens, mask[:, ::-1], (8,), 0)
  with pytest.raises(ValueError, match="no real token"):
    sampler_lib.pad_prompts_to_bucket(tokens, np.zeros_like(mask), (8,), 0)
  with pytest.raises(ValueError, match="prompt_mask shape"):
    sampler_lib.pad_prompts_to_bucket(tokens, mask[:, 1:], (8,), 0)


@pytest.mark.parametrize("field,value,match", [
    ("max_new_tokens", 0, "max_new_tokens"), ("temperature", 0.0, "temperature"),
    ("temperature", float("nan"), "temperature"), ("top_k", -1, "top_k"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("greedy", 1, "greedy"),
    ("eos_ids", (2, -1), "eos_ids"), ("eos_ids", 2, "eos_ids"), ("pad_id", -1, "pad_id"),
    ("prompt_buckets", (), "prompt_buckets"), ("prompt_buckets", (8, 4), "prompt_buckets"),
    ("cache_dtype", "int8", "cache_dtype"), ("eos_check_every", 0, "eos_check_every"),
    ("eos_check_every", 2.0, "eos_check_every"), ("cache_segments", 0, "cache_segments"),
    ("cache_segments", 2.0, "cache_segments"), ("share_prefill", 1, "share_prefill")])
def test_sampling_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    sampler_lib.SamplingConfig(**{"max_new_tokens": 4, field: value})


def test_steps_per_eos_check_defaults_by_backend():
  default = sampler_lib.SamplingConfig(max_new_tokens=4)
  assert [default.steps_per_eos_check(b) for b in ("cpu", "tpu", "gpu", "cuda", "rocm")] == [
      1, 1, sampler_lib.GPU_EOS_CHECK_EVERY, sampler_lib.GPU_EOS_CHECK_EVERY,
      sampler_lib.GPU_EOS_CHECK_EVERY]
  assert sampler_lib.GPU_EOS_CHECK_EVERY > 1
  chosen = sampler_lib.SamplingConfig(max_new_tokens=4, eos_check_every=5)
  assert chosen.steps_per_eos_check("gpu") == chosen.steps_per_eos_check("cpu") == 5


def test_sampling_config_accepts_lists():
  cfg = sampler_lib.SamplingConfig(max_new_tokens=3, eos_ids=[128001, 128009],
                                   prompt_buckets=[4, 8])
  assert cfg.eos_ids == (128001, 128009) and cfg.prompt_buckets == (4, 8)
  hash(cfg)


# ------------------------------------------------------------------------ sampler
# Samplers are cached by config and shared between tests: each new config
# compiles prefill and decode, which dominates the run time on CPU.


@pytest.fixture(scope="module")
def policy():
  return make_model(0)


@pytest.fixture(scope="module")
def reference():
  return make_model(1)


_SAMPLERS = {}


def _sampler(model_and_cfg, *, fresh=False, **kw):
  """(Sampler, state); policy and reference share one graphdef, hence one Sampler."""
  model, cfg = model_and_cfg
  graphdef, state = nnx.split(model)
  kw.setdefault("prompt_buckets", (4, 8))
  config = sampler_lib.SamplingConfig(**kw)
  if fresh or config not in _SAMPLERS:
    _SAMPLERS[config] = sampler_lib.Sampler(graphdef, config, model_config=cfg)
  return _SAMPLERS[config], state


PROMPTS = np.array([[0, 0, 0, 7, 1, 2, 3], [5, 6, 7, 1, 2, 3, 4], [0, 0, 0, 0, 0, 0, 6]])
PROMPT_MASK = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7, [0] * 6 + [1]], bool)
N_NEW = 6


def test_sampler_logprobs_match_teacher_forcing(policy):
  """Unfiltered response log-probs line up with Decoder.token_logprobs (aligned)."""
  model, _ = policy
  smp, state = _sampler(policy, max_new_tokens=N_NEW, temperature=0.7, top_k=5, top_p=0.9)
  out = smp(state, PROMPTS, PROMPT_MASK, jax.random.key(3))
  p_len = out.sequences.shape[1] - N_NEW
  assert out.sequences.shape == (3, 8 + N_NEW) and p_len == 8
  tf = teacher_logprobs(model, out)[:, p_len:]
  lp_scale = tolerances.logprob_scale(
      full_logits(model, out.sequences, out.attention_mask)[:, p_len - 1:-1], tf)
  tolerances.assert_close_rel(out.response_logprobs, tf, rtol=tolerances.LOGPROB_RTOL,
                              scale=lp_scale, what="response log-probs vs teacher forcing")
  tolerances.assert_close_rel(out.model_logprobs[0], tf, rtol=tolerances.LOGPROB_RTOL,
                              scale=lp_scale, what="model log-probs vs teacher forcing")
  # The sampling log-probs are those of the filtered distribution (numpy reference).
  logits = full_logits(model, out.sequences, out.attention_mask)[:, p_len - 1:-1]
  ref = np_filtered_probs(logits, 0.7, 5, 0.9)
  ref_lp = np.log(np.take_along_axis(ref, np.asarray(out.response_tokens)[..., None], -1)[..., 0])
  # Filtered at temperature 0.7: the logits it exponentiates are logits / 0.7.
  tolerances.assert_close_rel(out.sampling_logprobs, ref_lp, rtol=tolerances.LOGPROB_RTOL,
                              scale=tolerances.logprob_scale(logits / 0.7, ref_lp),
                              what="sampling log-probs vs numpy")
  assert (np.asarray(out.sampling_logprobs) > np.asarray(out.response_logprobs)).any()
  np.testing.assert_array_equal(np.asarray(out.sequences[:, :p_len]),
                                np.pad(PROMPTS, ((0, 0), (1, 0))))
  np.testing.assert_array_equal(
      np.asarray(out.attention_mask),
      np.concatenate([np.zeros((3, 1), bool), PROMPT_MASK, np.ones((3, N_NEW), bool)], 1))
  np.testing.assert_array_equal(np.asarray(out.response_mask[:, :p_len]), False)
  np.testing.assert_array_equal(np.asarray(out.response_mask[:, p_len:]), True)
  np.testing.assert_array_equal(np.asarray(out.lengths), N_NEW)
  assert out.response_tokens.dtype == jnp.int32 and out.response_logprobs.dtype == jnp.float32


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6, top_k=6, top_p=0.85)])
def test_sampled_frequencies_chi_square(policy, kw):
  """First tokens and (first, second) pairs follow the exact (filtered) law."""
  model, _ = policy
  n = 4096
  smp, state = _sampler(policy, max_new_tokens=2, **kw)
  prompt = np.array([[1, 2, 3]])
  out = smp(state, np.repeat(prompt, n, 0), np.ones((n, 3), bool), jax.random.key(11))
  toks = np.asarray(out.response_tokens)
  temperature, top_k, top_p = kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0)
  p1 = np_filtered_probs(full_logits(model, prompt, np.ones((1, 3), bool))[0, -1],
                         temperature, top_k, top_p)
  seqs = np.array([[1, 2, 3, a] for a in range(VOCAB)])
  p2 = np_filtered_probs(full_logits(model, seqs, np.ones(seqs.shape, bool))[:, -1],
                         temperature, top_k, top_p)
  joint = (p1[:, None] * p2).ravel()
  for counts, probs in ((np.bincount(toks[:, 0], minlength=VOCAB), p1),
                        (np.bincount(toks[:, 0] * VOCAB + toks[:, 1], minlength=VOCAB**2), joint)):
    support = probs > 0
    assert counts[~support].sum() == 0
    assert probs.max() < 0.9  # far from a point mass: the test has power
    result = stats.chisquare(counts[support], probs[support] / probs[support].sum() * n)
    assert result.pvalue > 1e-3, (counts, probs * n)
  # The second token's law depends on the first (a sampler ignoring context would fail).
  assert np.abs(p2 - p2[0]).max() > 0.05
  if top_k or top_p < 1:
    assert (joint == 0).any()  # filtering really removed tokens


def test_greedy_is_argmax_chain_and_padding_invariant(policy):
  model, _ = policy
  smp, state = _sampler(policy, max_new_tokens=N_NEW, greedy=True)
  out = smp(state, PROMPTS, PROMPT_MASK, jax.random.key(0))
  p_len = out.sequences.shape[1] - N_NEW
  # Causality: teacher forcing on the output sees the same prefixes the sampler
  # saw, so each response token must be the argmax at the slot before it.
  logits = full_logits(model, out.sequences, out.attention_mask)[:, p_len - 1:-1]
  np.testing.assert_array_equal(np.asarray(out.response_tokens), logits.argmax(-1))
  np.testing.assert_array_equal(np.asarray(out.sampling_logprobs), 0.0)
  # Row 0 alone fills bucket 4 with no padding at all; in the batch it has 4 pads.
  alone = smp(state, PROMPTS[:1, -4:], PROMPT_MASK[:1, -4:], jax.random.key(0))
  assert alone.sequences.shape[1] == 4 + N_NEW and alone.attention_mask[0].all()
  np.testing.assert_array_equal(np.asarray(alone.response_tokens[0]),
                                np.asarray(out.response_tokens[0]))
  tolerances.assert_close_rel(
      alone.response_logprobs[0], out.response_logprobs[0], rtol=tolerances.LOGPROB_RTOL,
      scale=tolerances.logprob_scale(logits[0], out.response_logprobs[0]),
      what="unpadded vs padded row log-probs")


def test_eos_stops_each_row_and_ignores_prompt_eos(policy):
  smp, state = _sampler(policy, max_new_tokens=N_NEW, greedy=True)
  free = np.asarray(smp(state, PROMPTS, PROMPT_MASK, jax.random.key(0)).response_tokens)
  eos_ids = tuple(sorted({int(free[0, 1]), int(free[1, 3]), int(free[2, 0])}))
  # A fourth prompt made of EOS ids, ending with one; greedy rows are independent,
  # so rows 0-2 keep their continuations.
  prompts = np.concatenate([PROMPTS, [[0] * 5 + [eos_ids[-1], eos_ids[0]]]])
  mask = np.concatenate([PROMPT_MASK, [[False] * 5 + [True] * 2]])
  free = np.asarray(smp(state, prompts, mask, jax.random.key(0)).response_tokens)
  pad = min(set(range(VOCAB)) - set(eos_ids))
  smp_eos, _ = _sampler(policy, max_new_tokens=N_NEW, greedy=True, eos_ids=eos_ids, pad_id=pad)
  out = smp_eos(state, prompts, mask, jax.random.key(0))
  expected = np_response_mask(free, eos_ids)
  assert (expected[:3].sum(1) <= [2, 4, 1]).all()  # rows 0-2 really stopped early
  np.testing.assert_array_equal(np.asarray(out.response_mask[:, -N_NEW:]), expected)
  np.testing.assert_array_equal(np.asarray(out.response_mask[:, :-N_NEW]), False)
  np.testing.assert_array_equal(np.asarray(out.lengths), expected.sum(1))
  np.testing.assert_array_equal(np.asarray(out.response_tokens), np.where(expected, free, pad))
  np.testing.assert_array_equal(np.asarray(out.sequences[:, -N_NEW:]),
                                np.where(expected, free, pad))
  np.testing.assert_array_equal(np.asarray(out.attention_mask[:, -N_NEW:]), expected)
  for field in (out.response_logprobs, out.sampling_logprobs, out.model_logprobs[0]):
    np.testing.assert_array_equal(np.asarray(field)[~expected], 0.0)
  assert (np.asarray(out.response_logprobs)[expected] < 0).all()


def _assert_same_output(a, b, what):
  for field, x, y in zip(a._fields, a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {field}")


@pytest.mark.parametrize("mixture_alpha", [None, 0.5])
def test_eos_check_every_gives_the_same_samples(policy, reference, mixture_alpha):
  """Checking for the end every few steps only adds masked steps (or dropped ones past N)."""
  (pm, pcfg), (rm, rcfg) = policy, reference

  def sample(key, **kw):
    config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(8,), **kw)
    if mixture_alpha is None:
      smp = sampler_lib.Sampler(nnx.split(pm)[0], config, model_config=pcfg)
      return smp(nnx.state(pm), PROMPTS, PROMPT_MASK, key)
    smp = sampler_lib.MixtureSampler(nnx.split(pm)[0], nnx.split(rm)[0], config,
                                     policy_model_config=pcfg, ref_model_config=rcfg)
    return smp(nnx.state(pm), nnx.state(rm), PROMPTS, PROMPT_MASK, key, mixture_alpha)

  key = jax.random.key(7)
  free = np.asarray(sample(key).response_tokens)
  # Every row ends by its third token (the loop then stops between checks), or
  # some row runs to N (the loop then runs to N, past it where N - 1 is no
  # multiple of the steps per check).
  for eos_ids, all_end_early in ((tuple(sorted(set(free[:, 2].tolist()))), True),
                                 ((int(free[0, 1]),), False)):
    pad = min(set(range(VOCAB)) - set(eos_ids))
    every_step = sample(key, eos_ids=eos_ids, pad_id=pad, eos_check_every=1)
    lengths = np.asarray(every_step.lengths)
    if all_end_early:
      assert (lengths <= 3).all(), lengths
    else:
      assert lengths[0] <= 2 and (lengths == N_NEW).any(), lengths
    for every in (2, 4, 7):
      _assert_same_output(
          sample(key, eos_ids=eos_ids, pad_id=pad, eos_check_every=every), every_step,
          f"eos_ids {eos_ids}, a check every {every} steps")


def _decoding_loops(sampler, state):
  """(op_name, known trip count or None) of each loop of the compiled decode
  that runs decoding steps (not the loops inside the random-number draws)."""
  toks, mask = sampler_lib.pad_prompts_to_bucket(PROMPTS, PROMPT_MASK, (8,), 0)
  caches, logits = sampler.prefill((state,), jnp.asarray(toks), jnp.asarray(mask))
  hlo = sampler.decode.lower((state,), caches, logits, jnp.asarray(toks), jnp.asarray(mask),
                             jax.random.key(0), jnp.float32(0)).compile().as_text()
  loops = []
  for line in hlo.splitlines():
    op_name = re.search(r'op_name="([^"]*)"', line)
    if " while(" in line and re.fullmatch(r"jit\(_decode_impl\)(/while/body)*/while",
                                          op_name.group(1)):
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      loops.append((op_name.group(1), int(trips.group(1)) if trips else None))
  return sorted(loops)


def test_decoding_loops_have_known_trip_counts_between_checks(policy):
  """XLA:GPU waits for the device only at loops without a known trip count."""
  model, cfg = policy
  graphdef, state = nnx.split(model)

  def loops(**kw):
    config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(8,), **kw)
    return _decoding_loops(sampler_lib.Sampler(graphdef, config, model_config=cfg), state)

  outer, inner = "jit(_decode_impl)/while", "jit(_decode_impl)/while/body/while"
  assert loops() == [(outer, N_NEW - 1)]  # fixed length: no check at all
  assert loops(eos_ids=(3,), eos_check_every=1) == [(outer, None)]
  assert loops(eos_ids=(3,), eos_check_every=4) == [(outer, None), (inner, 4)]


def test_no_recompilation_within_bucket_and_cache_donation(policy):
  smp, state = _sampler(policy, fresh=True, max_new_tokens=3)
  rng = np.random.default_rng(5)
  for length in (3, 4, 2):  # all in bucket 4, different prompts and padding
    toks = rng.integers(0, VOCAB, size=(2, length))
    smp(state, toks, np.ones((2, length), bool), jax.random.key(length))
  # New weights with the same structure (e.g. after a training step) must not recompile.
  state2 = jax.tree.map(lambda x: x * 1.01, state)
  smp(state2, toks, np.ones((2, 2), bool), jax.random.key(9))
  assert smp.prefill._cache_size() == 1 and smp.decode._cache_size() == 1
  smp(state, rng.integers(0, VOCAB, size=(2, 6)), np.ones((2, 6), bool), jax.random.key(0))
  assert smp.prefill._cache_size() == 2 and smp.decode._cache_size() == 2
  # The decode loop consumes (donates) the prefill cache.
  toks, mask = sampler_lib.pad_prompts_to_bucket(toks, np.ones((2, 2), bool), (4,), 0)
  caches, logits = smp.prefill((state,), jnp.asarray(toks), jnp.asarray(mask))
  smp.decode((state,), caches, logits, jnp.asarray(toks), jnp.asarray(mask),
             jax.random.key(0), jnp.float32(0))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(caches))


def test_cache_dtype_and_shapes(policy):
  smp, state = _sampler(policy, fresh=True, max_new_tokens=3, cache_dtype="bfloat16")
  toks, mask = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool)
  caches, logits = jax.eval_shape(smp.prefill, (state,), toks, mask)  # traces, no compile
  # per layer, S = prompt bucket + max_new_tokens slots: keys [B, kv heads,
  # head_dim, S], values [B, kv heads, S, head_dim]
  assert len(caches[0].k) == len(caches[0].v) == 2
  assert all(x.shape == (2, 1, 8, 4 + 3) for x in caches[0].k)
  assert all(x.shape == (2, 1, 4 + 3, 8) for x in caches[0].v)
  for x in caches[0].k + caches[0].v:
    assert x.dtype == jnp.bfloat16
  assert logits[0].shape == (2, VOCAB) and logits[0].dtype == jnp.float32


def test_same_key_same_samples_and_input_errors(policy):
  smp, state = _sampler(policy, max_new_tokens=N_NEW)
  a = smp(state, PROMPTS, PROMPT_MASK, jax.random.key(1))
  b = smp(state, PROMPTS, PROMPT_MASK, jax.random.key(1))
  c = smp(state, PROMPTS, PROMPT_MASK, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
  assert (np.asarray(a.sequences) != np.asarray(c.sequences)).any()
  with pytest.raises(ValueError, match="left-padded"):
    smp(state, PROMPTS, PROMPT_MASK[:, ::-1], jax.random.key(0))
  with pytest.raises(ValueError, match="prompt_buckets"):
    smp(state, np.ones((1, 9), int), np.ones((1, 9), bool), jax.random.key(0))
  with pytest.raises(ValueError, match=r"prompt_tokens must lie in \[0, 8\)"):
    smp(state, PROMPTS + 8, PROMPT_MASK, jax.random.key(0))
  with pytest.raises(ValueError, match="eos_ids"):
    _sampler(policy, max_new_tokens=2, eos_ids=(VOCAB,))
  with pytest.raises(ValueError, match="top_k"):
    _sampler(policy, max_new_tokens=2, top_k=VOCAB + 1)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    _sampler(policy, max_new_tokens=60)[0](state, PROMPTS, PROMPT_MASK, jax.random.key(0))


def test_distinct_prompt_rows():
  """Rows sharing a prompt (mask and real tokens; pad slots ignored) map to one prefill row."""
  a, b, c = [0, 0, 5, 6], [0, 7, 5, 6], [1, 2, 3, 4]
  a_other_pad = [3, 3, 5, 6]  # a's real tokens, other ids in its pad slots
  rows = "abacabca"
  tokens = np.array([a, b, a_other_pad, c, a, b, c, a])
  masks = {"a": [0, 0, 1, 1], "b": [0, 1, 1, 1], "c": [1, 1, 1, 1]}
  mask = np.array([masks[r] for r in rows], bool)
  first, of_row = prompt_batches.distinct_prompt_rows(tokens, mask)
  assert first.shape == (4,) and of_row.shape == (8,)  # 3 prompts, rounded up to 4 rows
  np.testing.assert_array_equal(mask[first[of_row]], mask)
  np.testing.assert_array_equal(np.where(mask, tokens[first[of_row]], -1),
                                np.where(mask, tokens, -1))
  assert len(set(of_row[[0, 2, 4, 7]].tolist())) == 1  # a, whatever its pad slots hold
  assert len({of_row[0], of_row[1], of_row[3]}) == 3  # a, b (other mask), c
  # Rounded up to a multiple of the batch's shards: 8 rows save nothing.
  assert prompt_batches.distinct_prompt_rows(tokens, mask, multiple=8) is None
  first, _ = prompt_batches.distinct_prompt_rows(tokens[:6].repeat(2, 0), mask[:6].repeat(2, 0),
                                                multiple=3)
  assert first.shape == (6,)  # 3 prompts -> 4 -> a multiple of 3
  # Every row its own prompt: nothing to share.
  assert prompt_batches.distinct_prompt_rows(tokens[[0, 1, 3]], mask[[0, 1, 3]]) is None


@pytest.mark.parametrize("mixture_alpha", [None, 0.5])
def test_shared_prefill_gives_the_same_samples(policy, reference, mixture_alpha):
  """A batch holding each prompt several times prefills it once, and samples as if not."""
  (pm, pcfg), (rm, rcfg) = policy, reference
  order = [0, 1, 0, 2, 1, 0, 2, 0]  # 3 prompts, 8 rows
  tokens, mask = PROMPTS[order], PROMPT_MASK[order]
  key = jax.random.key(12)

  def sample(share_prefill):
    config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(8,),
                                        temperature=0.8, share_prefill=share_prefill)
    if mixture_alpha is None:
      smp = sampler_lib.Sampler(nnx.split(pm)[0], config, model_config=pcfg)
      states, extra = (nnx.state(pm),), ()
    else:
      smp = sampler_lib.MixtureSampler(nnx.split(pm)[0], nnx.split(rm)[0], config,
                                       policy_model_config=pcfg, ref_model_config=rcfg)
      states, extra = (nnx.state(pm), nnx.state(rm)), (mixture_alpha,)
    prefilled = []  # rows of each prefill call
    jitted = smp.prefill

    def prefill(*args):
      prefilled.append(args[1].shape[0])
      return jitted(*args)

    smp.prefill = prefill
    return smp(*states, tokens, mask, key, *extra), prefilled

  shared, rows = sample(True)
  alone, rows_alone = sample(False)
  assert rows == [4] and rows_alone == [8]  # 3 prompts, rounded up to 4 rows
  np.testing.assert_array_equal(np.asarray(shared.sequences), np.asarray(alone.sequences))
  assert len({tuple(r) for r in np.asarray(shared.response_tokens)}) > 3  # rows differ
  models = [pm] if mixture_alpha is None else [pm, rm]
  logits = np.stack([full_logits(m, alone.sequences, alone.attention_mask) for m in models])
  for field in ("response_logprobs", "sampling_logprobs", "model_logprobs"):
    tolerances.assert_close_rel(
        getattr(shared, field), getattr(alone, field), rtol=tolerances.LOGPROB_RTOL,
        scale=tolerances.logprob_scale(logits, alone.response_logprobs),
        what=f"shared vs per-row prefill: {field}")


# ------------------------------------------------------------------------ mixture


@pytest.fixture(scope="module")
def mixture(policy, reference):
  (pm, pcfg), (rm, rcfg) = policy, reference
  config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(4, 8))
  smp = sampler_lib.MixtureSampler(nnx.split(pm)[0], nnx.split(rm)[0], config,
                                   policy_model_config=pcfg, ref_model_config=rcfg)
  return smp, nnx.state(pm), nnx.state(rm)


def test_mixture_endpoints_equal_single_model_samplers(policy, reference, mixture):
  smp, ps, rs = mixture
  key = jax.random.key(4)
  single_smp, _ = _sampler(policy, max_new_tokens=N_NEW)
  for alpha, state in ((0.0, ps), (1.0, rs)):
    mix = smp(ps, rs, PROMPTS, PROMPT_MASK, key, alpha)
    single = single_smp(state, PROMPTS, PROMPT_MASK, key)
    np.testing.assert_array_equal(np.asarray(mix.sequences), np.asarray(single.sequences))
    logits = full_logits((policy, reference)[int(alpha)][0], single.sequences,
                         single.attention_mask)
    tolerances.assert_close_rel(
        mix.response_logprobs, single.response_logprobs, rtol=tolerances.LOGPROB_RTOL,
        scale=tolerances.logprob_scale(logits, single.response_logprobs),
        what=f"mixture α={alpha} vs single-model log-probs")
  assert smp.decode._cache_size() == 1  # alpha is traced: no recompilation


def test_mixture_per_token_logprobs_match_numpy(policy, reference, mixture):
  """Each token's mixture log-prob is the normalised (1−α)·log π_θ + α·log π_ref."""
  alpha = 0.35
  smp, ps, rs = mixture
  out = smp(ps, rs, PROMPTS, PROMPT_MASK, jax.random.key(6), alpha)
  p_len = out.sequences.shape[1] - N_NEW
  lg_p = full_logits(policy[0], out.sequences, out.attention_mask)[:, p_len - 1:-1]
  lg_r = full_logits(reference[0], out.sequences, out.attention_mask)[:, p_len - 1:-1]
  mix = np_softmax(lg_p) ** (1 - alpha) * np_softmax(lg_r) ** alpha
  mix /= mix.sum(-1, keepdims=True)
  toks = np.asarray(out.response_tokens)[..., None]
  ref_lp = np.log(np.take_along_axis(mix, toks, -1)[..., 0])
  lp_scale = tolerances.logprob_scale(np.stack([lg_p, lg_r]), ref_lp)
  tolerances.assert_close_rel(out.response_logprobs, ref_lp, rtol=tolerances.LOGPROB_RTOL,
                              scale=lp_scale, what="mixture log-probs vs numpy")
  tolerances.assert_close_rel(out.model_logprobs[0], teacher_logprobs(policy[0], out)[:, p_len:],
                              rtol=tolerances.LOGPROB_RTOL, scale=lp_scale,
                              what="mixture: policy log-probs vs teacher forcing")
  tolerances.assert_close_rel(out.model_logprobs[1],
                              teacher_logprobs(reference[0], out)[:, p_len:],
                              rtol=tolerances.LOGPROB_RTOL, scale=lp_scale,
                              what="mixture: reference log-probs vs teacher forcing")
  with pytest.raises(ValueError, match="alpha"):
    smp(ps, rs, PROMPTS, PROMPT_MASK, jax.random.key(6), 1.5)


def test_mixture_frequencies_chi_square(policy, reference):
  alpha, n = 0.3, 4096  # asymmetric: swapping the two models must fail
  (pm, _), (rm, _) = policy, reference
  config = sampler_lib.SamplingConfig(max_new_tokens=2, prompt_buckets=(4,))
  out = sampler_lib.sample_mixture(pm, rm, np.full((n, 2), [4, 1]), np.ones((n, 2), bool),
                                   jax.random.key(8), alpha=alpha, sampling_config=config)
  toks = np.asarray(out.response_tokens)

  def mix_probs(seqs):
    seqs = np.asarray(seqs)
    m = np.ones(seqs.shape, bool)
    a = np_softmax(full_logits(pm, seqs, m)[:, -1])
    b = np_softmax(full_logits(rm, seqs, m)[:, -1])
    q = a ** (1 - alpha) * b ** alpha
    return q / q.sum(-1, keepdims=True), a, b

  p1, a1, b1 = mix_probs([[4, 1]])
  # The mixture differs from both endpoints, so sampling either model would fail.
  assert np.abs(p1 - a1).max() > 0.05 and np.abs(p1 - b1).max() > 0.05
  p2, _, _ = mix_probs([[4, 1, t] for t in range(VOCAB)])
  joint = (p1[0][:, None] * p2).ravel()
  for counts, probs in ((np.bincount(toks[:, 0], minlength=VOCAB), p1[0]),
                        (np.bincount(toks[:, 0] * VOCAB + toks[:, 1], minlength=VOCAB**2), joint)):
    result = stats.chisquare(counts, probs / probs.sum() * n)
    assert result.pvalue > 1e-3, (counts, probs * n)
