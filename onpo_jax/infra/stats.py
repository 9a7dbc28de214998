"""Statistics over seeds: confidence intervals, log-log slopes and two-sample tests.

Numpy and scipy only. Every function takes seeds along axis 0 (`values[S, ...]`)
and works elementwise over the remaining axes, so one call summarises a whole
[S, T] curve. Conventions: `level` is the two-sided confidence level in (0, 1);
an interval needs S ≥ 2 seeds.

References: Student t interval and Welch's unequal-variance t-test (Welch 1947,
Welch–Satterthwaite degrees of freedom); percentile bootstrap (Efron &
Tibshirani 1993, ch. 13). The convergence-rate slopes are least-squares fits of
log gap on log t, the form of docs/algorithm.md §2's rates (O(1/√T) for OMD,
O(1/T) for ONPO's average iterate).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import scipy.stats

METHODS = ("t", "bootstrap")


class SlopeCI(NamedTuple):
  """`slope_ci` result: mean slope over seeds, its t half-width, per-seed slopes [S]."""

  slope: float
  half_width: float
  per_seed: np.ndarray


class Difference(NamedTuple):
  """`differs` result (elementwise arrays, or floats for 1-D input).

  Attributes:
    significant: p_value < 1 − level (equivalently the interval excludes 0).
    p_value: two-sided p-value of the t-test.
    diff: mean(a) − mean(b) (mean of a − b when paired).
    low, high: the `level` confidence interval of the difference.
  """

  significant: np.ndarray
  p_value: np.ndarray
  diff: np.ndarray
  low: np.ndarray
  high: np.ndarray


def _check_level(fn: str, level) -> float:
  if not (isinstance(level, (int, float, np.floating)) and 0.0 < float(level) < 1.0):
    raise ValueError(f"{fn}: level must be a number in (0, 1), got {level!r}")
  return float(level)


def _seeds(fn: str, name: str, values, min_seeds: int = 2) -> np.ndarray:
  x = np.asarray(values, np.float64)
  if x.ndim < 1:
    raise ValueError(f"{fn}: {name} must have seeds on axis 0, shape [S, ...]; got a scalar")
  if x.shape[0] < min_seeds:
    raise ValueError(f"{fn}: {name} needs S >= {min_seeds} seeds on axis 0 for an interval, "
                     f"got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{fn}: {name} must be finite")
  return x


def _scalar(x):
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x


def _t_quantile(level: float, df):
  return scipy.stats.t.ppf(0.5 + level / 2.0, df)


def bootstrap_interval(values, level: float = 0.95, *, num_resamples: int = 10000,
                       seed: int = 0):
  """Percentile-bootstrap interval of the mean over seeds (axis 0).

  Args:
    values: [S, ...] with S ≥ 2.
    level: confidence level in (0, 1).
    num_resamples: bootstrap resamples ≥ 1 (each draws S seeds with replacement).
    seed: seed of the resampling (numpy `default_rng`).

  Returns:
    (low, high), each shaped like values[0] (floats for 1-D input).
  """
  fn = "bootstrap_interval"
  level = _check_level(fn, level)
  x = _seeds(fn, "values", values)
  if not (isinstance(num_resamples, int) and num_resamples >= 1):
    raise ValueError(f"{fn}: num_resamples must be an integer >= 1, got {num_resamples!r}")
  s = x.shape[0]
  idx = np.random.default_rng(seed).integers(0, s, size=(num_resamples, s))
  means = x[idx].mean(axis=1)  # [R, ...]
  alpha = 1.0 - level
  low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
  return _scalar(low), _scalar(high)


def mean_ci(values, level: float = 0.95, method: str = "t", *, num_resamples: int = 10000,
            seed: int = 0):
  """Mean over seeds (axis 0) and the half-width of its confidence interval.

  't': Student t interval, mean ± t_{S−1, (1+level)/2} · s/√S with the sample
  standard deviation s (ddof = 1). 'bootstrap': half the width of the
  percentile-bootstrap interval (`bootstrap_interval`, which also gives the
  possibly asymmetric ends).

  Args:
    values: [S, ...] with S ≥ 2.
    level: confidence level in (0, 1).
    method: 't' or 'bootstrap'.
    num_resamples: bootstrap resamples (method 'bootstrap').
    seed: bootstrap seed.

  Returns:
    (mean, half_width), each shaped like values[0] (floats for 1-D input).
  """
  fn = "mean_ci"
  level = _check_level(fn, level)
  if method not in METHODS:
    raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
  x = _seeds(fn, "values", values)
  mean = x.mean(axis=0)
  if method == "t":
    s = x.shape[0]
    half = _t_quantile(level, s - 1) * x.std(axis=0, ddof=1) / np.sqrt(s)
  else:
    low, high = bootstrap_interval(x, level, num_resamples=num_resamples, seed=seed)
    half = (np.asarray(high) - np.asarray(low)) / 2.0
  return _scalar(mean), _scalar(half)


def _loglog_xy(fn: str, ts, gaps, t_min: Optional[float]):
  t = np.asarray(ts, np.float64)
  g = np.asarray(gaps, np.float64)
  if t.ndim != 1:
    raise ValueError(f"{fn}: ts must be 1-D [T], got shape {t.shape}")
  if g.ndim < 1 or g.shape[-1] != t.shape[0]:
    raise ValueError(f"{fn}: gaps must have shape [..., T] with T = len(ts) = {t.shape[0]}, "
                     f"got {g.shape}")
  keep = np.ones_like(t, bool) if t_min is None else t >= t_min
  if np.count_nonzero(keep) < 2 or np.unique(t[keep]).size < 2:
    raise ValueError(f"{fn}: need at least 2 distinct ts >= t_min={t_min}, got "
                     f"{np.count_nonzero(keep)} points")
  t, g = t[keep], g[..., keep]
  if np.any(t <= 0) or not np.all(np.isfinite(t)):
    raise ValueError(f"{fn}: ts must be finite and > 0 (log t), got min {t.min()}")
  if np.any(g <= 0) or not np.all(np.isfinite(g)):
    raise ValueError(f"{fn}: gaps must be finite and > 0 where t >= t_min (log gap)")
  return np.log(t), np.log(g)


def loglog_slope(ts, gaps, *, t_min: Optional[float] = None):
  """Least-squares slope of log gap against log t over the points with t ≥ t_min.

  A gap decaying as c·t^{−a} has slope −a: ONPO's average iterate ≈ −1, OMD's
  ≈ −1/2 (docs/algorithm.md §2).

  Args:
    ts: [T] positive times (rounds).
    gaps: [..., T] positive values; leading axes are fitted separately.
    t_min: keep t ≥ t_min (None: all points).

  Returns:
    The slope, shaped like gaps[..., 0] (a float for 1-D gaps).
  """
  x, y = _loglog_xy("loglog_slope", ts, gaps, t_min)
  xc = x - x.mean()
  yc = y - y.mean(axis=-1, keepdims=True)
  return _scalar(np.sum(yc * xc, axis=-1) / np.sum(xc * xc))


def slope_ci(ts, gaps_per_seed, level: float = 0.95, *,
             t_min: Optional[float] = None) -> SlopeCI:
  """Log-log slope per seed, then the Student t interval of its mean over seeds.

  Args:
    ts: [T] positive times.
    gaps_per_seed: [S, T] with S ≥ 2.
    level: confidence level in (0, 1).
    t_min: keep t ≥ t_min.

  Returns:
    `SlopeCI(slope, half_width, per_seed [S])`.
  """
  fn = "slope_ci"
  level = _check_level(fn, level)
  g = np.asarray(gaps_per_seed, np.float64)
  if g.ndim != 2:
    raise ValueError(f"{fn}: gaps_per_seed must have shape [S, T], got {g.shape}")
  _seeds(fn, "gaps_per_seed", g)
  per_seed = np.asarray(loglog_slope(ts, g, t_min=t_min), np.float64).reshape(-1)
  mean, half = mean_ci(per_seed, level)
  return SlopeCI(float(mean), float(half), per_seed)


def differs(a_seeds, b_seeds, level: float = 0.95, *, paired: bool = False) -> Difference:
  """Whether mean(a) and mean(b) differ at `level`: Welch's t-test, or the paired t-test.

  Welch (paired=False): d = ā − b̄, se² = s_a²/S_a + s_b²/S_b, degrees of
  freedom by Welch–Satterthwaite, p = 2·P(T_df > |d|/se), interval d ± t·se.
  Paired (same seeds for both, e.g. both methods from the same SFT policy and
  oracle): the one-sample t-test on a − b. When se = 0 (no spread at all), p is
  0 if d ≠ 0 and 1 otherwise, and the interval is [d, d].

  Args:
    a_seeds: [S_a, ...] with S_a ≥ 2.
    b_seeds: [S_b, ...] with S_b ≥ 2 (S_b = S_a when paired) and the same
      trailing shape.
    level: confidence level in (0, 1); significant means p < 1 − level.
    paired: paired test instead of Welch's.

  Returns:
    `Difference(significant, p_value, diff, low, high)`.
  """
  fn = "differs"
  level = _check_level(fn, level)
  a = _seeds(fn, "a_seeds", a_seeds)
  b = _seeds(fn, "b_seeds", b_seeds)
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"{fn}: a_seeds and b_seeds must share the trailing shape, got "
                     f"{a.shape} and {b.shape}")
  if paired:
    if a.shape[0] != b.shape[0]:
      raise ValueError(f"{fn}: paired needs the same number of seeds, got S_a={a.shape[0]} "
                       f"and S_b={b.shape[0]}")
    d_all = a - b
    s = d_all.shape[0]
    diff = d_all.mean(axis=0)
    se = d_all.std(axis=0, ddof=1) / np.sqrt(s)
    df = np.full_like(diff, s - 1.0)
  else:
    va = a.var(axis=0, ddof=1) / a.shape[0]
    vb = b.var(axis=0, ddof=1) / b.shape[0]
    diff = a.mean(axis=0) - b.mean(axis=0)
    se = np.sqrt(va + vb)
    with np.errstate(divide="ignore", invalid="ignore"):
      df = (va + vb) ** 2 / (va ** 2 / (a.shape[0] - 1) + vb ** 2 / (b.shape[0] - 1))
    # Only one side varies at most: the other's term is 0, df stays finite; with
    # no spread at all df is undefined and the degenerate rule below applies.
    df = np.where(np.isfinite(df), df, 1.0)
  degenerate = se == 0
  safe_se = np.where(degenerate, 1.0, se)
  t_stat = diff / safe_se
  p = 2.0 * scipy.stats.t.sf(np.abs(t_stat), df)
  p = np.where(degenerate, np.where(diff != 0, 0.0, 1.0), p)
  half = np.where(degenerate, 0.0, _t_quantile(level, df) * se)
  return Difference(_scalar(p < 1.0 - level), _scalar(p), _scalar(diff), _scalar(diff - half),
                    _scalar(diff + half))


def holm(p_values) -> np.ndarray:
  """Holm's step-down adjustment of a family of p-values (Holm 1979).

  With m tests sorted by p, p_(1) ≤ … ≤ p_(m), the adjusted values are
  p̃_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)), returned in the input order.
  Rejecting where p̃ < α keeps the chance of any false "supported" in the family
  at most α, whatever the dependence between the tests: comparing one method
  with seven others at 5% each would otherwise claim something one time in
  three or so when nothing differs.

  Args:
    p_values: the family's p-values, a 1-D sequence (may be empty).

  Returns:
    float64 [m] adjusted p-values.
  """
  p = np.asarray(p_values, np.float64).reshape(-1)
  if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
    raise ValueError(f"holm: p_values must lie in [0, 1], got {p.tolist()}")
  m = p.shape[0]
  order = np.argsort(p, kind="stable")
  stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out = np.empty_like(p)
  out[order] = np.minimum(stepped, 1.0)
  return out
