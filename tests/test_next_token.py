"""Tests for the sampler's token draw, onpo_jax.next_token.categorical (two-stage inverse CDF).

The numpy reference is written independently (float64 `searchsorted` per stage).
Indices must equal it exactly, except where a stage's target lies within
rounding of a cumulative sum: 1e-5 of the total in float32 (sums of up to 256
terms, each rounded to ~6e-8 relative), 1e-14 in float64. Distribution tests use
scipy.stats.chisquare with fixed keys and require p > 1e-3; -inf logits must
never be drawn.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from onpo_jax import next_token as next_token_lib
import numpy_refs


def np_inverse_cdf(w, u):
  """First index whose float64 cumulative weight exceeds u · total (`searchsorted`).

  Returns (index, distance from the target to the nearest cumulative sum, relative
  to the total): where that distance is within rounding, float32 sums may rightly
  pick a neighbour.
  """
  cum = np.cumsum(w)
  target = u * cum[-1]
  i = min(np.searchsorted(cum, target, side="right"), np.flatnonzero(w > 0).max())
  return i, np.abs(cum - target).min() / cum[-1]


def np_two_stage_inverse_cdf(u, logits, block):
  """Reference of the two-stage sampler: a block by its mass (u[0]), a token in it (u[1])."""
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  vocab = z.shape[-1]
  block = min(block, vocab)
  num_blocks = -(-vocab // block)
  p = np.concatenate([p, np.zeros((len(p), num_blocks * block - vocab))], -1)
  p = p.reshape(len(p), num_blocks, block)
  out, margin = np.zeros(len(p), np.int64), np.zeros(len(p))
  for r in range(len(p)):
    b, margin_b = np_inverse_cdf(p[r].sum(-1), u[0, r])
    i, margin_i = np_inverse_cdf(p[r, b], u[1, r])
    out[r], margin[r] = b * block + i, min(margin_b, margin_i)
  return out, margin


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("block", [4, 7, 256])
def test_categorical_from_uniforms_matches_numpy(use_jit, x64, block):
  """Same indices as an independent float64 inverse CDF, except within rounding of a boundary."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(64, 50)) * 3.0
  logits[:, ::3] = -np.inf  # filtered tokens must never come out
  logits[1, :] = -np.inf
  logits[1, 17] = 0.0  # a single allowed token
  logits[2, :28] = -np.inf  # whole blocks without mass (block 4 and 7)
  u = rng.uniform(size=(2, 64))
  u[:, 3] = 0.0
  u[:, 4] = np.nextafter(1.0, 0.0, dtype=np.float32)  # the largest float32 below 1
  u[0, 5], u[1, 6] = 0.0, np.nextafter(1.0, 0.0, dtype=np.float32)
  ref, margin = np_two_stage_inverse_cdf(u, logits, block)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    f = functools.partial(next_token_lib.categorical_from_uniforms, block=block)
    f = jax.jit(f) if use_jit else f
    got = np.asarray(f(jnp.asarray(u, dtype), jnp.asarray(logits, dtype)))
  assert got.dtype == np.int32 and got.shape == (64,)
  assert np.isfinite(logits[np.arange(64), got]).all()
  assert got[1] == 17
  # float32 cumulative sums differ from float64 ones by ~1e-7 of the total.
  near = margin < (1e-14 if x64 else 1e-5)
  assert near.sum() <= 4  # the rows forced onto 0 and 1, not the random ones
  np.testing.assert_array_equal(got[~near], ref[~near])
  assert len(set(got.tolist())) > 10  # really spread, not a constant


def test_categorical_from_uniforms_edge_rows():
  """A row without finite logits gives 0; a target at the total (u = 1, reachable only
  through rounding) gives the last allowed token, not a filtered one."""
  logits = jnp.full((3, 9), -jnp.inf).at[1, 5].set(2.0).at[2, :6].set(0.0)
  u = jnp.asarray([[0.5, 0.5, 1.0], [0.5, 0.5, 1.0]])
  got = next_token_lib.categorical_from_uniforms(u, logits, block=4)
  np.testing.assert_array_equal(np.asarray(got), [0, 5, 5])


@pytest.mark.parametrize("x64", [False, True])
def test_categorical_frequencies_chi_square(x64):
  """Keyed samples follow softmax(logits), -inf entries excluded, across blocks and padding."""
  n, vocab = 20000, 700  # 3 blocks of 256, the last one padded
  logits = np.random.default_rng(4).normal(size=vocab)
  logits[250:262] = -np.inf  # straddles a block boundary
  logits[600:] -= 4.0  # light tail in the padded block
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    x = jnp.broadcast_to(jnp.asarray(logits, dtype), (n, vocab))
    draw = jax.jit(next_token_lib.categorical)
    got = np.asarray(draw(jax.random.key(5), x))
    again = np.asarray(draw(jax.random.key(5), x))
  np.testing.assert_array_equal(got, again)
  probs = np.exp(numpy_refs.log_softmax(logits))
  counts = np.bincount(got, minlength=vocab)
  assert counts[~np.isfinite(logits)].sum() == 0
  support = np.isfinite(logits)
  result = stats.chisquare(counts[support], probs[support] * n)
  assert result.pvalue > 1e-3, result
