"""What a workdir keeps about its run: the resolved config, and who is running it.

A run writes its resolved config to `config.json` when it starts. The same
command run again on that workdir resumes the run, so it must be the same run:
every field that can change results is compared with the saved one, and a
difference is refused with a message that names the fields and both values,
unless the new config sets `allow_config_change` (then the run goes on with
the new values, says so, and saves them). A finished run started again with
another config says that, instead of "nothing to do". A workdir without any
checkpoint has nothing to resume (its first start failed early), so its saved
config is simply replaced. Fields that only steer
logging, checkpoint retention, output formats or the multi-host launch are not
compared (`NEUTRAL_FIELDS`).

One run at a time may use a workdir: its main process holds an exclusive
`flock` on `run.lock` while it runs. The kernel drops the lock when the process
ends, however it ends (kill -9 included), so a killed run never leaves a stale
lock behind; the pid and host written in the file only serve the message.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Any

from absl import logging

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"

# Fields (or sections) that cannot change a run's results.
NEUTRAL_FIELDS = (
    "allow_config_change",
    "check_memory",
    "log_every_seconds",
    "checkpoint.max_to_keep",
    "compilation_cache_dir",
    "distributed",
    "mesh.variant",
    "eval.show_examples",
    "eval.generator",
    "export.max_shard_size",
)


class ConfigChangeError(ValueError):
  """A workdir's run was started with another config."""


class WorkdirBusyError(RuntimeError):
  """Another process is running in the workdir."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for every leaf of a nested dict (an empty dict is a leaf)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_fields(config) -> dict[str, Any]:
  """The config's leaves by dotted name, as JSON values (tuples become lists)."""
  return flatten(json.loads(config.to_json_best_effort()))


def is_neutral(field: str) -> bool:
  """Whether `field` cannot change results (`NEUTRAL_FIELDS`)."""
  return any(field == n or field.startswith(n + ".") for n in NEUTRAL_FIELDS)


_ABSENT = "<absent>"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) of every differing non-neutral field, sorted."""
  return [(f, saved.get(f, _ABSENT), current.get(f, _ABSENT))
          for f in sorted(set(saved) | set(current))
          if not is_neutral(f) and saved.get(f, _ABSENT) != current.get(f, _ABSENT)]


def _describe(changes) -> str:
  return "; ".join(f"{f}: {s!r} in the saved run, {c!r} now" for f, s, c in changes)


def check_config(workdir: str, config, *, started: bool, finished: bool, is_main: bool) -> None:
  """Compares `config` with the one saved in `workdir`, then saves it.

  Args:
    workdir: the run's directory.
    config: this command's resolved config.
    started: whether the workdir holds a checkpoint; without one there is
      nothing to resume (a start that failed on bad input), so any saved
      config is replaced.
    finished: whether the workdir's run has finished.
    is_main: whether this process writes files.

  Raises:
    ConfigChangeError: a result-changing field differs from the saved config,
      and the run has finished or `config.allow_config_change` is not set.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_fields(config)
  if started and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = flatten(json.load(f))
    changes = config_changes(saved, current)
    if not changes:
      return
    if finished:
      raise ConfigChangeError(
          f"--workdir {workdir} holds a finished run with another config ({_describe(changes)}); "
          "its results are in summary.json. Use a new --workdir for this config.")
    if not config.get("allow_config_change", False):
      raise ConfigChangeError(
          f"--workdir {workdir} holds a run started with another config ({_describe(changes)}); "
          "resuming it with this one would mix the two. Run the command that started it, use "
          "a new --workdir, or pass --config.allow_config_change=True to go on with the new "
          "values.")
    logging.warning("resuming %s with a changed config (allow_config_change): %s", workdir,
                    _describe(changes))
  if is_main:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


# Locks this process holds, by workdir: a job that raised and is called again in
# the same process (a notebook, a test) is the same owner, not another run.
_HELD: dict[str, int] = {}


def lock_workdir(workdir: str) -> None:
  """Takes the workdir's run lock for this process.

  Raises:
    WorkdirBusyError: another process holds it; the message names that process.
  """
  workdir = os.path.realpath(workdir)
  if workdir in _HELD:
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with open(path, encoding="utf-8") as f:
      holder = f.read().strip() or "a process that has not written its name yet"
    os.close(fd)
    raise WorkdirBusyError(
        f"--workdir {workdir} is in use by another run ({holder}); wait for it to end or use "
        "another --workdir") from None
  now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}\n".encode())
  _HELD[workdir] = fd


def unlock_workdir(workdir: str) -> None:
  """Releases the lock `lock_workdir` took (no-op when this process holds none)."""
  fd = _HELD.pop(os.path.realpath(workdir), None)
  if fd is not None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
