"""Metric writing shared by all experiments: JSONL, JSON files and TensorBoard.

Only process 0 writes in multi-host runs: construct the writer with
`enabled=jax.process_index() == 0` and every method becomes a no-op elsewhere,
so call sites need no `if`.
"""

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


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
      # Imported lazily: tensorboardX pulls in protobuf, which not every caller needs.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes one JSON line {"step": step, **metrics} and one TB scalar per metric.

    Raises:
      ValueError: if `step` is not an int or a metric is not a real scalar.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
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
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def write_json(self, name: str, obj: Any) -> None:
    """Writes `obj` to `workdir/name` (".json" appended when missing)."""
    if not self.enabled:
      return
    if not name.endswith(".json"):
      name += ".json"
    with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as f:
      json.dump(_to_builtin(obj), f, indent=2, sort_keys=True)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

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
