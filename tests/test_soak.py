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
  cmd = [sys.executable, "-c", _JOB, str(tmp_path)]
  with open(os.devnull, "w") as log:
    what = soak._kill_once(cmd, str(tmp_path), at_seconds=0.1, log=log)
  assert what.startswith("killed at 0.") and "between checkpoint writes" in what
  assert "newest checkpoint step -1" in what
  again = str(tmp_path / "again")
  with open(os.devnull, "w") as log:
    what = soak._kill_once([sys.executable, "-c", _JOB, again], again, at_seconds=None, log=log)
  assert "inside a checkpoint write; newest checkpoint step 1" in what
  # The unfinished write that kill left behind is not taken for a new one.
  with open(os.devnull, "w") as log:
    what = soak._kill_once([sys.executable, "-c", "import time; time.sleep(60)"], again,
                           at_seconds=0.5, log=log)
  assert "between checkpoint writes" in what
  with open(os.devnull, "w") as log:
    what = soak._kill_once([sys.executable, "-c", "pass"], str(tmp_path), at_seconds=30.0,
                           log=log)
  assert what.startswith("finished before the kill (rc 0")


def test_results_ignore_only_wall_clock_rates(tmp_path):
  (tmp_path / "summary.json").write_text(json.dumps({"gap": 0.5}))
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "m/loss": 2.0, "m/sample_tokens_per_s": 40.0}) + "\n")
  summary, lines = soak._results(str(tmp_path))
  assert summary == {"gap": 0.5} and lines == [{"step": 1, "m/loss": 2.0}]


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(SystemExit, match="--kills must be >= 1"):
    soak.main(["--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--kills=0"])
  (tmp_path / "clean").mkdir()
  with pytest.raises(SystemExit, match="clean exists; give a new --workdir"):
    soak.main(["--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--kills=1"])
