"""The loop every job runs: numbered units, PRNG keys, checkpoints, resume, metrics, progress.

A job is a sequence of units (a unit is an SFT fit or one round of one method).
After each unit the loop writes its metrics (`metrics.jsonl`, TensorBoard) and
an orbax checkpoint of everything a resume needs; a run killed at any moment and
started again with the same command resumes after its last checkpoint (metric
lines newer than it are dropped first, since they will be redone) and ends with
the same results; a finished run started again does nothing and says so.
PRNG keys are functions of the run key, the round and the method
(`round_key`), so a resumed unit draws exactly what it drew the first time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from onpo_jax.infra import checkpoint as checkpoint_lib
from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import run_record


def round_key(run_key: jax.Array, round_index: int, method_index: int) -> jax.Array:
  """The key of round `round_index` (0-based) of the `method_index`-th method."""
  return jax.random.fold_in(jax.random.fold_in(run_key, round_index), method_index)


def truncate_jsonl(path: str, last_unit: int) -> None:
  """Drops metric lines written after unit `last_unit` (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [ln for ln in f if ln.strip()]
  keep = [ln for ln in lines if json.loads(ln).get("unit", 0) <= last_unit]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


# step_fn(unit, state) -> (state, metrics, metrics step, progress text)
StepFn = Callable[[int, Any], tuple[Any, dict, int, str]]


class UnitLoop:
  """Numbered units of work with a checkpoint after each.

  The main process holds the workdir's run lock from construction to `finish`
  (or to its end), and a run that already started in the workdir must have the
  same config (`onpo_jax.infra.run_record`). A resume starts from the newest
  checkpoint whose files match their checksums (`Checkpointer.latest_valid_step`).

  Args:
    workdir: the run's directory (checkpoints/, metrics.jsonl, tb/, summary.json,
      config.json).
    label: the job's name in printed lines.
    total_units: units of a complete run.
    max_to_keep: orbax checkpoints kept.
    log_every_seconds: a progress line (rate and ETA) at most this often.
    config: the run's resolved config, compared with the saved one and saved
      (None: no comparison).

  Raises:
    PermissionError: the workdir cannot be created or written.
    run_record.WorkdirBusyError: another process runs in the workdir.
    run_record.ConfigChangeError: the workdir's run has another config.
  """

  def __init__(self, workdir: str, *, label: str, total_units: int, max_to_keep: int,
               log_every_seconds: float, config=None):
    self.workdir = os.path.abspath(workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      if not os.access(self.workdir, os.W_OK | os.X_OK):
        raise PermissionError("not writable")
    except OSError as e:
      raise PermissionError(f"--workdir {self.workdir} cannot be created or written: "
                            f"{e.strerror or e}") from e
    self.label, self.total_units = label, int(total_units)
    self.log_every_seconds = float(log_every_seconds)
    self.is_main = jax.process_index() == 0
    if self.is_main:
      run_record.lock_workdir(self.workdir)
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                            max_to_keep=int(max_to_keep))
    latest = self._latest = self._valid_latest_step()
    self.finished = latest is not None and self.ckpt.restore_meta(latest).get("done", False)
    if config is not None:
      run_record.check_config(self.workdir, config, started=latest is not None,
                              finished=self.finished, is_main=self.is_main)
    self.writer = None

  def _valid_latest_step(self) -> int | None:
    """The newest undamaged checkpoint; damaged newer ones are moved aside by the main process."""
    if jax.process_count() == 1:
      return self.ckpt.latest_valid_step()
    error = None
    if self.is_main:
      try:
        self.ckpt.latest_valid_step()
      except RuntimeError as e:  # every step damaged: the others must stop too, not wait
        error = e
    # The others wait until the main process has set damaged steps aside, then re-list.
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if error is not None:
      raise error
    if failed:
      raise RuntimeError(f"process 0 found no intact checkpoint in {self.workdir}; its log names "
                         "each step's damage")
    self.ckpt.reload()
    return self.ckpt.latest_step()

  def log(self, msg: str) -> None:
    if self.is_main:
      print(msg, flush=True)
      logging.info(msg)

  def finished_summary(self) -> dict | None:
    """The summary of a run that already finished in `workdir` (then the loop is closed)."""
    if not self.finished:
      return None
    self.log(f"{self.label}: run in {self.workdir} already finished ({self.total_units} units); "
             "nothing to do")
    self.ckpt.close()
    run_record.unlock_workdir(self.workdir)
    with open(os.path.join(self.workdir, "summary.json"), encoding="utf-8") as f:
      return json.load(f)

  def restore(self, state) -> tuple[Any, int, dict]:
    """(state, completed units, metadata) from the latest checkpoint, or (state, 0, {})."""
    latest = self._latest
    unit, meta = 0, {}
    if latest is not None:
      state, meta = self.ckpt.restore(latest, state)
      unit = int(meta["unit"])
      self.log(f"{self.label}: resuming from checkpoint unit {unit}/{self.total_units} in "
               f"{self.workdir}")
    if self.is_main:  # another process's rewrite would orphan the main process's open file
      truncate_jsonl(os.path.join(self.workdir, "metrics.jsonl"), unit)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main)
    self._start_unit, self._start_time, self._last_log = unit, time.perf_counter(), -1e9
    return state, unit, meta

  def save(self, unit: int, state, *, done: bool = False, **meta) -> None:
    """Checkpoints `state` after `unit`.

    Raises:
      OSError: the checkpoint could not be written (a full disk, permissions);
        the message says which checkpoint is intact and how to resume.
    """
    # A finished run is one step past its last unit, so resuming never reads it as a unit.
    step = unit + 1 if done else unit
    try:
      self.ckpt.save(step, state, {"unit": unit, "done": done, **meta})
    except OSError as e:
      previous = self.ckpt.latest_step()
      kept = (f"the checkpoint of step {previous} is intact" if previous is not None
              else "no earlier checkpoint exists")
      raise OSError(e.errno, f"the checkpoint of step {step} could not be written in "
                    f"{self.ckpt.directory} ({e.strerror or e}); {kept}. Free space (or fix "
                    "permissions) and run the same command again to resume.") from e

  def complete(self, unit: int, state, step: int, metrics: dict, progress: str, **meta) -> None:
    """Records a finished unit: metrics line, checkpoint, and a progress line when due."""
    self.writer.write(step, dict(metrics, unit=unit))
    self.save(unit, state, **meta)
    now = time.perf_counter()
    if now - self._last_log >= self.log_every_seconds or unit == self.total_units:
      rate = (unit - self._start_unit) / max(now - self._start_time, 1e-9)
      eta = (self.total_units - unit) / max(rate, 1e-9)
      if self.is_main:  # printed only: absl logging would repeat it on stderr
        print(f"[{self.label}] unit {unit}/{self.total_units} ({progress}) "
              f"{now - self._start_time:.1f}s elapsed, {rate:.2f} units/s, ETA {eta:.0f}s",
              flush=True)
      self._last_log = now

  def run(self, state, unit: int, step_fn: StepFn, **meta):
    """Runs units `unit + 1 .. total_units` with `step_fn`; returns the final state."""
    while unit < self.total_units:
      state, metrics, step, progress = step_fn(unit, state)
      unit += 1
      self.complete(unit, state, step, metrics, progress, **meta)
    return state

  def finish(self, state, summary: dict, **meta) -> None:
    """Writes summary.json, marks the run finished and closes files."""
    self.writer.write_json("summary.json", summary)
    self.writer.close()
    self.save(self.total_units, state, done=True, **meta)
    self.ckpt.close()
    run_record.unlock_workdir(self.workdir)
