"""Damaged checkpoints are found by their checksums; a resume falls back or stops, never reads them."""

import os
import re
import types

import numpy as np
import pytest
from absl import logging

from onpo_jax.infra import checkpoint as checkpoint_lib
from onpo_jax.infra import run_record
from onpo_jax.selfplay import loop as loop_lib


def _saved(tmp_path, steps=(1, 2)):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5)
  for s in steps:
    ckpt.save(s, {"x": np.arange(1000.0) + s}, {"unit": s})
  return ckpt


def _files(ckpt, step, under=""):
  """The step's files (relative paths) under `under`, largest first."""
  folder = ckpt.step_dir(step)
  out = []
  for root, _, files in os.walk(os.path.join(folder, under)):
    out += [os.path.relpath(os.path.join(root, f), folder) for f in files
            if f != checkpoint_lib.CHECKSUM_FILE]
  return sorted(out, key=lambda r: -os.path.getsize(os.path.join(folder, r)))


def _flip_byte(path, offset=None):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    f.seek(0)
    f.write(data)


def test_an_intact_checkpoint_verifies(tmp_path):
  ckpt = _saved(tmp_path)
  assert os.path.exists(os.path.join(ckpt.step_dir(2), checkpoint_lib.CHECKSUM_FILE))
  assert ckpt.verify(1) is None and ckpt.verify(2) is None
  assert ckpt.latest_valid_step() == 2


@pytest.mark.parametrize("damage, match", [
    ("flip", r"is damaged \((\d+) bytes, crc32 [0-9a-f]{8}; saved \1 bytes"),
    ("truncate", r"is damaged \(\d+ bytes, crc32 [0-9a-f]{8}; saved \d+ bytes"),
    ("delete_meta", r"meta/.* is missing"),
])
def test_a_damaged_latest_step_is_named_and_set_aside(tmp_path, damage, match, monkeypatch):
  ckpt = _saved(tmp_path)
  folder = ckpt.step_dir(2)
  if damage == "flip":
    _flip_byte(os.path.join(folder, _files(ckpt, 2, "arrays")[0]))
  elif damage == "truncate":
    path = os.path.join(folder, _files(ckpt, 2, "arrays")[0])
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    for rel in _files(ckpt, 2, "meta"):
      os.remove(os.path.join(folder, rel))
  assert ckpt.verify(1) is None
  assert ckpt.verify(2) is not None
  assert re.search(match, ckpt.verify(2)), ckpt.verify(2)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  assert ckpt.latest_valid_step() == 1
  assert len(warnings) == 1 and "checkpoint step 2" in warnings[0] and "corrupt" in warnings[0]
  # Set aside, not deleted; the next save may reuse the step number.
  assert ckpt.all_steps() == [1]
  (aside,) = os.listdir(str(tmp_path / "checkpoints_corrupt"))
  assert aside.startswith("2-")
  tree, meta = ckpt.restore(1, {"x": np.zeros(1000)})
  assert meta["unit"] == 1 and tree["x"][0] == 1.0
  ckpt.save(2, {"x": np.arange(1000.0)}, {"unit": 2})
  assert ckpt.verify(2) is None and ckpt.latest_valid_step() == 2


def test_no_valid_step_stops_with_every_problem_listed(tmp_path):
  ckpt = _saved(tmp_path)
  for step in (1, 2):
    _flip_byte(os.path.join(ckpt.step_dir(step), _files(ckpt, step, "arrays")[0]))
  with pytest.raises(RuntimeError, match=r"no valid checkpoint in .*checkpoints: step 2: .* is "
                                         r"damaged .*; step 1: .* is damaged .*Use a new workdir"):
    ckpt.latest_valid_step()


def test_a_step_without_checksums_is_accepted(tmp_path):
  # Killed between orbax's rename (the step is complete) and the checksum write.
  ckpt = _saved(tmp_path)
  os.remove(os.path.join(ckpt.step_dir(2), checkpoint_lib.CHECKSUM_FILE))
  assert ckpt.verify(2) is None and ckpt.latest_valid_step() == 2


def test_a_run_resumes_from_the_last_undamaged_unit(tmp_path):
  def loop():
    return loop_lib.UnitLoop(str(tmp_path), label="t", total_units=3, max_to_keep=3,
                             log_every_seconds=1e9)

  first = loop()
  state, _, _ = first.restore({"x": np.zeros(4)})
  for u in (1, 2):
    first.complete(u, {"x": np.full(4, float(u))}, u, {"u": float(u)}, "")
  first.writer.close()
  run_record.unlock_workdir(str(tmp_path))
  _flip_byte(os.path.join(first.ckpt.step_dir(2), _files(first.ckpt, 2, "arrays")[0]))
  again = loop()
  state, unit, _ = again.restore({"x": np.zeros(4)})
  assert unit == 1 and state["x"].tolist() == [1.0] * 4
  again.writer.close()
  run_record.unlock_workdir(str(tmp_path))


@pytest.mark.parametrize("process_index", [0, 1])
def test_every_process_stops_when_no_step_is_intact(tmp_path, monkeypatch, process_index):
  """On several processes the main one verifies; the others must stop with it, not wait."""
  run = loop_lib.UnitLoop(str(tmp_path), label="t", total_units=3, max_to_keep=3,
                          log_every_seconds=1e9)
  run.restore({"x": np.zeros(4)})
  run.complete(1, {"x": np.ones(4)}, 1, {"u": 1.0}, "")
  run.writer.close()
  _flip_byte(os.path.join(run.ckpt.step_dir(1), _files(run.ckpt, 1, "arrays")[0]))
  told = []

  def broadcast(x):  # process 0's value reaches every process
    told.append(int(x))
    return x if process_index == 0 else np.int32(1)

  # Only the loop sees two processes (orbax's own collectives stay single-process).
  monkeypatch.setattr(loop_lib, "jax", types.SimpleNamespace(process_count=lambda: 2))
  monkeypatch.setattr(loop_lib.multihost_utils, "broadcast_one_to_all", broadcast)
  run.is_main = process_index == 0
  match = ("no valid checkpoint in .*step 1: .* is damaged" if process_index == 0 else
           "process 0 found no intact checkpoint in .*; its log names each step's damage")
  with pytest.raises(RuntimeError, match=match):
    run._valid_latest_step()
  assert told == [1 if process_index == 0 else 0]
  run_record.unlock_workdir(str(tmp_path))
