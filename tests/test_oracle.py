"""Tests for onpo_jax.oracle: exact symmetry, numpy references, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from onpo_jax import oracles as oracle_lib

V, P_LEN, R_LEN, D = 5, 4, 3, 8


def _np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_embed(table, tokens, mask):
  """Independent numpy reference: positions counted from the first real token."""
  out = np.zeros((tokens.shape[0], table.shape[2]))
  for n in range(tokens.shape[0]):
    real = [t for t, m in zip(tokens[n], mask[n]) if m]
    for pos, tok in enumerate(real):
      out[n] += table[pos, tok]
    out[n] /= np.sqrt(max(len(real), 1))
  return out


def _np_prob(o, pt, pm, at, am, bt, bm):
  """P(a ≻ b | x) from the module docstring's formula, in float64 numpy."""
  tables = {k: np.asarray(getattr(o, k), np.float64) for k in
            ("prompt_table", "response_table", "w", "m", "v")}
  hx = _np_embed(tables["prompt_table"], pt, pm)
  pa = np.tanh(hx + _np_embed(tables["response_table"], at, am))
  pb = np.tanh(hx + _np_embed(tables["response_table"], bt, bm))
  d = tables["w"].shape[0]
  kappa = np.clip(float(o.cyclic) + float(o.cyclic_spread) * (_np_sigmoid(hx @ tables["v"]) - 0.5),
                  0, 1)
  s = lambda p: p @ tables["w"] / np.sqrt(d)
  m = tables["m"]
  anti = (np.einsum("ni,ij,nj->n", pa, m, pb) - np.einsum("ni,ij,nj->n", pb, m, pa)) / d
  z = float(o.strength) * ((1 - kappa) * (s(pa) - s(pb)) + kappa * anti)
  return _np_sigmoid(z)


def _batch(seed, n=64):
  rng = np.random.default_rng(seed)
  pt = rng.integers(0, V, (n, P_LEN)).astype(np.int32)
  plen = rng.integers(1, P_LEN + 1, n)
  # Left padding: the first P_LEN − len positions are pads.
  pm = np.arange(P_LEN)[None, :] >= (P_LEN - plen)[:, None]
  at = rng.integers(0, V, (n, R_LEN)).astype(np.int32)
  bt = rng.integers(0, V, (n, R_LEN)).astype(np.int32)
  am = np.arange(R_LEN)[None, :] < rng.integers(1, R_LEN + 1, n)[:, None]
  bm = np.arange(R_LEN)[None, :] < rng.integers(1, R_LEN + 1, n)[:, None]
  return pt, pm, at, am, bt, bm


def _oracle(seed=0, cyclic=0.5, spread=0.4, dtype=jnp.float32):
  return oracle_lib.make_synthetic_oracle(
      jax.random.key(seed), vocab_size=V, max_prompt_length=P_LEN, max_response_length=R_LEN,
      feature_dim=D, strength=2.0, cyclic=cyclic, cyclic_spread=spread, dtype=dtype)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("cyclic", [0.0, 0.5, 1.0])
def test_synthetic_matches_numpy_and_is_exactly_symmetric(use_jit, x64, cyclic):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    o = _oracle(cyclic=cyclic, dtype=dtype)
    pt, pm, at, am, bt, bm = _batch(1)
    f = lambda *a: o.preference_prob(*a)
    f = jax.jit(f) if use_jit else f
    p_ab = np.asarray(f(pt, pm, at, am, bt, bm))
    p_ba = np.asarray(f(pt, pm, bt, bm, at, am))
    p_aa = np.asarray(f(pt, pm, at, am, at, am))
    assert p_ab.dtype == dtype
    # Exact, not approximate: the module guarantees bit-exact complementarity.
    np.testing.assert_array_equal(p_ab + p_ba, np.ones_like(p_ab))
    np.testing.assert_array_equal(p_aa, np.full_like(p_aa, 0.5))
    # f32: a handful of ulps through tanh/einsum on O(1) values; f64: ~1e-15.
    tol = 1e-12 if x64 else 2e-6
    np.testing.assert_allclose(p_ab, _np_prob(o, pt, pm, at, am, bt, bm), atol=tol, rtol=0)


def test_cyclic_zero_is_bradley_terry_and_one_is_not():
  pt, pm, at, am, bt, bm = _batch(2)
  _, _, ct, cm, _, _ = _batch(3)
  logit = lambda o, x, xm, y, ym: np.log(o.preference_prob(pt, pm, x, xm, y, ym)) - np.log(
      o.preference_prob(pt, pm, y, ym, x, xm))
  with jax.enable_x64(True):
    for cyclic, transitive in ((0.0, True), (1.0, False)):
      o = _oracle(cyclic=cyclic, spread=0.0, dtype=jnp.float64)
      lhs = logit(o, at, am, ct, cm)
      rhs = logit(o, at, am, bt, bm) + logit(o, bt, bm, ct, cm)
      # BT logits add along a chain; the cyclic part does not.
      assert np.allclose(lhs, rhs, atol=1e-9) == transitive


def test_bt_reward_oracle_matches_numpy():
  o = _oracle()
  bt_oracle = oracle_lib.synthetic_reward_oracle(o)
  pt, pm, at, am, bt, bm = _batch(4)
  f = jax.jit(bt_oracle.preference_prob)
  p = np.asarray(f(pt, pm, at, am, bt, bm))
  ref = _np_prob(oracle_lib.make_synthetic_oracle(
      jax.random.key(0), vocab_size=V, max_prompt_length=P_LEN, max_response_length=R_LEN,
      feature_dim=D, strength=2.0, cyclic=0.0), pt, pm, at, am, bt, bm)
  np.testing.assert_allclose(p, ref, atol=2e-6)
  np.testing.assert_array_equal(p + np.asarray(f(pt, pm, bt, bm, at, am)), np.ones_like(p))


def test_left_padding_and_determinism():
  o = _oracle()
  pt, pm, at, am, bt, bm = _batch(5)
  # Extra left padding shifts the prompt but must not change P.
  pad = np.zeros((pt.shape[0], 2), np.int32)
  p1 = o.preference_prob(pt, pm, at, am, bt, bm)
  p2 = oracle_lib.make_synthetic_oracle(
      jax.random.key(0), vocab_size=V, max_prompt_length=P_LEN, max_response_length=R_LEN,
      feature_dim=D, strength=2.0, cyclic=0.5, cyclic_spread=0.4).preference_prob(
          np.concatenate([pad + 3, pt], 1), np.concatenate([pad.astype(bool), pm], 1),
          at, am, bt, bm)
  # Different shapes compile differently: equal up to f32 rounding of O(1) values.
  np.testing.assert_allclose(np.asarray(p1), np.asarray(p2), atol=1e-6, rtol=0)
  p3 = _oracle(seed=1).preference_prob(pt, pm, at, am, bt, bm)
  assert not np.allclose(p1, p3)


def test_compare_is_bernoulli_of_p_and_deterministic():
  o = _oracle()
  pt, pm, at, am, bt, bm = _batch(6, n=8)
  reps = 2000
  rep = lambda x: np.repeat(x, reps, axis=0)
  args = [rep(x) for x in (pt, pm, at, am, bt, bm)]
  key = jax.random.key(7)
  f = jax.jit(lambda k, *a: oracle_lib.compare(o, k, *a))
  wins = np.asarray(oracle_lib.compare(o, key, *args)).reshape(8, reps)
  again = np.asarray(f(key, *args))
  np.testing.assert_array_equal(wins.reshape(-1), again)
  other = np.asarray(f(jax.random.key(8), *args))
  assert (other != again).any()
  p = np.asarray(o.preference_prob(pt, pm, at, am, bt, bm))
  for row in range(8):
    # Fixed seed; p > 1e-4 for a correct Bernoulli(P) with overwhelming probability.
    assert stats.binomtest(int(wins[row].sum()), reps, float(p[row])).pvalue > 1e-4


def test_preference_matrix_matches_pairwise_calls():
  o = _oracle()
  pt, pm, *_ = _batch(7, n=3)
  ys = np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(3)], np.int32)
  ym = np.ones_like(ys, bool)
  mat = np.asarray(jax.jit(lambda *a: oracle_lib.preference_matrix(o, *a))(pt, pm, ys, ym))
  assert mat.shape == (3, len(ys), len(ys))
  np.testing.assert_array_equal(mat + mat.transpose(0, 2, 1), np.ones_like(mat))
  for x in range(3):
    for i in (0, 5, 11):
      direct = _np_prob(o, np.repeat(pt[x:x + 1], len(ys), 0), np.repeat(pm[x:x + 1], len(ys), 0),
                        np.repeat(ys[i:i + 1], len(ys), 0), np.repeat(ym[i:i + 1], len(ys), 0),
                        ys, ym)
      np.testing.assert_allclose(mat[x, i], direct, atol=2e-6)


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="cyclic"):
    oracle_lib.make_synthetic_oracle(jax.random.key(0), vocab_size=V, max_prompt_length=2,
                                     max_response_length=2, cyclic=1.5)
  with pytest.raises(ValueError, match="strength"):
    oracle_lib.make_synthetic_oracle(jax.random.key(0), vocab_size=V, max_prompt_length=2,
                                     max_response_length=2, strength=0.0)
  o = _oracle()
  pt, pm, at, am, bt, bm = _batch(8, n=4)
  with pytest.raises(ValueError, match="b_tokens"):
    o.preference_prob(pt, pm, at, am, bt[:3], bm[:3])
  with pytest.raises(ValueError, match="prompt_mask"):
    o.preference_prob(pt, pm[:, :2], at, am, bt, bm)
