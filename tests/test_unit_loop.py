"""The unit loop's shared files when several processes run one job."""

import json
import os

from onpo_jax.selfplay import loop as loop_lib


def _loop(workdir):
  return loop_lib.UnitLoop(workdir, label="t", total_units=2, max_to_keep=1,
                           log_every_seconds=1e9)


def test_truncate_jsonl_keeps_units_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"unit": u, "x": u}) + "\n" for u in (1, 2, 3)))
  loop_lib.truncate_jsonl(str(path), 2)
  assert [json.loads(ln)["unit"] for ln in path.read_text().splitlines()] == [1, 2]
  assert not os.path.exists(str(path) + ".tmp")


def test_a_second_process_starting_late_keeps_the_main_process_metrics(tmp_path):
  # Process 0 has opened metrics.jsonl and written a line before process 1 restores:
  # process 1 must not rewrite the file (the main process would go on writing into an
  # unlinked file and the run would end with an empty metrics.jsonl).
  main = _loop(str(tmp_path))
  main.restore({})
  main.writer.write(1, {"unit": 1, "x": 1.0})
  other = _loop(str(tmp_path))
  other.is_main = False
  other.restore({})
  main.writer.write(2, {"unit": 2, "x": 2.0})
  main.writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(ln)["unit"] for ln in lines] == [1, 2]
