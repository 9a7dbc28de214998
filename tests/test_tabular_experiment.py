"""Tabular experiment end to end (library call and CLI), config, metrics writer and plots."""

import glob
import importlib.util
import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from onpo_jax.infra import host_memory
from onpo_jax.infra import metrics
from onpo_jax.infra import plots
from onpo_jax.tabular import experiment
from onpo_jax.tabular import games

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _get_config(arg=None):
  spec = importlib.util.spec_from_file_location("tabular_config", REPO / "configs" / "tabular.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _read_tb_scalars(logdir):
  """Parses TFRecord-framed Event protos: u64 length, u32 crc, payload, u32 crc."""
  scalars = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    data, i = pathlib.Path(path).read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        scalars[(v.tag, event.step)] = v.simple_value
  return scalars


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tabular_tiny")
  return workdir, experiment.run(_get_config("tiny"), str(workdir))


def test_run_writes_all_outputs(tiny_run):
  workdir, summary = tiny_run
  config = _get_config("tiny")
  for name in ("metrics.jsonl", "summary.json", "game.npz", "gap_vs_T.png", "last_gap_vs_T.png"):
    assert (workdir / name).is_file(), name
  assert json.loads((workdir / "summary.json").read_text()) == json.loads(json.dumps(summary))
  for m in config.methods:
    assert math.isfinite(summary["methods"][m]["slope_avg"]), m
    assert math.isfinite(summary["methods"][m]["slope_last"]), m
  # Seed 0, T = 200: ONPO's average-iterate gap falls much faster than OMD's
  # (measured slopes -0.83 vs -0.22).
  assert summary["methods"]["onpo"]["slope_avg"] < summary["methods"]["omd"]["slope_avg"] - 0.3
  for png in ("gap_vs_T.png", "last_gap_vs_T.png"):
    assert (workdir / png).read_bytes()[:8] == PNG_MAGIC
  game = np.load(workdir / "game.npz")
  p = games.validate_preference(game["preference"])
  assert p.shape == (config.num_contexts, config.num_actions, config.num_actions)
  np.testing.assert_allclose(game["game_value"], 0.5, atol=1e-7)
  assert game["nash_policy"].shape == (config.num_contexts, config.num_actions)


def test_metrics_jsonl_and_tensorboard_agree(tiny_run):
  workdir, summary = tiny_run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [l["step"] for l in lines]
  assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 200
  assert {10, 100} <= set(steps)
  by_step = {l["step"]: l for l in lines}
  for m, s in summary["methods"].items():
    assert by_step[100][f"{m}/avg_gap"] == s["avg_gap"]["100"]
    # π_1 is uniform for every method, so all start from the same gap.
    assert by_step[1][f"{m}/avg_gap"] == by_step[1]["onpo/avg_gap"]
  scalars = _read_tb_scalars(workdir / "tb")
  assert len(scalars) == len(lines) * (len(lines[0]) - 1)
  # TensorBoard stores float32.
  assert scalars[("onpo/avg_gap", 100)] == pytest.approx(by_step[100]["onpo/avg_gap"], rel=1e-6)


def test_cli_matches_library_call(tiny_run, tmp_path):
  _, summary = tiny_run
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop("GLIBC_TUNABLES", None)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=configs/tabular.py:tiny",
       f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "slope_avg" in proc.stdout
  # The default --host_malloc restarts the command with huge pages where glibc and the kernel
  # have them, and says which malloc runs.
  assert ("host malloc huge pages" if host_memory.huge_pages_available()
          else "host malloc glibc's defaults (huge pages need") in proc.stderr, proc.stderr[-3000:]
  cli = json.loads((tmp_path / "summary.json").read_text())
  # Same seed, same config: the run is deterministic.
  for m, s in summary["methods"].items():
    assert cli["methods"][m]["avg_gap"] == s["avg_gap"]
    assert cli["methods"][m]["slope_avg"] == s["slope_avg"]


def test_config_fields_follow_the_theory():
  c = _get_config()
  assert c.experiment == "tabular"
  d = math.log(c.num_actions)
  assert c.onpo.eta == min(0.5, math.sqrt(d))
  assert c.omd.eta == pytest.approx(math.sqrt(d / c.num_rounds))
  assert c.omd.horizon_tuned
  assert c.inpo.tau <= c.inpo.eta_inpo
  tiny = _get_config("tiny")
  assert tiny.num_rounds < c.num_rounds
  with pytest.raises(ValueError, match="unknown arg"):
    _get_config("huge")


@pytest.mark.slow
def test_default_config_reproduces_the_rates(tmp_path):
  """Default game, T = 1e4: fitted slopes ≈ −1 (ONPO) and ≈ −1/2 (OMD), average iterate.

  Measured with seeds 0/1/2: ONPO −1.00/−1.08/−1.04, OMD −0.46/−0.49/−0.48.
  """
  c = _get_config()
  c.methods = ("onpo", "omd")
  s = experiment.run(c, str(tmp_path))["methods"]
  assert -1.15 < s["onpo"]["slope_avg"] < -0.85
  assert -0.6 < s["omd"]["slope_avg"] < -0.4


def test_bad_config_raises(tmp_path):
  c = _get_config("tiny")
  c.methods = ("onpo", "sgd")
  with pytest.raises(ValueError, match="config.methods"):
    experiment.run(c, str(tmp_path))
  c = _get_config("tiny")
  c.dtype = "float16"
  with pytest.raises(ValueError, match="config.dtype"):
    experiment.run(c, str(tmp_path))
  c = _get_config("tiny")
  c.init = "sft"
  with pytest.raises(ValueError, match="config.init"):
    experiment.run(c, str(tmp_path))
  c = _get_config("tiny")
  c.game, c.game_params = "ties", {"block_sizes": [1, 1]}
  with pytest.raises(ValueError, match="block_sizes must sum"):
    experiment.run(c, str(tmp_path))


def test_fit_loglog_slope_and_eval_rounds():
  ts = np.array([1, 10, 100, 1000])
  assert experiment.fit_loglog_slope(ts, 3.0 * ts ** -0.7, 1) == pytest.approx(-0.7, abs=1e-12)
  # Points below min_t are ignored.
  gaps = np.where(ts < 10, 1.0, 2.0 / ts)
  assert experiment.fit_loglog_slope(ts, gaps, 10) == pytest.approx(-1.0, abs=1e-12)
  assert math.isnan(experiment.fit_loglog_slope(ts, gaps, 1000))
  rounds = experiment.eval_rounds(5000, 8)
  assert rounds[0] == 1 and rounds[-1] == 5000 and {10, 100, 1000} <= set(rounds)
  assert np.all(np.diff(rounds) > 0)


def test_metric_writer(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as w:
    w.write(3, {"a": 1.5, "b": np.float32(2.0)})
    w.write(4, {"a": float("nan")})
    w.write_json("info", {"x": np.arange(2), "y": np.float64(0.25)})
    with pytest.raises(ValueError, match="metric 'a'"):
      w.write(5, {"a": np.ones(2)})
    with pytest.raises(ValueError, match="step"):
      w.write(1.5, {"a": 1.0})
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 3, "a": 1.5, "b": 2.0}, {"step": 4, "a": None}]
  assert json.loads((tmp_path / "info.json").read_text()) == {"x": [0, 1], "y": 0.25}
  assert _read_tb_scalars(tmp_path / "tb")[("b", 3)] == 2.0


def test_metric_writer_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "off"
  with metrics.MetricWriter(str(workdir), enabled=False) as w:
    w.write(1, {"a": 1.0})
    w.write_json("x", {})
  assert not workdir.exists()


def test_format_table():
  table = metrics.format_table([{"m": "onpo", "g": 0.0123456}, ["omd", 12]], ["m", "g"])
  lines = table.splitlines()
  assert lines[0].split() == ["m", "g"] and lines[2].split() == ["onpo", "0.01235"]
  assert lines[3].split() == ["omd", "12"]
  assert len({len(l) for l in lines}) == 1
  with pytest.raises(ValueError, match="lacks columns"):
    metrics.format_table([{"m": 1}], ["m", "g"])
  with pytest.raises(ValueError, match="cells"):
    metrics.format_table([[1]], ["m", "g"])


def test_plots(tmp_path):
  x = np.array([1.0, 10.0, 100.0])
  out = plots.loglog_plot({"a": (x, 1 / x), "b": (x, np.array([0.0, 0.1, 0.01]))},
                          str(tmp_path / "sub" / "ll.png"), "t")
  assert pathlib.Path(out).read_bytes()[:8] == PNG_MAGIC
  out = plots.line_plot({"a": (x, x)}, str(tmp_path / "l.png"), "t", "x", "y")
  assert pathlib.Path(out).read_bytes()[:8] == PNG_MAGIC
  out = plots.heatmap(np.full((3, 3), 0.5), ["a", "b", "c"], str(tmp_path / "h.png"), "w")
  assert pathlib.Path(out).read_bytes()[:8] == PNG_MAGIC
  with pytest.raises(ValueError, match="labels"):
    plots.heatmap(np.zeros((2, 2)), ["a"], str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="curve 'a'"):
    plots.line_plot({"a": (x, x[:2])}, str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="non-empty"):
    plots.loglog_plot({}, str(tmp_path / "x.png"))
