"""Statistics over seeds (`onpo_jax.infra.stats`): numbers checked by hand and against scipy."""

import math

import numpy as np
import pytest
import scipy.stats

from onpo_jax.infra import stats

T975_2 = 4.302652729749464  # t_{0.975} with 2 degrees of freedom
T975_4 = 2.7764451051977987  # t_{0.975} with 4 degrees of freedom


def test_mean_ci_t_by_hand_and_scipy():
  mean, half = stats.mean_ci([1.0, 2.0, 3.0])
  # s = 1, half-width t·s/√S.
  assert mean == 2.0
  np.testing.assert_allclose(half, T975_2 / math.sqrt(3), rtol=1e-12)
  x = np.random.default_rng(0).normal(size=(7, 3))
  mean, half = stats.mean_ci(x, level=0.9)
  low, high = scipy.stats.t.interval(0.9, 6, loc=x.mean(0), scale=scipy.stats.sem(x, axis=0))
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(mean - half, low, rtol=1e-12)
  np.testing.assert_allclose(mean + half, high, rtol=1e-12)


def test_bootstrap_by_hand():
  # Two seeds {0, 1}: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2,
  # 1/4, so the 2.5% and 97.5% quantiles are 0 and 1.
  low, high = stats.bootstrap_interval([0.0, 1.0], 0.95, num_resamples=2000)
  assert (low, high) == (0.0, 1.0)
  mean, half = stats.mean_ci([0.0, 1.0], method="bootstrap", num_resamples=2000)
  assert (mean, half) == (0.5, 0.5)
  assert stats.mean_ci([2.0, 2.0, 2.0], method="bootstrap")[1] == 0.0
  # Many seeds: the bootstrap interval is close to the t interval (normal data).
  x = np.random.default_rng(1).normal(size=(200,))
  _, t_half = stats.mean_ci(x)
  _, b_half = stats.mean_ci(x, method="bootstrap", num_resamples=4000)
  assert abs(b_half / t_half - 1.0) < 0.1


def test_loglog_slope_by_hand():
  e = math.e
  # x = log t = (0, 1, 2), y = (0, −1, −3): slope Σ(x−x̄)(y−ȳ)/Σ(x−x̄)² = −3/2.
  np.testing.assert_allclose(stats.loglog_slope([1, e, e ** 2], np.exp([0.0, -1.0, -3.0])),
                             -1.5, rtol=1e-12)
  ts = np.arange(1, 101)
  np.testing.assert_allclose(stats.loglog_slope(ts, 3.0 / ts), -1.0, rtol=1e-12)
  both = stats.loglog_slope(ts, np.stack([ts ** -0.5, 7.0 * ts ** -2.0]))
  np.testing.assert_allclose(both, [-0.5, -2.0], rtol=1e-12)
  # Flat before t = 10, 100/t² after: t_min keeps only the power law.
  g = np.where(ts < 10, 1.0, 100.0 / ts ** 2)
  np.testing.assert_allclose(stats.loglog_slope(ts, g, t_min=10), -2.0, rtol=1e-12)


def test_slope_ci_by_hand():
  ts = np.arange(1, 51)
  gaps = np.stack([2.0 * ts ** -a for a in (1.0, 1.2, 0.8)])
  out = stats.slope_ci(ts, gaps)
  np.testing.assert_allclose(out.per_seed, [-1.0, -1.2, -0.8], rtol=1e-12)
  np.testing.assert_allclose(out.slope, -1.0, rtol=1e-12)
  np.testing.assert_allclose(out.half_width, T975_2 * 0.2 / math.sqrt(3), rtol=1e-10)


def test_differs_welch_by_hand_and_scipy():
  a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
  out = stats.differs(a, b)
  # d = −3, se = √(1/3 + 1/3), Welch df = (2/3)² / (2·(1/3)²/2) = 4.
  se = math.sqrt(2.0 / 3.0)
  assert out.diff == -3.0
  np.testing.assert_allclose(out.p_value, 2 * scipy.stats.t.sf(3.0 / se, 4), rtol=1e-12)
  np.testing.assert_allclose([out.low, out.high], [-3 - T975_4 * se, -3 + T975_4 * se],
                             rtol=1e-12)
  assert out.significant  # p ≈ 0.021 < 0.05
  assert not stats.differs(a, b, level=0.99).significant
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(5, 4)), rng.normal(0.5, 2.0, size=(8, 4))
  res = scipy.stats.ttest_ind(x, y, equal_var=False, axis=0)
  ci = res.confidence_interval(0.9)
  out = stats.differs(x, y, level=0.9)
  np.testing.assert_allclose(out.p_value, res.pvalue, rtol=1e-10)
  np.testing.assert_allclose(out.low, ci.low, rtol=1e-10)
  np.testing.assert_allclose(out.high, ci.high, rtol=1e-10)
  np.testing.assert_array_equal(out.significant, res.pvalue < 0.1)


def test_differs_paired_and_degenerate():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(6,))
  b = a + 0.3 + 0.1 * rng.normal(size=(6,))
  res = scipy.stats.ttest_rel(a, b)
  out = stats.differs(a, b, paired=True)
  np.testing.assert_allclose(out.p_value, res.pvalue, rtol=1e-10)
  ci = res.confidence_interval(0.95)
  np.testing.assert_allclose([out.low, out.high], [ci.low, ci.high], rtol=1e-10)
  # No spread: any difference is certain, none is not.
  out = stats.differs([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
  assert out.significant and out.p_value == 0.0 and out.low == out.high == -1.0
  out = stats.differs([1.0, 1.0], [1.0, 1.0], paired=True)
  assert not out.significant and out.p_value == 1.0
  # Only one side varies: Welch reduces to a one-sample test of the other's mean.
  out = stats.differs([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  np.testing.assert_allclose(out.p_value, scipy.stats.ttest_1samp([1.0, 2.0, 3.0], 0.0).pvalue,
                             rtol=1e-10)


def test_holm_by_hand():
  # p = (0.04, 0.01, 0.03, 0.5), m = 4. Sorted: 0.01·4 = 0.04, 0.03·3 = 0.09,
  # 0.04·2 = 0.08 -> max(0.09, 0.08) = 0.09 (step-down is monotone), 0.5·1 = 0.5.
  np.testing.assert_allclose(stats.holm([0.04, 0.01, 0.03, 0.5]), [0.09, 0.04, 0.09, 0.5],
                             rtol=1e-15)
  # Capped at 1; ties keep their order; a family of one is unchanged; empty is empty.
  np.testing.assert_allclose(stats.holm([0.6, 0.6, 0.2]), [1.0, 1.0, 0.6], rtol=1e-15)
  assert stats.holm([0.037]).tolist() == [0.037]
  assert stats.holm([]).shape == (0,)
  with pytest.raises(ValueError, match="holm: p_values must lie in"):
    stats.holm([0.1, 1.5])


def test_bad_inputs_raise_named_errors():
  for level in (0.0, 1.0, 1.5, "0.9"):
    with pytest.raises(ValueError, match="level must be a number in \\(0, 1\\)"):
      stats.mean_ci([1.0, 2.0], level=level)
  with pytest.raises(ValueError, match="values needs S >= 2"):
    stats.mean_ci([1.0])
  with pytest.raises(ValueError, match="method must be one of"):
    stats.mean_ci([1.0, 2.0], method="z")
  with pytest.raises(ValueError, match="values must be finite"):
    stats.mean_ci([1.0, np.nan])
  with pytest.raises(ValueError, match="num_resamples"):
    stats.bootstrap_interval([1.0, 2.0], num_resamples=0)
  with pytest.raises(ValueError, match="gaps must be finite and > 0"):
    stats.loglog_slope([1, 2, 3], [1.0, 0.0, 0.5])
  with pytest.raises(ValueError, match="ts must be 1-D"):
    stats.loglog_slope([[1, 2]], [1.0, 2.0])
  with pytest.raises(ValueError, match="gaps must have shape"):
    stats.loglog_slope([1, 2, 3], [1.0, 2.0])
  with pytest.raises(ValueError, match="at least 2 distinct ts"):
    stats.loglog_slope([1, 2, 3], [1.0, 0.5, 0.3], t_min=3)
  with pytest.raises(ValueError, match="gaps_per_seed must have shape \\[S, T\\]"):
    stats.slope_ci([1, 2], [1.0, 0.5])
  with pytest.raises(ValueError, match="b_seeds needs S >= 2"):
    stats.differs([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="paired needs the same number of seeds"):
    stats.differs([1.0, 2.0], [1.0, 2.0, 3.0], paired=True)
  with pytest.raises(ValueError, match="trailing shape"):
    stats.differs(np.zeros((3, 2)), np.zeros((3, 4)))
