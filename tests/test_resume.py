"""Kill-and-resume: SIGKILL the main job after a checkpoint, restart it, compare results.

A restart with another config is refused, mid-run and after the end.

Runs the real CLI (`python -m experiments.run`) in subprocesses with the same
environment (hence the same 8 fake CPU devices as this process). The resumed run
must end with exactly the numbers of an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from configs import default


def get_config(arg=None):
  c = default.get_config("tiny")
  c.selfplay.methods = ("onpo_two_step", "sppo", "nash_md")
  c.selfplay.num_rounds = 2
  c.exact.methods = ("onpo_two_step",)
  c.compilation_cache_dir = {cache!r}
  return c
"""

# Wall-clock keys are the only metrics allowed to differ between runs.
TIMING = ("tokens_per_s",)


def _cmd(config_path, workdir):
  return [sys.executable, "-m", "experiments.run", f"--config={config_path}",
          f"--workdir={workdir}"]


def _steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def _numbers(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  lines = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      lines.append({k: v for k, v in row.items() if not any(t in k for t in TIMING)})
  return summary, lines


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "selfplay_jax_cache")
  path = tmp_path_factory.mktemp("resume_cfg") / "resume_config.py"
  path.write_text(CONFIG.format(cache=cache))
  return str(path)


def test_sigkill_and_resume_gives_identical_results(tmp_path, config_path):
  full = str(tmp_path / "full")
  done = subprocess.run(_cmd(config_path, full), cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd(config_path, killed), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 900
    # Kill after the second complete checkpoint (SFT and one trajectory), i.e. in
    # the middle of the self-play loop (9 units: SFT, 2 seeds x 3 sampled methods,
    # 1 exact method over both seeds, 1 η-sweep unit).
    while len(_steps(killed)) < 2 or max(_steps(killed)) < 2:
      assert proc.poll() is None, "run ended before it could be killed"
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  last = max(_steps(killed))
  assert last < 9, "the run finished before the kill; nothing was resumed"
  assert not os.path.exists(os.path.join(killed, "summary.json"))

  # Another config on that workdir is refused before any work, naming the field.
  changed = subprocess.run(_cmd(config_path, killed) + ["--config.onpo.eta=7.0"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert changed.returncode != 0
  assert "holds a run started with another config (onpo.eta: 2.0 in the saved run, 7.0 now)" in (
      changed.stderr)
  assert max(_steps(killed)) == last

  resumed = subprocess.run(_cmd(config_path, killed), cwd=REPO, capture_output=True, text=True,
                           timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from checkpoint unit" in resumed.stdout

  summary_full, lines_full = _numbers(full)
  summary_resumed, lines_resumed = _numbers(killed)
  assert summary_resumed == summary_full
  assert lines_resumed == lines_full

  again = subprocess.run(_cmd(config_path, killed), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and "already finished" in again.stdout
  again = subprocess.run(_cmd(config_path, killed) + ["--config.onpo.eta=7.0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode != 0
  assert "holds a finished run with another config (onpo.eta: 2.0 in the saved run, 7.0 now)" in (
      again.stderr)
