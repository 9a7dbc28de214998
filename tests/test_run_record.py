"""A workdir holds one run: its saved config is checked on resume, one process runs it."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from onpo_jax.infra import run_record
from onpo_jax.selfplay import loop as loop_lib


def _config(**changes):
  c = ml_collections.ConfigDict({
      "seed": 0, "log_every_seconds": 10.0, "allow_config_change": False, "check_memory": True,
      "onpo": {"eta": 2.0}, "selfplay": {"methods": ("onpo_two_step", "inpo")},
      "checkpoint": {"max_to_keep": 2}, "distributed": {"process_id": None},
      "eval": {"judges": {}}})
  for field, value in changes.items():
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
  return c


def _loop(workdir, config=None, total_units=2):
  return loop_lib.UnitLoop(str(workdir), label="t", total_units=total_units, max_to_keep=2,
                           log_every_seconds=1e9, config=config)


def _state():
  return {"x": np.arange(3.0)}


def _start(workdir, config, units=1):
  """A run of 2 units that completed `units` of them, its lock released as at exit."""
  loop = _loop(workdir, config)
  state, unit, _ = loop.restore(_state())
  for u in range(unit + 1, units + 1):
    loop.complete(u, state, u, {"u": float(u)}, "")
  if units == loop.total_units:
    loop.finish(state, {"done": True})
  else:
    loop.writer.close()
    run_record.unlock_workdir(str(workdir))


def test_changes_ignore_neutral_fields_and_list_the_others():
  saved = run_record.config_fields(_config())
  now = run_record.config_fields(_config(**{
      "onpo.eta": 7.0, "log_every_seconds": 1.0, "checkpoint.max_to_keep": 5,
      "distributed.process_id": 3, "allow_config_change": True, "check_memory": False,
      "selfplay.methods": ("onpo_two_step",)}))
  assert run_record.config_changes(saved, now) == [
      ("onpo.eta", 2.0, 7.0), ("selfplay.methods", ["onpo_two_step", "inpo"], ["onpo_two_step"])]
  # A field only one side has is a change too (e.g. an evaluation judge added).
  now["eval.judges.self.kind"] = "pairwise"
  assert ("eval.judges.self.kind", "<absent>", "pairwise") in run_record.config_changes(saved, now)
  assert run_record.is_neutral("distributed.coordinator_address")
  assert not run_record.is_neutral("distributedx")


def test_a_resume_with_another_config_is_refused_before_any_work(tmp_path):
  _start(tmp_path, _config())
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["onpo"]["eta"] == 2.0
  with pytest.raises(run_record.ConfigChangeError,
                     match=r"holds a run started with another config \(onpo\.eta: 2\.0 in the "
                           r"saved run, 7\.0 now; seed: 0 in the saved run, 1 now\).*"
                           r"--config\.allow_config_change=True"):
    _loop(tmp_path, _config(**{"onpo.eta": 7.0, "seed": 1}))
  # Nothing was changed: the saved config and the checkpoint are those of the first start.
  assert json.loads((tmp_path / "config.json").read_text()) == saved
  run_record.unlock_workdir(str(tmp_path))
  # A neutral change resumes.
  loop = _loop(tmp_path, _config(log_every_seconds=1.0))
  assert loop.restore(_state())[1] == 1
  loop.writer.close()
  run_record.unlock_workdir(str(tmp_path))


def test_a_start_that_saved_no_checkpoint_takes_the_new_config(tmp_path):
  # A first start that failed on bad input before its first unit: nothing to resume.
  _loop(tmp_path, _config(**{"onpo.eta": 9.0}))
  run_record.unlock_workdir(str(tmp_path))
  _start(tmp_path, _config())
  assert json.loads((tmp_path / "config.json").read_text())["onpo"]["eta"] == 2.0


def test_allow_config_change_goes_on_with_the_new_values_and_saves_them(tmp_path):
  _start(tmp_path, _config())
  loop = _loop(tmp_path, _config(**{"onpo.eta": 7.0, "allow_config_change": True}))
  assert loop.restore(_state())[1] == 1
  loop.writer.close()
  assert json.loads((tmp_path / "config.json").read_text())["onpo"]["eta"] == 7.0
  run_record.unlock_workdir(str(tmp_path))


def test_a_finished_run_with_another_config_says_so(tmp_path):
  _start(tmp_path, _config(), units=2)
  with pytest.raises(run_record.ConfigChangeError,
                     match=r"holds a finished run with another config \(onpo\.eta: 2\.0 in the "
                           r"saved run, 7\.0 now\); its results are in summary\.json"):
    _loop(tmp_path, _config(**{"onpo.eta": 7.0, "allow_config_change": True}))
  run_record.unlock_workdir(str(tmp_path))
  # The same config still finds the finished run.
  assert _loop(tmp_path, _config()).finished_summary() == {"done": True}


_HOLDER = """
import sys, time
from onpo_jax.infra import run_record
run_record.lock_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_one_process_per_workdir_and_a_killed_holder_frees_it(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(run_record.WorkdirBusyError,
                       match=rf"--workdir .* is in use by another run \(pid {holder.pid} on .*, "
                             r"since .*\); wait for it to end or use another --workdir"):
      _loop(tmp_path, _config())
    # Refused before anything was written.
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  # The kernel dropped the dead process's lock: no stale lock to clean up by hand.
  deadline = time.time() + 30
  while True:
    try:
      _start(tmp_path, _config())
      break
    except run_record.WorkdirBusyError:
      assert time.time() < deadline
      time.sleep(0.1)
  assert (tmp_path / "config.json").exists()


def test_a_workdir_that_cannot_be_written_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match=rf"--workdir {blocker}/run cannot be created or "
                                            "written"):
    _loop(blocker / "run", _config())


# A full disk as the OS reports it, and as orbax's array writer (tensorstore) does
# (its text from a real run on a full tmpfs).
FULL_DISK = {
    "os": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "tensorstore": ValueError(
        'RESOURCE_EXHAUSTED: Failed writing: "/mnt/small/run/checkpoints/16.orbax-checkpoint-'
        'tmp/arrays/d/1a2b": Failed to write 1261 bytes to file 9: No space left on device '
        "[os_error_code='28']"),
}


@pytest.mark.parametrize("reported_as", sorted(FULL_DISK))
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, reported_as):
  loop = _loop(tmp_path, _config(), total_units=3)
  state, _, _ = loop.restore(_state())
  loop.complete(1, state, 1, {"u": 1.0}, "")

  def full_disk(*args, **kwargs):
    raise FULL_DISK[reported_as]

  loop.ckpt._manager.save = full_disk  # pylint: disable=protected-access
  with pytest.raises(OSError, match=r"the checkpoint of step 2 could not be written in .*"
                                    r"checkpoints \(No space left on device\); the checkpoint of "
                                    r"step 1 is intact\. Free space"):
    loop.complete(2, {"x": np.arange(3.0) + 1}, 2, {"u": 2.0}, "")
  loop.writer.close()
  run_record.unlock_workdir(str(tmp_path))
  # The same command resumes from step 1 with its state.
  loop = _loop(tmp_path, _config(), total_units=3)
  restored, unit, _ = loop.restore(_state())
  assert unit == 1 and restored["x"].tolist() == [0.0, 1.0, 2.0]
  loop.writer.close()
  run_record.unlock_workdir(str(tmp_path))
