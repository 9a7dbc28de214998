"""Tests for onpo_jax.pairs: tournament counts/brackets, λ_p frequencies, all_pairs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from onpo_jax import oracle as oracle_lib
from onpo_jax import pairs


def _recording_compare(strength, last_result=None):
  """Deterministic transitive compare (higher strength wins) that logs each call's size."""
  calls = []

  def compare_fn(key, i, j):
    del key
    calls.append(i.shape[1])
    s = jnp.asarray(strength)
    return jnp.take_along_axis(s, i, 1) > jnp.take_along_axis(s, j, 1)

  return compare_fn, calls


@pytest.mark.parametrize("k,expected", [(2, 2), (4, 5), (8, 11), (16, 23)])
def test_tournament_power_of_two_uses_3k_over_2_minus_1(k, expected):
  assert expected == 3 * k // 2 - 1
  rng = np.random.default_rng(k)
  strength = np.stack([rng.permutation(k) for _ in range(6)]).astype(np.int32)
  fn, calls = _recording_compare(strength)
  out, n_cmp = pairs.tournament(fn, jax.random.key(0), 6, k)
  assert sum(calls) == expected == n_cmp == pairs.tournament_num_comparisons(k)
  # Transitive, deterministic preferences: the tournament finds the true extremes
  # and the final check confirms them.
  np.testing.assert_array_equal(np.asarray(out.chosen)[:, 0], strength.argmax(1))
  np.testing.assert_array_equal(np.asarray(out.rejected)[:, 0], strength.argmin(1))
  np.testing.assert_array_equal(np.asarray(out.weight), np.ones((6, 1)))


@pytest.mark.parametrize("k", [3, 5, 6, 7])
def test_tournament_with_byes(k):
  rng = np.random.default_rng(k)
  strength = np.stack([rng.permutation(k) for _ in range(20)]).astype(np.int32)
  fn, calls = _recording_compare(strength)
  out, n_cmp = pairs.tournament(fn, jax.random.key(0), 20, k)
  assert sum(calls) == n_cmp == k // 2 + 2 * ((k + 1) // 2 - 1) + 1
  np.testing.assert_array_equal(np.asarray(out.chosen)[:, 0], strength.argmax(1))
  np.testing.assert_array_equal(np.asarray(out.rejected)[:, 0], strength.argmin(1))
  assert (np.asarray(out.weight) == 1).all()


def test_tournament_keeps_pair_only_if_winner_wins_final_check():
  k, n = 8, 5
  calls = []

  def compare_fn(key, i, j):
    calls.append(i.shape[1])
    # Lower index wins every bracket game; the final check (the 4th call:
    # 1 first round + 2 bracket levels of 4 -> 2 -> 1) says the winner loses for odd prompts.
    if len(calls) == 4:
      return jnp.asarray(np.arange(n)[:, None] % 2 == 0)
    return i < j

  out, _ = pairs.tournament(compare_fn, jax.random.key(0), n, k)
  assert sum(calls) == 11
  np.testing.assert_array_equal(np.asarray(out.chosen)[:, 0], np.zeros(n))
  np.testing.assert_array_equal(np.asarray(out.rejected)[:, 0], np.full(n, k - 1))
  np.testing.assert_array_equal(np.asarray(out.weight)[:, 0], (np.arange(n) % 2 == 0) * 1.0)


def test_tournament_drops_degenerate_bye_pair():
  # K = 3: the bye (index 2) beats the first-round winner and loses to the
  # first-round loser, so it is both overall winner and loser: pair dropped.
  beats = jnp.asarray([[False, True, False], [False, False, True], [True, False, False]])

  def compare_fn(key, i, j):
    del key
    return beats[i, j]

  out, _ = pairs.tournament(compare_fn, jax.random.key(0), 1, 3)
  assert int(out.chosen[0, 0]) == int(out.rejected[0, 0]) == 2
  assert float(out.weight[0, 0]) == 0.0


def test_lambda_p_orders_pairs_with_frequency_p():
  k, n = 4, 24000
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(k, k)) * 1.5
  p = 1.0 / (1.0 + np.exp(-(logits - logits.T)))

  def compare_fn(key, i, j):
    u = jax.random.uniform(key, i.shape)
    return u < jnp.asarray(p, jnp.float32)[i, j]

  out, n_cmp = jax.jit(lambda key: pairs.lambda_p(compare_fn, key, n, k))(jax.random.key(3))
  assert n_cmp == 1
  w, l = np.asarray(out.chosen)[:, 0], np.asarray(out.rejected)[:, 0]
  assert (w != l).all() and (np.asarray(out.weight) == 1).all()
  for a, b in itertools.combinations(range(k), 2):
    a_first = int(((w == a) & (l == b)).sum())
    total = a_first + int(((w == b) & (l == a)).sum())
    # Each unordered pair is drawn with probability 1/6; p-values are from a fixed seed.
    assert stats.binomtest(total, n, 2.0 / (k * (k - 1))).pvalue > 1e-3
    assert stats.binomtest(a_first, total, p[a, b]).pvalue > 1e-3


def test_all_pairs_covers_every_pair_once():
  k, n = 5, 3
  fn, calls = _recording_compare(np.tile(np.arange(k), (n, 1)).astype(np.int32))
  out, n_cmp = pairs.all_pairs(fn, jax.random.key(0), n, k)
  assert n_cmp == sum(calls) == 10 == pairs.num_pairs_per_prompt("all_pairs", k)
  got = {tuple(sorted(x)) for x in zip(np.asarray(out.chosen)[0], np.asarray(out.rejected)[0])}
  assert got == set(itertools.combinations(range(k), 2))
  # Strength = index, so the larger index always wins.
  assert (np.asarray(out.chosen) > np.asarray(out.rejected)).all()


def test_oracle_compare_fn_and_determinism():
  o = oracle_lib.make_synthetic_oracle(jax.random.key(0), vocab_size=4, max_prompt_length=3,
                                       max_response_length=3)
  rng = np.random.default_rng(0)
  n, k = 16, 8
  pt = rng.integers(0, 4, (n, 3)).astype(np.int32)
  pm = np.ones((n, 3), bool)
  resp = rng.integers(0, 4, (n, k, 3)).astype(np.int32)
  rm = np.ones((n, k, 3), bool)
  fn = pairs.oracle_compare_fn(o, pt, pm, resp, rm)
  run = jax.jit(lambda key: pairs.build_pairs("tournament", fn, key, n, k)[0])
  run_seed = lambda seed: run(jax.random.key(seed))
  a, b, c = run_seed(1), run_seed(1), run_seed(2)
  # Each pair of distinct responses, ordered; weight 1 or 0 only.
  assert (np.asarray(a.chosen) != np.asarray(a.rejected)).all()
  assert set(np.unique(np.asarray(a.weight))) <= {0.0, 1.0}
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any((np.asarray(x) != np.asarray(y)).any() for x, y in zip(a, c))


def test_bad_arguments():
  fn, _ = _recording_compare(np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match="k .responses per prompt"):
    pairs.tournament(fn, jax.random.key(0), 1, 1)
  with pytest.raises(ValueError, match="pairing"):
    pairs.build_pairs("best_of", fn, jax.random.key(0), 1, 2)
