"""What the testbed job reports: means over seeds with 95% t-intervals, tests, tables, plots.

Every number is a mean over the seeds with the half-width of its 95% Student-t
interval (`onpo_jax.infra.stats.mean_ci`); a difference between two methods is
called supported when its t-test (`stats.differs`) rejects equality at the 5%
level after Holm's adjustment over the family of comparisons it belongs to
(`stats.holm`: one method against all the others). Sampled
runs use Welch's test. Exact runs use the paired test: seed s of every method
plays the same game from the same SFT table, so the game-to-game spread, which
is much larger than any method's effect, cancels in the per-game differences.
"""

from __future__ import annotations

import os

import numpy as np

from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import plots
from onpo_jax.infra import stats

LEVEL = 0.95


def _mean_ci(x: np.ndarray) -> tuple[list, list]:
  mean, half = stats.mean_ci(np.asarray(x, np.float64), LEVEL)
  return np.atleast_1d(mean).tolist(), np.atleast_1d(half).tolist()


def curves(arrays: dict, methods, keys) -> dict:
  """Per method: `{key}_mean` and `{key}_ci95` per round, from [S, M, T+1] arrays."""
  out = {}
  for i, m in enumerate(methods):
    entry = {"seeds": int(arrays[keys[0]].shape[0])}
    for key in keys:
      name = "win_rate" if key == "win_rate_vs_sft" else key
      entry[f"{name}_mean"], entry[f"{name}_ci95"] = _mean_ci(arrays[key][:, i])
    out[m] = entry
  return out


def slopes(arrays: dict, methods, key: str) -> dict:
  """Fitted log-log slope of `key` vs round (t >= 1) per method: mean and 95% half-width."""
  out = {}
  for i, m in enumerate(methods):
    g = np.asarray(arrays[key][:, i, 1:], np.float64)
    ts = np.arange(1, g.shape[1] + 1)
    s = stats.slope_ci(ts, np.maximum(g, 1e-12), LEVEL)
    out[m] = {"mean": s.slope, "ci95": s.half_width}
  return out


def _difference(a, b, paired: bool) -> dict:
  """One test's numbers; `_holm_family` adds `p_holm` and `supported`."""
  d = stats.differs(np.asarray(a, np.float64), np.asarray(b, np.float64), LEVEL, paired=paired)
  return {"diff": float(d.diff), "low": float(d.low), "high": float(d.high),
          "p_value": float(d.p_value), "test": "paired t" if paired else "Welch"}


def comparisons(arrays: dict, methods, key: str, reference: str, *, paired: bool = False
                ) -> dict:
  """`reference` against every other method on the final value of `key`.

  Args:
    arrays: key -> [S, M, T + 1] per seed, method and round.
    methods: the M methods.
    key: the compared quantity.
    reference: the method compared with every other one.
    paired: the paired t-test over seeds (seed s of every method shares its
      game and start); else Welch's t-test.
  """
  if reference not in methods:
    return {}
  ref = arrays[key][:, list(methods).index(reference), -1]
  return _holm_family({m: _difference(ref, arrays[key][:, i, -1], paired)
                       for i, m in enumerate(methods) if m != reference})


def _holm_family(family: dict) -> dict:
  """Marks a family of differences supported by Holm-adjusted p-values.

  One reference against M − 1 methods is M − 1 tests: unadjusted, a 5% level
  per test would call some difference supported far more often than 5% of the
  time when none exists. The intervals stay the per-test 95% intervals.
  """
  adjusted = stats.holm([d["p_value"] for d in family.values()])
  for d, p in zip(family.values(), adjusted):
    d["p_holm"] = float(p)
    d["supported"] = bool(p < 1.0 - LEVEL)
  return family


def describe(comp: dict, key: str, reference: str) -> list[str]:
  """Plain-language lines: which differences the intervals support."""
  lines = []
  for m, d in comp.items():
    if not d["supported"]:
      verdict = "not supported"
    else:
      verdict = f"supported: {reference} is {'lower' if d['diff'] < 0 else 'higher'}"
    lines.append(f"  {reference} - {m}: final {key} difference {d['diff']:+.4f} "
                 f"[{d['low']:+.4f}, {d['high']:+.4f}], {d['test']} p = {d['p_value']:.3g} "
                 f"(Holm {d['p_holm']:.3g}): {verdict}")
  return lines


def print_table(title: str, per_method: dict, key: str, rounds: list[int]) -> None:
  rows = [[m] + [f"{e[key + '_mean'][t]:.4f} ± {e[key + '_ci95'][t]:.4f}" for t in rounds]
          for m, e in per_method.items()]
  print(f"\n{title}")
  print(metrics_lib.format_table(rows, ["method"] + [f"t={t}" for t in rounds]))


def band_curves(per_method: dict, key: str, xs=None) -> dict:
  """name -> (x, mean, half-width) of `key`; x: one axis for all, a dict per method, or rounds."""
  def x_of(m, e):
    if isinstance(xs, dict):
      return xs[m]
    return range(len(e[key + "_mean"])) if xs is None else xs
  return {m: (x_of(m, e), e[key + "_mean"], e[key + "_ci95"]) for m, e in per_method.items()}


def plot_sampled(per_method: dict, workdir: str) -> None:
  plots.band_plot(band_curves(per_method, "gap"), os.path.join(workdir, "gap_vs_round.png"),
                  "sampled rounds: exact duality gap (mean, 95% CI)", "round", "duality gap")
  queries = {m: e["oracle_queries"] for m, e in per_method.items()}
  plots.band_plot(band_curves(per_method, "gap", queries),
                  os.path.join(workdir, "gap_vs_queries.png"),
                  "duality gap vs cumulative oracle queries", "oracle queries", "duality gap")
  plots.band_plot(band_curves(per_method, "win_rate", queries),
                  os.path.join(workdir, "win_rate_vs_queries.png"),
                  "win rate vs SFT vs cumulative oracle queries", "oracle queries", "win rate")


def plot_exact(per_method: dict, workdir: str) -> None:
  n = len(next(iter(per_method.values()))["gap_mean"])
  ts = np.arange(n, dtype=float)  # round 0 (SFT) is dropped on the log axis
  for key, name in (("avg_gap", "avg_gap"), ("gap", "gap")):
    bands = band_curves(per_method, key, ts)
    bands.update({f"{m} (tabular)": (ts, e[f"shadow_{key}_mean"], e[f"shadow_{key}_ci95"])
                  for m, e in per_method.items() if f"shadow_{key}_mean" in e})
    plots.band_plot(bands, os.path.join(workdir, f"exact_{name}_loglog.png"),
                    f"exact rounds: {key.replace('_', ' ')} (mean, 95% CI)", "round",
                    "duality gap", logx=True, logy=True)


def sweep(arrays: dict, etas, methods) -> dict:
  """The η sweep: per method, η and the mean and 95% half-width over seeds at the final round.

  Args:
    arrays: key -> [len(etas), S, M] final values ('gap', 'avg_gap',
      'shadow_avg_gap') and worst |tracking KL| ('tracking_kl').
    etas: the η grid.
    methods: the M swept methods.
  """
  out = {}
  for i, m in enumerate(methods):
    entry = {"eta": [float(e) for e in etas], "seeds": int(arrays["gap"].shape[1])}
    for key in ("gap", "avg_gap", "shadow_avg_gap"):
      pairs = [_mean_ci(arrays[key][j, :, i]) for j in range(len(etas))]
      entry[f"{key}_mean"] = [p[0][0] for p in pairs]
      entry[f"{key}_ci95"] = [p[1][0] for p in pairs]
    entry["tracking_kl_max"] = [float(np.max(arrays["tracking_kl"][j, :, i]))
                                for j in range(len(etas))]
    if i > 0:  # the first method against this one at every η (one family), paired
      family = _holm_family({j: _difference(arrays["avg_gap"][j, :, 0],
                                            arrays["avg_gap"][j, :, i], True)
                             for j in range(len(etas))})
      entry[f"vs_{methods[0]}"] = list(family.values())
    out[m] = entry
  return out


def print_sweep(per_method: dict, num_rounds: int) -> None:
  rows = [[m, f"{eta:g}", f"{e['avg_gap_mean'][j]:.4f} ± {e['avg_gap_ci95'][j]:.4f}",
           f"{e['shadow_avg_gap_mean'][j]:.4f}", f"{e['gap_mean'][j]:.4f} ± {e['gap_ci95'][j]:.4f}",
           f"{e['tracking_kl_max'][j]:.1e}"]
          for m, e in per_method.items() for j, eta in enumerate(e["eta"])]
  print(f"\nExact rounds, η sweep at T = {num_rounds} (ONPO's η = OMD's step 1/η_I):")
  print(metrics_lib.format_table(rows, ["method", "η", "avg gap", "avg gap (tabular)",
                                        "last gap", "max |KL|"]))
  reference = next(iter(per_method))
  for m, e in per_method.items():
    for eta, d in zip(e["eta"], e.get(f"vs_{reference}", [])):
      print("\n".join(describe({m: d}, f"avg_gap at η = {eta:g}", reference)))


def plot_sweep(per_method: dict, workdir: str, num_rounds: int) -> None:
  bands = {}
  for m, e in per_method.items():
    bands[f"{m} average iterate"] = (e["eta"], e["avg_gap_mean"], e["avg_gap_ci95"])
    bands[f"{m} last iterate"] = (e["eta"], e["gap_mean"], e["gap_ci95"])
  plots.band_plot(bands, os.path.join(workdir, "exact_eta_sweep.png"),
                  f"exact rounds: duality gap at T = {num_rounds} vs η (mean, 95% CI)", "η",
                  "duality gap", logx=True, logy=True)


def write_rounds(writer, prefix: str, rounds: list[dict], unit: int) -> dict:
  """Writes a trajectory's per-round lines but the last; returns the last round's metrics.

  The lines carry the unit: a resume that redoes it drops them first.
  """
  for t, m in enumerate(rounds[:-1]):
    writer.write(t + 1, {prefix + k: float(v) for k, v in m.items()} | {"unit": unit + 1})
  return {prefix + k: float(v) for k, v in rounds[-1].items()}


def write_curves(writer, part: str, per_method: dict, after_unit: int) -> None:
  """The mean and interval curves as metrics (TensorBoard), one step per round.

  Tagged with a unit past the last trajectory, so a resume drops and redoes them.
  """
  num = len(next(iter(per_method.values()))["gap_mean"])
  for t in range(num):
    writer.write(t, {f"{part}/{m}/{k}": float(v[t]) for m, e in per_method.items()
                     for k, v in e.items() if isinstance(v, list) and len(v) == num}
                 | {"unit": after_unit + 1})
