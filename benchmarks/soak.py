r"""Random-kill soak: SIGKILL a job at seeded random moments, resume it, compare with a clean run.

    python -m benchmarks.soak --config=configs/default.py --kills=10 --workdir=/tmp/soak
    python -m benchmarks.soak --config=configs/smollm2.py:tiny --kills=3 --workdir=/tmp/soak_llm

First the job runs once uninterrupted (`<workdir>/clean`), which gives its
duration and when each checkpoint step appeared. Then the same command runs in
`<workdir>/killed` and is killed with SIGKILL `--kills` times, each time
restarted (so it resumes): odd-numbered kills land at a random moment after the
restarted run has resumed, a seeded uniform fraction (`--fractions`, default
10-70%) of the work left
after the newest checkpoint as the clean run took it, so every kill lands in
work before the end however far the run has got; even-numbered ones as soon as an orbax checkpoint write is
seen in progress (its `*.orbax-checkpoint-tmp*` directory). The last restart
runs to the end. A kill that would come after the run has finished does not
land, and once the run has written its summary.json no more kills are tried;
the verdict line says how many landed. The final `summary.json` (its own workdir
path aside), `metrics.jsonl` and exported checkpoint files must equal the clean
run's (wall-clock rates excepted). Prints
one line per kill and the verdict; exits 1 on any difference.

Extra `--config.<field>=<value>` overrides after `--` reach both runs, e.g.
`-- --config.compilation_cache_dir=/tmp/jax_cache` to make restarts cheap.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

from onpo_jax.infra import checkpoint as checkpoint_lib

# Metric keys that measure wall-clock speed, the only ones allowed to differ.
TIMING_KEYS = ("tokens_per_s",)


def _command(config: str, workdir: str, extra) -> list[str]:
  return [sys.executable, "-m", "experiments.run", f"--config={config}",
          f"--workdir={workdir}", *extra]


def _units_done(workdir: str) -> int:
  """Newest complete checkpoint step (-1 when none)."""
  steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
           if n.isdigit()] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  return max(steps, default=-1)


def _tmp_checkpoints(workdir: str) -> set[str]:
  """Orbax's unfinished step directories (a killed write leaves one until orbax cleans up)."""
  return set(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


def _results(workdir: str) -> tuple[dict, list[dict]]:
  """(summary, metric lines) with the workdir's own path written as <workdir> and no rates."""
  root = os.path.abspath(workdir)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.loads(f.read().replace(json.dumps(root)[1:-1], "<workdir>"))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [{k: v for k, v in json.loads(line).items()
              if not any(t in k for t in TIMING_KEYS)} for line in f if line.strip()]
  summary["<files under export/>"] = checkpoint_lib.file_sums(os.path.join(root, "export"))
  return summary, lines


def _timed_run(cmd, workdir: str, log) -> tuple[int, float, dict[int, float]]:
  """Runs `cmd` to the end: (return code, seconds, {checkpoint step: seconds when it appeared})."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=log, stderr=log)
  timeline = {}
  while proc.poll() is None:
    timeline.setdefault(_units_done(workdir), time.perf_counter() - start)
    time.sleep(0.05)
  timeline.pop(-1, None)
  return proc.returncode, time.perf_counter() - start, timeline


def kill_moment(rng: random.Random, duration: float, timeline: dict[int, float],
                units_done: int, fractions: tuple[float, float] = (0.1, 0.7)) -> float:
  """Seconds after a restart: a random fraction of what the clean run had left after `units_done`.

  Args:
    rng: the seeded source of the fractions.
    duration: the clean run's seconds.
    timeline: {checkpoint step: seconds into the clean run when it appeared}.
    units_done: the killed run's newest checkpoint step (-1: none yet).
    fractions: the range the fraction is drawn from; a smaller upper end
      leaves more of the run for later kills.
  """
  done_at = max((t for step, t in timeline.items() if step <= units_done), default=0.0)
  return rng.uniform(*fractions) * max(duration - done_at, 0.0)


RESUMED = "resuming from checkpoint"  # what `selfplay.loop.UnitLoop` logs once it has restored


def _kill_once(cmd, workdir: str, *, at_seconds: float | None, log) -> str:
  """Starts `cmd`, kills it at `at_seconds` or inside a checkpoint write; returns what happened.

  With a checkpoint in `workdir`, `at_seconds` counts from the moment the run
  logs that it resumed (so start-up, which the clean run paid once, is not
  taken for work); otherwise from the start.
  """
  left_over = _tmp_checkpoints(workdir)  # from an earlier kill: not a write of this process
  log.flush()
  offset = os.path.getsize(log.name)
  start = time.perf_counter()
  origin = None if _units_done(workdir) >= 0 else start
  proc = subprocess.Popen(cmd, stdout=log, stderr=log)
  while proc.poll() is None:
    now = time.perf_counter()
    inside = bool(_tmp_checkpoints(workdir) - left_over)
    if origin is None and at_seconds is not None:
      with open(log.name, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        origin = now if RESUMED in f.read() else None
    due = at_seconds is not None and origin is not None and now - origin >= at_seconds
    if due or (at_seconds is None and inside):
      units = _units_done(workdir)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      where = "inside a checkpoint write" if inside else "between checkpoint writes"
      return f"killed at {now - start:.1f} s ({where}; newest checkpoint step {units})"
    time.sleep(0.01 if origin is not None or at_seconds is None else 0.1)
  return f"finished before the kill (rc {proc.returncode}, {time.perf_counter() - start:.1f} s)"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:arg], as experiments.run")
  parser.add_argument("--workdir", required=True, help="holds clean/, killed/ and the logs")
  parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the final run")
  parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
  parser.add_argument("--fractions", type=float, nargs=2, default=(0.1, 0.7),
                      metavar=("LOW", "HIGH"),
                      help="timed kills land after this fraction of the work left")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  if args.kills < 1:
    raise SystemExit(f"--kills must be >= 1; got {args.kills}")
  if not 0 < args.fractions[0] <= args.fractions[1] < 1:
    raise SystemExit(f"--fractions must satisfy 0 < LOW <= HIGH < 1; got {args.fractions}")
  clean, killed = (os.path.join(args.workdir, n) for n in ("clean", "killed"))
  for path in (clean, killed):
    if os.path.exists(path):
      raise SystemExit(f"{path} exists; give a new --workdir")
  os.makedirs(args.workdir)
  rng = random.Random(args.seed)
  with open(os.path.join(args.workdir, "clean.log"), "w") as log:
    rc, duration, timeline = _timed_run(_command(args.config, clean, extra), clean, log)
  if rc:
    raise SystemExit(f"the clean run failed (rc {rc}); see {args.workdir}/clean.log")
  print(f"clean run: {duration:.1f} s, {len(timeline)} checkpoint steps", flush=True)
  cmd = _command(args.config, killed, extra)
  landed = inside = 0
  with open(os.path.join(args.workdir, "killed.log"), "w") as log:
    for i in range(1, args.kills + 1):
      if os.path.exists(os.path.join(killed, "summary.json")):
        print(f"kill {i}/{args.kills}: the run has finished; no more kills", flush=True)
        break
      at = None if i % 2 == 0 else kill_moment(rng, duration, timeline, _units_done(killed),
                                                tuple(args.fractions))
      what = _kill_once(cmd, killed, at_seconds=at, log=log)
      landed += what.startswith("killed")
      inside += "inside a checkpoint write" in what
      print(f"kill {i}/{args.kills}: {what}", flush=True)
    rc = subprocess.call(cmd, stdout=log, stderr=log)
  if rc:
    raise SystemExit(f"the final resume failed (rc {rc}); see {args.workdir}/killed.log")
  summary_clean, lines_clean = _results(clean)
  summary_killed, lines_killed = _results(killed)
  same = summary_clean == summary_killed and lines_clean == lines_killed
  print(f"{landed} of {args.kills} kills landed ({inside} inside checkpoint writes), then resumed "
        "to the end: "
        f"summary.json {'equal' if summary_clean == summary_killed else 'DIFFERENT'}, "
        f"metrics.jsonl ({len(lines_killed)} lines) "
        f"{'equal' if lines_clean == lines_killed else 'DIFFERENT'} to the clean run's")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
