"""Tests for onpo_jax.pairs: tournament counts/brackets, λ_p frequencies, all_pairs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from onpo_jax import oracles as oracle_lib
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
  run = jax.jit(lambda key: pairs.build_pairs("tournament", fn, key, n, k,
                                              tournament_mode="bernoulli")[0])
  run_seed = lambda seed: run(jax.random.key(seed))
  a, b, c = run_seed(1), run_seed(1), run_seed(2)
  # Each pair of distinct responses, ordered; weight 1 or 0 only.
  assert (np.asarray(a.chosen) != np.asarray(a.rejected)).all()
  assert set(np.unique(np.asarray(a.weight))) <= {0.0, 1.0}
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any((np.asarray(x) != np.asarray(y)).any() for x, y in zip(a, c))


def _inpo_k8_reference(p):
  """INPO's annotation script for K = 8 (get_match_res; tie -> first; final check strict)."""
  def match(i, j):
    return (i, j) if p[i, j] >= 0.5 else (j, i)

  w1, l1 = match(0, 1)
  w2, l2 = match(2, 3)
  w3, l3 = match(4, 5)
  w4, l4 = match(6, 7)
  win = match(match(w1, w2)[0], match(w3, w4)[0])[0]
  lose = match(match(l1, l2)[1], match(l3, l4)[1])[1]
  return win, lose, float(p[win, lose] > 0.5)


def _random_preferences(rng, n, k):
  """[n, k, k] general (mostly intransitive) preferences with P + Pᵀ = 1, diagonal ½."""
  upper = rng.uniform(size=(n, k, k)).astype(np.float32)
  p = np.triu(upper, 1) + np.tril(1.0 - np.swapaxes(upper, 1, 2), -1)
  p[:, np.arange(k), np.arange(k)] = 0.5
  return p


def _matrix_compare(p):
  p = jnp.asarray(p)
  return pairs.PreferenceCompare(
      lambda i, j: p[jnp.arange(p.shape[0])[:, None], i, j])


def test_deterministic_tournament_is_inpo_bracket_for_every_key():
  n, k = 64, 8
  p = _random_preferences(np.random.default_rng(0), n, k)
  want = np.asarray([_inpo_k8_reference(p[x]) for x in range(n)])
  fn = _matrix_compare(p)
  run = jax.jit(lambda key: pairs.build_pairs("tournament", fn, key, n, k)[0])
  for seed in range(4):
    out = run(jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out.chosen)[:, 0], want[:, 0])
    np.testing.assert_array_equal(np.asarray(out.rejected)[:, 0], want[:, 1])
    np.testing.assert_array_equal(np.asarray(out.weight)[:, 0], want[:, 2])
  # Some final checks fail (intransitive P), so the check really is applied.
  assert 0 < want[:, 2].sum() < n
  # The same pairs without build_pairs, and not those of the Bernoulli mode.
  direct, _ = pairs.tournament(fn, jax.random.key(9), n, k)
  np.testing.assert_array_equal(np.asarray(direct.chosen)[:, 0], want[:, 0])
  drawn = jax.jit(lambda key: pairs.tournament(fn, key, n, k, "bernoulli")[0])
  assert any((np.asarray(drawn(jax.random.key(s)).chosen)[:, 0] != want[:, 0]).any()
             for s in range(4))


def test_deterministic_tournament_ties_go_to_the_first():
  k = 8
  p = np.full((1, k, k), 0.5, np.float32)
  # Every game a tie: the first of each pair wins, so W = 0 and L = 7 (losers
  # 1, 3, 5, 7 -> 3, 7 -> 7); the final check is a tie too, which keeps no pair.
  out, _ = pairs.tournament(_matrix_compare(p), jax.random.key(0), 1, k)
  assert (int(out.chosen[0, 0]), int(out.rejected[0, 0]), float(out.weight[0, 0])) == (0, 7, 0.0)
  # One decided game among ties: 5 beats 4 (P(4 ≻ 5) < ½), the rest stay ties.
  p[0, 4, 5], p[0, 5, 4] = 0.25, 0.75
  out, _ = pairs.tournament(_matrix_compare(p), jax.random.key(0), 1, k)
  assert (int(out.chosen[0, 0]), int(out.rejected[0, 0])) == (0, 7)
  want = _inpo_k8_reference(p[0])
  assert (int(out.chosen[0, 0]), int(out.rejected[0, 0]), float(out.weight[0, 0])) == want


def test_oracle_tournament_is_deterministic_by_default():
  o = oracle_lib.make_synthetic_oracle(jax.random.key(0), vocab_size=4, max_prompt_length=3,
                                       max_response_length=3)
  rng = np.random.default_rng(1)
  n, k = 8, 8
  pt = rng.integers(0, 4, (n, 3)).astype(np.int32)
  pm = np.ones((n, 3), bool)
  resp = rng.integers(0, 4, (n, k, 3)).astype(np.int32)
  rm = np.ones((n, k, 3), bool)
  # The full matrix P[x, i, j], one oracle call, as the reference bracket's input.
  ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  flat = lambda a, idx: a[np.arange(n)[:, None], idx.reshape(1, -1)].reshape(n * k * k, -1)
  prob = np.asarray(jax.jit(o.preference_prob)(
      jnp.asarray(np.repeat(pt, k * k, 0)), jnp.asarray(np.repeat(pm, k * k, 0)),
      jnp.asarray(flat(resp, ii)), jnp.asarray(flat(rm, ii)), jnp.asarray(flat(resp, jj)),
      jnp.asarray(flat(rm, jj)))).reshape(n, k, k)
  want = np.asarray([_inpo_k8_reference(prob[x]) for x in range(n)])
  fn = pairs.oracle_compare_fn(o, pt, pm, resp, rm)
  run = jax.jit(lambda key: pairs.build_pairs("tournament", fn, key, n, k)[0])
  for seed in (1, 2, 3):
    out = run(jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out.chosen)[:, 0], want[:, 0])
    np.testing.assert_array_equal(np.asarray(out.rejected)[:, 0], want[:, 1])
    np.testing.assert_array_equal(np.asarray(out.weight)[:, 0], want[:, 2])


@pytest.mark.parametrize("pairing", ["lambda_p", "all_pairs"])
def test_lambda_p_and_all_pairs_stay_bernoulli_with_probabilities(pairing):
  k, n = 3, 6000
  p = np.asarray([[0.5, 0.8, 0.35], [0.2, 0.5, 0.6], [0.65, 0.4, 0.5]], np.float32)
  fn = _matrix_compare(np.broadcast_to(p, (n, k, k)))
  # tournament_mode is the tournament's only: these builders still draw.
  out, _ = jax.jit(lambda key: pairs.build_pairs(pairing, fn, key, n, k,
                                                 tournament_mode="deterministic"))(
                                                     jax.random.key(5))
  w, l = np.asarray(out.chosen).ravel(), np.asarray(out.rejected).ravel()
  for a, b in itertools.combinations(range(k), 2):
    a_first = int(((w == a) & (l == b)).sum())
    total = a_first + int(((w == b) & (l == a)).sum())
    assert 0 < a_first < total  # a deterministic rule would give 0 or total
    assert stats.binomtest(a_first, total, float(p[a, b])).pvalue > 1e-3


def test_bad_arguments():
  fn, _ = _recording_compare(np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match="k .responses per prompt"):
    pairs.tournament(fn, jax.random.key(0), 1, 1)
  with pytest.raises(ValueError, match="pairing"):
    pairs.build_pairs("best_of", fn, jax.random.key(0), 1, 2)
  with pytest.raises(ValueError, match="mode must be one of"):
    pairs.build_pairs("tournament", fn, jax.random.key(0), 1, 2, tournament_mode="coin")
