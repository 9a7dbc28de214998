"""Metric writing shared by all experiments: JSONL, JSON files and TensorBoard.

Only process 0 writes in multi-host runs: construct the writer with
`enabled=jax.process_index() == 0` and every method becomes a no-op elsewhere,
so call sites need no `if`.
"""

import errno
import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from onpo_jax.infra import checks


def _to_builtin(obj: Any) -> Any:
  """Makes numpy / jax scalars and arrays JSON-serialisable."""
  if isinstance(obj, Mapping):
    return {str(k): _to_builtin(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_builtin(v) for v in obj]
  if isinstance(obj, (str, bool, int, float)) or obj is None:
    return obj
  arr = np.asarray(obj)
  return arr.item() if arr.ndim == 0 else arr.tolist()


# errnos that mean the storage is full or cannot be written; any other OSError is a bug to see.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def _is_storage_error(e: BaseException) -> bool:
  return isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS


class _EventFile:
  """A TensorBoard event file written synchronously, without threads or atexit hooks.

  tensorboardX's `SummaryWriter` queues events for a background thread and
  closes its file from an `atexit` hook; on a full disk both print tracebacks
  of their own after the run's real error. This class writes each record with
  unbuffered `os.write` calls from the caller's thread, so an error reaches the
  caller at once and nothing is left to write (or fail) at exit.

  The format is tensorboardX's: TFRecord framing (u64 length, masked CRC-32C of
  the length, the serialized `Event`, masked CRC-32C of it), a first event with
  `file_version: "brain.Event:2"`, and the name
  `events.out.tfevents.<seconds>.<hostname>` (`.<n>` appended if that exists).
  """

  def __init__(self, logdir: str):
    # Imported lazily: tensorboardX pulls in protobuf, which not every caller needs.
    # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2
    # pylint: enable=g-import-not-at-top
    self._masked_crc32c = record_writer.masked_crc32c
    self._scalar = summary.scalar
    self._event = event_pb2.Event
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    # Exclusive create: a writer reopened within the same second (a quick resume)
    # must not truncate the previous file, as tensorboardX's "wb" open would.
    self.path, n = base, 0
    while True:
      try:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        break
      except FileExistsError:
        n += 1
        self.path = f"{base}.{n}"
    try:
      self._write_event(self._event(wall_time=time.time(), file_version="brain.Event:2"))
    except BaseException:
      fd, self._fd = self._fd, -1
      os.close(fd)
      raise

  def _write_event(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    record = b"".join((header, struct.pack("<I", self._masked_crc32c(header)), data,
                       struct.pack("<I", self._masked_crc32c(data))))
    start = os.lseek(self._fd, 0, os.SEEK_END)
    view = memoryview(record)
    try:
      while view:
        view = view[os.write(self._fd, view):]
    except OSError:
      # Drop the partial record so that the file stays readable if writing resumes.
      try:
        os.ftruncate(self._fd, start)
      except OSError:
        pass
      raise

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Appends one event per scalar (as `SummaryWriter.add_scalar` does)."""
    wall_time = time.time()
    for name, value in values.items():
      self._write_event(self._event(wall_time=wall_time, step=step,
                                    summary=self._scalar(name, value)))

  def flush(self) -> None:
    """Records are already in the OS after each write; this makes them durable."""
    os.fsync(self._fd)

  def close(self) -> None:
    fd, self._fd = self._fd, -1
    if fd < 0:
      return
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def __del__(self):
    # A writer dropped unclosed releases its descriptor; nothing is pending, so nothing is lost.
    fd, self._fd = getattr(self, "_fd", -1), -1
    if fd >= 0:
      try:
        os.close(fd)
      except Exception:  # pylint: disable=broad-except  # silent by design: may run at shutdown
        pass


def _close_quietly_if_storage_fails(name: str, close) -> None:
  """Calls `close()`; an error of a full or unwritable disk becomes one warning line.

  Such an error repeats one the caller already got from a write (nothing is
  left unwritten between writes), and raising it from `close` (often in
  `__exit__`, while the run's own error propagates) would hide that error.
  """
  try:
    close()
  except OSError as e:
    if not _is_storage_error(e):
      raise
    logging.warning("%s could not be closed cleanly: %s", name, e)


class MetricWriter:
  """Appends scalar metrics to `workdir/metrics.jsonl` and to TensorBoard (`workdir/tb`).

  Args:
    workdir: output directory (created if missing).
    enabled: False on non-zero processes; then nothing is created or written.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        self._tb = _EventFile(os.path.join(self.workdir, "tb"))
      except BaseException:
        _close_quietly_if_storage_fails("metrics.jsonl", self._jsonl.close)
        raise

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes one JSON line {"step": step, **metrics} and one TB scalar per metric.

    Both are in the OS when this returns (no buffer is left to write at exit).

    Raises:
      ValueError: if `step` is not an int or a metric is not a real scalar.
      OSError: a file could not be written (e.g. the disk is full).
    """
    if not checks.is_int(step):
      raise ValueError(f"step must be an int, got {step!r}")
    if "step" in metrics:
      raise ValueError("metrics must not contain the reserved key 'step'")
    values = {}
    for name, value in metrics.items():
      arr = np.asarray(value)
      if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"metric {name!r} must be a real scalar, got {value!r}")
      values[str(name)] = float(arr)
    if not self.enabled:
      return
    # NaN/inf are written as JSON null: standard JSON has no NaN literal.
    line = {"step": int(step)}
    line.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._jsonl.write(json.dumps(line) + "\n")
    self._jsonl.flush()
    self._tb.add_scalars(int(step), values)

  def write_json(self, name: str, obj: Any) -> None:
    """Writes `obj` to `workdir/name` (".json" appended when missing)."""
    if not self.enabled:
      return
    if not name.endswith(".json"):
      name += ".json"
    with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as f:
      json.dump(_to_builtin(obj), f, indent=2, sort_keys=True)

  def flush(self) -> None:
    """Flushes metrics.jsonl and syncs the TensorBoard file to disk."""
    if self.enabled and self._jsonl is not None:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    """Closes both files; idempotent.

    An OSError of a full or unwritable disk (ENOSPC, EDQUOT, EROFS, EIO, EFBIG)
    is logged as one warning line, never raised: it repeats an error that a
    write already raised, and must not replace the error a `with` block is
    propagating. Any other OSError is raised.
    """
    if self.enabled and self._jsonl is not None:
      jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
      try:
        _close_quietly_if_storage_fails("metrics.jsonl", jsonl.close)
      finally:
        _close_quietly_if_storage_fails("the TensorBoard event file", tb.close)

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _fmt(value: Any) -> str:
  if isinstance(value, (float, np.floating)):
    return f"{value:.4g}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str]) -> str:
  """Aligned plain-text table; floats shown with 4 significant digits.

  Args:
    rows: mappings keyed by column name, or sequences in column order.
    columns: column headers.

  Returns:
    The table, one line per row after a header and a rule.
  """
  cells = [list(map(str, columns))]
  for i, row in enumerate(rows):
    if isinstance(row, Mapping):
      missing = [c for c in columns if c not in row]
      if missing:
        raise ValueError(f"rows[{i}] lacks columns {missing}")
      cells.append([_fmt(row[c]) for c in columns])
    else:
      if len(row) != len(columns):
        raise ValueError(f"rows[{i}] has {len(row)} cells, expected {len(columns)}")
      cells.append([_fmt(v) for v in row])
  widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
