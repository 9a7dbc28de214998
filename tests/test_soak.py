"""The soak tool's parts: when it kills, what it compares (the full soak is run by hand)."""

import json
import os
import sys

import pytest

from benchmarks import soak

# A stand-in job: a checkpoint step after 0.3 s, then an orbax-style write in progress.
_JOB = """
import os, sys, time
ckpt = os.path.join(sys.argv[1], "checkpoints")
time.sleep(0.3)
os.makedirs(os.path.join(ckpt, "1"))
time.sleep(0.3)
os.makedirs(os.path.join(ckpt, "2.orbax-checkpoint-tmp-123"))
time.sleep(60)
"""


def test_kills_at_a_time_or_inside_a_checkpoint_write(tmp_path):
  log_path = str(tmp_path / "log")
  cmd = [sys.executable, "-c", _JOB, str(tmp_path)]
  with open(log_path, "w") as log:
    what = soak._kill_once(cmd, str(tmp_path), at_seconds=0.1, log=log)
  assert what.startswith("killed at 0.") and "between checkpoint writes" in what
  assert "newest checkpoint step -1" in what
  again = str(tmp_path / "again")
  with open(log_path, "w") as log:
    what = soak._kill_once([sys.executable, "-c", _JOB, again], again, at_seconds=None, log=log)
  assert "inside a checkpoint write; newest checkpoint step 1" in what
  # With a checkpoint the time counts from the resume line (start-up is not work), and
  # the unfinished write the last kill left behind is not taken for a new one.
  resumes = ("import time; time.sleep(0.6); print('t: resuming from checkpoint unit 1/2', "
             "flush=True); time.sleep(60)")
  with open(log_path, "a") as log:
    log.write("resuming from checkpoint (an earlier start's line)\n")
    what = soak._kill_once([sys.executable, "-c", resumes], again, at_seconds=0.3, log=log)
  assert "between checkpoint writes" in what
  assert float(what.split()[2]) >= 0.9, what
  with open(log_path, "w") as log:
    what = soak._kill_once([sys.executable, "-c", "pass"], str(tmp_path), at_seconds=30.0,
                           log=log)
  assert what.startswith("finished before the kill (rc 0")


def test_timed_run_records_when_each_checkpoint_appeared(tmp_path):
  with open(os.devnull, "w") as log:
    rc, seconds, timeline = soak._timed_run(
        [sys.executable, "-c", _JOB.replace("time.sleep(60)", "time.sleep(0.2)"), str(tmp_path)],
        str(tmp_path), log)
  assert rc == 0 and list(timeline) == [1] and 0.3 <= timeline[1] < seconds


def test_kill_moments_follow_the_work_left():
  timeline = {0: 10.0, 1: 50.0, 2: 90.0}
  rng = soak.random.Random(0)
  for units_done, left in ((-1, 100.0), (0, 90.0), (1, 50.0), (2, 10.0), (5, 10.0)):
    for _ in range(50):
      assert 0.1 * left <= soak.kill_moment(rng, 100.0, timeline, units_done) <= 0.7 * left
  assert soak.kill_moment(rng, 5.0, timeline, 2) == 0.0
  for _ in range(50):
    assert 5.0 <= soak.kill_moment(rng, 100.0, timeline, 1, (0.1, 0.3)) <= 15.0


def test_results_ignore_only_wall_clock_rates_and_the_workdir_path(tmp_path):
  results = []
  for name, weights in (("a", b"\x00\x01"), ("b", b"\x00\x01"), ("c", b"\x00\x02")):
    run = tmp_path / name
    (run / "export" / "m").mkdir(parents=True)
    (run / "export" / "m" / "model.safetensors").write_bytes(weights)
    (run / "summary.json").write_text(json.dumps({"gap": 0.5, "export": str(run / "export")}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "m/loss": 2.0, "m/sample_tokens_per_s": float(len(name))}) + "\n")
    results.append(soak._results(str(run)))
  (summary, lines), same, other = results
  assert summary["export"] == "<workdir>/export" and lines == [{"step": 1, "m/loss": 2.0}]
  assert same == (summary, lines)
  assert other[0]["<files under export/>"] != summary["<files under export/>"]


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(SystemExit, match="--kills must be >= 1"):
    soak.main(["--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--kills=0"])
  (tmp_path / "clean").mkdir()
  with pytest.raises(SystemExit, match="clean exists; give a new --workdir"):
    soak.main(["--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--kills=1"])
