"""Tests for onpo_jax.logprobs against loops in tests/numpy_refs.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax import logprobs
import numpy_refs as ref

# f64: only summation order differs from the numpy loop, so 1e-12 relative.
# f32: log-softmax of O(1) logits in float32 is accurate to a few ulp (~1e-7);
# sums of <= 8 terms keep that below 1e-5.
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["f32", "f64"])
def dtype(request):
  with jax.enable_x64(request.param == jnp.float64):
    yield request.param


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  if request.param:
    return lambda f: jax.jit(f, static_argnames=("reduction",)) if f in (
        logprobs.sequence_logprobs, logprobs.reduce_logprobs) else jax.jit(f)
  return lambda f: f


def _batch(seed=0, b=3, length=8, vocab=5):
  """Random logits/tokens; rows: prompt then response then right padding."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, length, vocab)) * 2.0
  tokens = rng.integers(0, vocab, size=(b, length))
  mask = np.zeros((b, length), bool)
  mask[0, 2:6] = True   # prompt 0..1, response 2..5, pad 6..7
  mask[1, 3:8] = True   # response to the end
  mask[2, 1:2] = True   # one response token
  return logits, tokens, mask


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logprobs_matches_numpy(dtype, maybe_jit, reduction):
  logits, tokens, mask = _batch()
  want = ref.sequence_logprobs(logits, tokens, mask, reduction)
  got = maybe_jit(logprobs.sequence_logprobs)(
      jnp.asarray(logits, dtype), jnp.asarray(tokens), jnp.asarray(mask), reduction=reduction)
  assert got.dtype == dtype and got.shape == (3,)
  np.testing.assert_allclose(np.asarray(got), want, **TOL[dtype])


def test_shift_on_hand_built_example(dtype, maybe_jit):
  # Position t-1 predicts token t. Rows are logs of unnormalised probabilities.
  logits = np.log(np.array([[[1., 1., 1.],      # predicts tokens[1] = 1: 1/3
                             [1., 2., 5.],      # predicts tokens[2] = 2: 5/8
                             [6., 1., 1.],      # predicts tokens[3] = 0: 6/8
                             [1., 1e-3, 9.]]]))  # predicts nothing
  tokens = np.array([[0, 1, 2, 0]])
  mask = np.array([[False, False, True, True]])  # prompt = tokens 0, 1
  tok = maybe_jit(logprobs.token_logprobs_from_logits)(jnp.asarray(logits, dtype),
                                                       jnp.asarray(tokens))
  np.testing.assert_allclose(
      np.asarray(tok), [[0.0, math.log(1 / 3), math.log(5 / 8), math.log(3 / 4)]], **TOL[dtype])
  seq = maybe_jit(logprobs.sequence_logprobs)
  got_sum = seq(jnp.asarray(logits, dtype), jnp.asarray(tokens), jnp.asarray(mask), reduction="sum")
  got_mean = seq(jnp.asarray(logits, dtype), jnp.asarray(tokens), jnp.asarray(mask),
                 reduction="mean")
  np.testing.assert_allclose(np.asarray(got_sum), [math.log(5 / 8) + math.log(3 / 4)], **TOL[dtype])
  np.testing.assert_allclose(np.asarray(got_mean), [(math.log(5 / 8) + math.log(3 / 4)) / 2],
                             **TOL[dtype])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_invariant_to_left_and_right_padding(dtype, reduction):
  logits, tokens, mask = _batch(seed=1)
  rng = np.random.default_rng(7)
  left, right = 3, 2
  pad_logits = lambda n: rng.normal(size=(3, n, 5)) * 10.0
  pad_tokens = lambda n: rng.integers(0, 5, size=(3, n))
  logits2 = np.concatenate([pad_logits(left), logits, pad_logits(right)], axis=1)
  tokens2 = np.concatenate([pad_tokens(left), tokens, pad_tokens(right)], axis=1)
  mask2 = np.pad(mask, ((0, 0), (left, right)))
  f = lambda lg, tk, m: logprobs.sequence_logprobs(jnp.asarray(lg, dtype), jnp.asarray(tk),
                                                   jnp.asarray(m), reduction)
  np.testing.assert_allclose(np.asarray(f(logits2, tokens2, mask2)),
                             np.asarray(f(logits, tokens, mask)), **TOL[dtype])


def test_prompt_and_pad_positions_never_counted(dtype):
  logits, tokens, mask = _batch(seed=2)
  base = logprobs.sequence_logprobs(jnp.asarray(logits, dtype), jnp.asarray(tokens),
                                    jnp.asarray(mask))
  # Positions whose logits predict a non-response token, and those tokens' ids.
  predicts_response = np.zeros_like(mask)
  predicts_response[:, :-1] = mask[:, 1:]
  logits2 = np.where(predicts_response[..., None], logits, 50.0 * np.sign(logits))
  tokens2 = np.where(mask, tokens, (tokens + 1) % 5)
  got = logprobs.sequence_logprobs(jnp.asarray(logits2, dtype), jnp.asarray(tokens2),
                                   jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(base), **TOL[dtype])
  # A changed response token does change it: the test above can fail.
  tokens3 = tokens.copy()
  tokens3[0, 3] = (tokens3[0, 3] + 1) % 5
  got3 = logprobs.sequence_logprobs(jnp.asarray(logits, dtype), jnp.asarray(tokens3),
                                    jnp.asarray(mask))
  assert abs(float(got3[0] - base[0])) > 1e-3


def test_mean_is_sum_over_response_count_and_empty_rows_are_zero(dtype):
  logits, tokens, mask = _batch(seed=3)
  mask[2] = False  # a padded row without response tokens
  tok = logprobs.token_logprobs_from_logits(jnp.asarray(logits, dtype), jnp.asarray(tokens))
  s = logprobs.reduce_logprobs(tok, jnp.asarray(mask), "sum")
  m = logprobs.reduce_logprobs(tok, jnp.asarray(mask), "mean")
  counts = mask.sum(-1)
  np.testing.assert_allclose(np.asarray(m[:2]) * counts[:2], np.asarray(s[:2]), **TOL[dtype])
  assert float(s[2]) == 0.0 and float(m[2]) == 0.0


def test_masked_entropy_matches_numpy(dtype, maybe_jit):
  logits, _, mask = _batch(seed=4)
  got = maybe_jit(logprobs.masked_entropy)(jnp.asarray(logits, dtype), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), ref.masked_entropy(logits, mask), **TOL[dtype])
  # Uniform predicting logits give log V; pad logits (huge) must not leak in.
  uniform = np.where(np.pad(mask[:, 1:], ((0, 0), (0, 1)))[..., None], 0.0, 30.0 * logits)
  got_u = logprobs.masked_entropy(jnp.asarray(uniform, dtype), jnp.asarray(mask))
  np.testing.assert_allclose(float(got_u), math.log(5), **TOL[dtype])


def test_bf16_logits_accumulate_in_f32():
  logits, tokens, mask = _batch(seed=5)
  got = logprobs.sequence_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens),
                                   jnp.asarray(mask))
  assert got.dtype == jnp.float32
  # bf16 rounding of the logits (8 mantissa bits, |logit| <~ 6) moves each log-prob
  # by < 0.05; sums of <= 5 tokens stay within 0.25.
  want = ref.sequence_logprobs(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64),
                               tokens, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(got) - ref.sequence_logprobs(logits, tokens, mask))) < 0.25


def test_bad_inputs_raise_clear_errors():
  logits, tokens, mask = _batch()
  lg, tk, m = jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)
  with pytest.raises(ValueError, match="reduction"):
    logprobs.sequence_logprobs(lg, tk, m, reduction="max")
  with pytest.raises(ValueError, match="tokens must have shape"):
    logprobs.sequence_logprobs(lg, tk[:, :-1], m)
  with pytest.raises(ValueError, match="logits must have shape"):
    logprobs.sequence_logprobs(lg[0], tk, m)
  with pytest.raises(ValueError, match="response_mask must have shape"):
    logprobs.sequence_logprobs(lg, tk, m[:, :-1])
  with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
    logprobs.sequence_logprobs(lg, tk, m.at[0, 0].set(True))
  with pytest.raises(ValueError, match="integer"):
    logprobs.sequence_logprobs(lg, tk.astype(jnp.float32), m)
