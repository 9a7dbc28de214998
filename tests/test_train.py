"""End-to-end tests of the self-play main job (`onpo_jax.testbed.job.run`) on `:tiny`.

Compilation dominates these runs on CPU, so they share a persistent XLA
compilation cache (also used by tests/test_resume.py); results are unaffected
(a cached executable is the same program).
"""

import json
import math
import os

import jax
import numpy as np
import pytest
import scipy.stats
from jax.experimental.compilation_cache import compilation_cache

from configs import default as default_config
from onpo_jax.testbed import exact_part
from onpo_jax.testbed import job as train
from onpo_jax.testbed import report
from onpo_jax.testbed import world as world_lib


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.getbasetemp() / "selfplay_jax_cache")
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


def tiny(cache_dir, **overrides):
  cfg = default_config.get_config("tiny")
  cfg.compilation_cache_dir = cache_dir
  for path, value in overrides.items():
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("smoke")
  summary = train.run(tiny(cache_dir), str(workdir))
  return str(workdir), summary


def _numbers(summary):
  return {k: summary[k] for k in ("gap", "win_rate_vs_sft", "win_rate_matrix", "sft_gap",
                                  "oracle_queries")}


def test_smoke_writes_every_output_with_finite_metrics(smoke):
  workdir, summary = smoke
  cfg = default_config.get_config("tiny")
  methods = list(cfg.selfplay.methods)
  t = cfg.selfplay.num_rounds
  assert summary["methods"] == methods and len(methods) == 8
  for m in methods:
    assert len(summary["gap"][m]) == t + 1
    assert all(math.isfinite(g) and g >= -1e-6 for g in summary["gap"][m])
    assert summary["oracle_queries"][m] > 0
  # The SFT row is shared by every method (same start).
  assert len({summary["gap"][m][0] for m in methods}) == 1
  wr = np.asarray(summary["win_rate_matrix"]["matrix"])
  assert wr.shape == (len(methods) + 1,) * 2
  np.testing.assert_allclose(wr + wr.T, 1.0, atol=1e-5)
  assert abs(summary["nash_gap"]) < 1e-5
  for name in ("gap_vs_round.png", "win_rate_matrix.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["gap"] == summary["gap"]
  assert any(n.startswith("events") for n in os.listdir(os.path.join(workdir, "tb")))
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  # Unit 1 = SFT, then one sampled trajectory per (seed, method), one exact unit per method
  # (all seeds at once), one per (η, method) of the sweep; the per-round lines of a unit
  # carry its unit; the mean curves come last, past every unit.
  units = (1 + cfg.seeds * len(methods) + len(cfg.exact.methods)
           + len(cfg.exact.eta_grid) * len(cfg.exact.sweep_methods))
  assert sorted({l["unit"] for l in lines}) == list(range(1, units + 2))
  for line in lines:
    assert all(v is not None and math.isfinite(v) for v in line.values()), line
  for s in range(cfg.seeds):
    for method in methods:
      prefix = f"sampled/{method}/seed{s}/"
      rows = [l for l in lines if prefix + "gap" in l]
      assert len(rows) == t, (method, s)
      for line in rows:
        for key in ("gap", "avg_gap", "win_rate_vs_sft", "mass", "oracle_queries",
                    "sample_tokens_per_s", "train_tokens_per_s"):
          assert prefix + key in line, (method, key)
        # ONPO-extrapolate has one (auxiliary) regression per round; the others a policy one.
        phase = "aux" if method == "onpo_extrapolate" else "policy"
        for key in ("l2_grads", "l2_params", "l2_updates", "loss"):
          assert f"{prefix}{phase}/{key}" in line, (method, key)
        # Vocabulary = response vocabulary: the exact distribution sums to 1.
        assert abs(line[prefix + "mass"] - 1.0) < 1e-4
      if method == "onpo_two_step":
        assert all(prefix + "policy/loss" in l and prefix + "aux/loss" in l for l in rows)
    for method in cfg.exact.methods:
      rows = [l for l in lines if f"exact/{method}/seed{s}/tracking_kl" in l]
      assert len(rows) == cfg.exact.num_rounds, (method, s)


def test_summary_gives_means_intervals_tests_and_exact_shadows(smoke):
  workdir, summary = smoke
  cfg = default_config.get_config("tiny")
  t, te = cfg.selfplay.num_rounds, cfg.exact.num_rounds
  assert summary["seeds"] == cfg.seeds
  for m, e in summary["sampled"].items():
    assert e["seeds"] == cfg.seeds
    for key in ("gap", "avg_gap", "win_rate"):
      assert len(e[f"{key}_mean"]) == len(e[f"{key}_ci95"]) == t + 1, (m, key)
      assert all(h >= 0 for h in e[f"{key}_ci95"])
    assert e["gap_mean"] == summary["gap"][m]
    q = e["oracle_queries"]
    assert q[0] == 0 and all(b > a for a, b in zip(q, q[1:])), (m, q)
  # Every method shares the SFT start: round 0 has no spread.
  assert all(e["gap_ci95"][0] == 0 for e in summary["sampled"].values())
  ref = cfg.selfplay.methods[0]
  comp = summary["sampled_comparisons"]["gap"]
  assert set(comp) == set(cfg.selfplay.methods) - {ref}
  for d in comp.values():
    assert d["low"] <= d["diff"] <= d["high"] and 0 <= d["p_value"] <= 1
    assert d["supported"] == (d["p_holm"] < 0.05) and d["p_holm"] >= d["p_value"]
    assert not d["supported"] or d["low"] > 0 or d["high"] < 0
    assert d["test"] == "Welch"
  exact_comp = summary["exact_comparisons"]["avg_gap"]
  assert set(exact_comp) == set(cfg.exact.methods) - {cfg.exact.methods[0]}
  assert all(d["test"] == "paired t" for d in exact_comp.values())
  assert set(summary["exact"]) == set(cfg.exact.methods)
  for m, e in summary["exact"].items():
    for key in ("gap", "avg_gap", "tracking_kl", "shadow_gap", "shadow_avg_gap"):
      assert len(e[f"{key}_mean"]) == te + 1, (m, key)
    # Both start at the same SFT table; the shadow re-normalises it with log_softmax, so the
    # two differ by float32 rounding only (a few eps over |Y| = 4 terms, far below 1e-6).
    assert abs(e["tracking_kl_mean"][0]) <= 1e-6
    assert all(k >= -1e-6 for k in e["tracking_kl_mean"])
    for key in ("slope_avg", "slope_last", "shadow_slope_avg"):
      assert math.isfinite(e[key]["mean"]) and e[key]["ci95"] >= 0
    tracked = m in exact_part.TRACKED
    assert e["tracking_bound"] == (cfg.exact.tracking_kl_bound if tracked else None)
    assert e["tracking_kl_max"] >= 0
  assert set(summary["eta_sweep"]) == set(cfg.exact.sweep_methods)
  for m, e in summary["eta_sweep"].items():
    assert e["eta"] == list(cfg.exact.eta_grid) and e["seeds"] == cfg.seeds
    for key in ("gap", "avg_gap", "shadow_avg_gap"):
      assert len(e[f"{key}_mean"]) == len(e[f"{key}_ci95"]) == len(cfg.exact.eta_grid)
    assert all(k >= 0 for k in e["tracking_kl_max"])
    first = cfg.exact.sweep_methods[0]
    vs = e.get(f"vs_{first}", [])
    assert len(vs) == (0 if m == first else len(cfg.exact.eta_grid))
    assert all(d["test"] == "paired t" and d["low"] <= d["diff"] <= d["high"] for d in vs)
  for name in ("gap_vs_round.png", "gap_vs_queries.png", "win_rate_vs_queries.png",
               "exact_avg_gap_loglog.png", "exact_gap_loglog.png", "exact_eta_sweep.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_exact_comparisons_pair_the_games():
  # Five games whose gaps spread far more than the methods differ: method 0 is
  # below method 1 by 0.01 ± 0.002 in every game. Welch's test cannot see it;
  # the paired test (each game's difference) must, with scipy's numbers.
  rng = np.random.default_rng(0)
  games = rng.uniform(0.05, 0.3, size=5)
  first = games - 0.01 + 0.002 * rng.standard_normal(5)
  avg_gap = np.zeros((5, 2, 3))
  avg_gap[:, 0, -1], avg_gap[:, 1, -1] = first, games
  arrays = {"avg_gap": avg_gap}
  welch = report.comparisons(arrays, ["a", "b"], "avg_gap", "a")["b"]
  paired = report.comparisons(arrays, ["a", "b"], "avg_gap", "a", paired=True)["b"]
  ref = scipy.stats.ttest_rel(first, games)
  ci = ref.confidence_interval(0.95)
  np.testing.assert_allclose([paired["diff"], paired["p_value"], paired["low"], paired["high"]],
                             [np.mean(first - games), ref.pvalue, ci.low, ci.high], rtol=1e-10)
  assert paired["supported"] and paired["test"] == "paired t"
  assert paired["p_holm"] == paired["p_value"]  # a family of one
  assert not welch["supported"] and welch["test"] == "Welch"
  np.testing.assert_allclose(welch["p_value"],
                             scipy.stats.ttest_ind(first, games, equal_var=False).pvalue,
                             rtol=1e-10)
  # The η sweep compares its first method with each other one at every η, paired.
  sweep_arrays = {k: np.stack([avg_gap[:, :, -1]] * 2) for k in
                  ("gap", "avg_gap", "shadow_avg_gap", "tracking_kl")}
  swept = report.sweep(sweep_arrays, (1.0, 2.0), ["a", "b"])
  assert "vs_a" not in swept["a"] and len(swept["b"]["vs_a"]) == 2
  # Two identical tests form the family: Holm doubles both p-values.
  for d in swept["b"]["vs_a"]:
    assert {k: v for k, v in d.items() if k != "p_holm"} == {
        k: v for k, v in paired.items() if k != "p_holm"}
    np.testing.assert_allclose(d["p_holm"], 2 * paired["p_value"], rtol=1e-12)


def test_finished_run_does_nothing(smoke, capsys, cache_dir):
  workdir, summary = smoke
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  again = train.run(tiny(cache_dir), workdir)
  assert "already finished" in capsys.readouterr().out
  assert again == json.loads(json.dumps(summary))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == steps


def test_same_seed_same_numbers_different_seed_different(smoke, tmp_path, cache_dir):
  _, summary = smoke
  again = train.run(tiny(cache_dir), str(tmp_path / "same"))
  assert _numbers(again) == _numbers(json.loads(json.dumps(summary)))
  other = train.run(tiny(cache_dir, seed=1, **{"selfplay.methods": ("onpo_two_step",),
                                               "selfplay.num_rounds": 1}),
                    str(tmp_path / "other"))
  assert other["gap"]["onpo_two_step"] != summary["gap"]["onpo_two_step"][:2]


def test_vary_game_gives_each_seed_its_own_game(smoke, tmp_path, cache_dir):
  _, shared = smoke
  cfg = tiny(cache_dir, **{"selfplay.vary_game": True, "exact.enabled": False,
                           "selfplay.methods": ("onpo_two_step", "dpo"),
                           "selfplay.num_rounds": 1})
  summary = train.run(cfg, str(tmp_path))
  assert summary["vary_game"] and not shared["vary_game"]
  # One game: every seed starts from the same SFT policy, so round 0 has no spread.
  assert shared["sampled"]["dpo"]["gap_ci95"][0] == 0
  assert summary["sampled"]["dpo"]["gap_ci95"][0] > 0
  # Seed s plays game_config(cfg, s): its SFT start's exact gap, averaged over seeds.
  gaps = []
  for s in range(cfg.seeds):
    gc = world_lib.game_config(cfg, s)
    start = world_lib.sft_start(gc, world_lib.Testbed(gc))
    gaps.append(float(start.world.metrics_fn(start.sft_table, start.sft_table)["gap"]))
  np.testing.assert_allclose(summary["sft_gap"], np.mean(gaps), rtol=1e-6)
  assert summary["sft_gap"] != shared["sft_gap"]
  wr = np.asarray(summary["win_rate_matrix"]["matrix"])
  np.testing.assert_allclose(wr + wr.T, 1.0, atol=1e-5)


def test_non_finite_loss_stops_the_run(tmp_path, cache_dir):
  # Target 1/(2η_I) overflows float32 to inf, so the loss is inf at the first step.
  cfg = tiny(cache_dir, **{"selfplay.methods": ("omd",), "selfplay.num_rounds": 1,
                           "omd.eta_inpo": 1e-45})
  with pytest.raises(FloatingPointError, match="method 'omd', round 1"):
    train.run(cfg, str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("onpo.eta", 0.0, r"config\.onpo\.eta"),
    ("onpo.eta", -1.0, r"config\.onpo\.eta"),
    ("selfplay.num_samples", 1, r"config\.selfplay\.num_samples"),
    ("selfplay.methods", ("onpo_two_step", "rlhf"), r"config\.selfplay\.methods"),
    ("selfplay.pairing", "swiss", r"config\.selfplay\.pairing"),
    ("model.max_position_embeddings", 4, r"config\.model\.max_position_embeddings"),
    ("oracle.vocab_size", 5, r"config\.oracle\.vocab_size"),
    ("testbed.vocab_size", 5, r"config\.testbed\.vocab_size"),
    ("inpo.tau", 10.0, r"config\.inpo\.tau"),
    ("dpo.label_smoothing", 0.5, r"config\.dpo\.label_smoothing"),
    ("nash_md.alpha", 1.5, r"config\.nash_md\.alpha"),
    ("selfplay.logp_reduction", "max", r"config\.selfplay\.logp_reduction"),
    ("testbed.response_length", 9, r"config\.testbed\.response_length"),
    ("seeds", 1, r"config\.seeds"),
    ("exact.methods", ("sppo",), r"config\.exact\.methods"),
    ("exact.tol", 0.0, r"config\.exact\.tol"),
    ("exact.response_length", 20, r"config\.exact\.response_length"),
    ("exact.residual_tol", 0.0, r"config\.exact\.residual_tol"),
    ("exact.stall_steps", 0, r"config\.exact\.stall_steps"),
    ("exact.dtype", "bfloat16", r"config\.exact\.dtype"),
    ("exact.tracking_kl_bound", 2.0, r"config\.exact\.tracking_kl_bound"),
    ("exact.eta_grid", (1.0, 1.0), r"config\.exact\.eta_grid"),
    ("exact.eta_grid", (-0.5,), r"config\.exact\.eta_grid"),
    ("exact.sweep_methods", ("inpo",), r"config\.exact\.sweep_methods"),
    ("selfplay.tournament_mode", "coin", r"config\.selfplay\.tournament_mode"),
    ("model.dtype", "bfloat16", r"config\.model\.dtype"),
])
def test_bad_config_names_the_field(tmp_path, field, value, match):
  cfg = tiny("", **{field: value})
  with pytest.raises(ValueError, match=match):
    train.run(cfg, str(tmp_path))
  # Validation comes before any work: nothing was written.
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_per_seed_configs_work_on_a_locked_config():
  # experiments.run locks the config (no new fields): the per-seed and exact
  # configs only set fields that exist.
  cfg = default_config.get_config("tiny")
  cfg.lock()
  assert world_lib.game_config(cfg, 1).seed == cfg.seed + 2
  ec = exact_part.exact_config(cfg, 0, eta=2.0)
  assert ec.model.dtype == cfg.exact.dtype and ec.onpo.eta == 2.0


def test_config_tiny_and_unknown_arg():
  assert default_config.get_config().experiment == "selfplay"
  assert default_config.get_config().exact.eta_grid == ()
  assert default_config.get_config("sweep").exact.eta_grid == (0.5, 1.0, 2.0, 4.0)
  with pytest.raises(ValueError, match="unknown arg"):
    default_config.get_config("huge")
