"""MetricWriter's TensorBoard file: its format read back independently, and a full disk.

tensorboardX's SummaryWriter flushes from a background thread and an atexit
hook, which print tracebacks of their own after the run's real error when the
disk is full; MetricWriter writes the event file synchronously instead.
"""

import errno
import glob
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from onpo_jax.infra import metrics

METRICS_PY = pathlib.Path(metrics.__file__)


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_reference_value():
  # RFC 3720 B.4 check value of CRC-32C.
  assert _crc32c(b"123456789") == 0xE3069283


def _read_events(path) -> list:
  """Parses a TFRecord file, checking both CRCs of every record."""
  data, i, events = pathlib.Path(path).read_bytes(), 0, []
  while i < len(data):
    assert len(data) - i >= 12, f"truncated header at byte {i} of {path}"
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[i + 8:i + 12])
    assert header_crc == _masked(_crc32c(header)), f"bad length CRC at byte {i}"
    payload = data[i + 12:i + 12 + length]
    assert len(payload) == length, f"truncated record at byte {i} of {path}"
    (data_crc,) = struct.unpack("<I", data[i + 12 + length:i + 16 + length])
    assert data_crc == _masked(_crc32c(payload)), f"bad data CRC at byte {i}"
    events.append(event_pb2.Event.FromString(payload))
    i += 16 + length
  return events


def _scalars(events) -> list:
  return [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value]


def _event_files(logdir) -> list:
  return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))


def test_event_file_reads_back_with_checked_crcs(tmp_path):
  written = [(3, {"loss": 1.5, "eval/gap": np.float32(0.25)}), (4, {"loss": float("nan")}),
             (10**12, {"loss": -2.0, "eval/gap": 7})]
  with metrics.MetricWriter(str(tmp_path)) as w:
    for step, values in written:
      w.write(step, values)
    # Synchronous: every record is in the file before any flush or close.
    (path,) = _event_files(tmp_path / "tb")
    assert len(_scalars(_read_events(path))) == 5
  assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\.{re.escape(socket.gethostname())}",
                      os.path.basename(path))
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2" and not events[0].HasField("summary")
  got = _scalars(events)
  expected = [(name, step, float(value)) for step, values in written
              for name, value in values.items()]
  assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in expected]
  # TensorBoard stores float32.
  np.testing.assert_array_equal([v for *_, v in got],
                                np.float32([v for *_, v in expected]))
  assert all(e.wall_time > 1e9 for e in events)


def test_event_file_matches_tensorboardx_summary_writer(tmp_path):
  """Same events (but wall times) as tensorboardX's own SummaryWriter writes."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  values = {"loss": 0.5, "a/b": 2.0, "bad name!": 3.0}  # the last is renamed by both
  with metrics.MetricWriter(str(tmp_path / "ours")) as w:
    w.write(7, values)
  theirs = SummaryWriter(logdir=str(tmp_path / "theirs"))
  for name, value in values.items():
    theirs.add_scalar(name, value, 7)
  theirs.close()

  def strip(path):
    events = _read_events(path)
    for e in events:
      e.wall_time = 0
    return events

  (ours_path,) = _event_files(tmp_path / "ours" / "tb")
  (theirs_path,) = _event_files(tmp_path / "theirs")
  assert strip(ours_path) == strip(theirs_path)
  assert os.path.basename(ours_path).split(".")[:3] == os.path.basename(theirs_path).split(".")[:3]


def test_writers_opened_in_the_same_second_keep_both_files(tmp_path):
  for step in (1, 2, 3):
    with metrics.MetricWriter(str(tmp_path)) as w:
      w.write(step, {"x": float(step)})
  files = _event_files(tmp_path / "tb")
  assert sorted(s for f in files for _, s, _ in _scalars(_read_events(f))) == [1, 2, 3]


def test_close_swallows_only_storage_errors(tmp_path, monkeypatch):
  w = metrics.MetricWriter(str(tmp_path))
  w.write(1, {"x": 1.0})
  monkeypatch.setattr(metrics.os, "fsync", _raiser(errno.ENOSPC))
  w.close()  # logged, not raised
  w.close()  # idempotent
  w = metrics.MetricWriter(str(tmp_path))
  monkeypatch.setattr(metrics.os, "fsync", _raiser(errno.EBADF))
  with pytest.raises(OSError, match="injected"):
    w.close()
  assert w._tb is None  # pylint: disable=protected-access  # closed anyway


def _raiser(code):
  def fail(*args):
    del args
    raise OSError(code, "injected")
  return fail


# ---- A full disk, in a child process that exits like a failed run. ----

_CHILD = textwrap.dedent("""
    import errno, importlib.util, os, shutil, sys, traceback
    metrics_py, workdir, copy_to, disk, writes, how = sys.argv[1:]
    if disk == "file_size_limit":  # a write past 16 KiB fails with EFBIG, not a kill
      import resource, signal
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    # Loaded by path: the package's __init__ would import JAX, which this does not need.
    spec = importlib.util.spec_from_file_location("metrics_under_test", metrics_py)
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)

    w = metrics.MetricWriter(workdir)
    w.write(1, {"loss": 1.0})
    if disk == "tmpfs":
      with open(os.path.join(workdir, "filler"), "wb", buffering=0) as f:
        for size in (65536, 1):
          try:
            while True:
              f.write(b"0" * size)
          except OSError as e:
            assert e.errno == errno.ENOSPC, e
    # "few": the writes may all succeed, as when only the checkpoint then fails.
    failed, code = None, errno.ENOSPC if disk == "tmpfs" else errno.EFBIG
    try:
      for step in range(2, 100000 if writes == "until_failure" else 5):
        w.write(step, {"loss": step / 2})
      assert writes == "few", "the disk never filled"
    except OSError as e:
      failed = e
      print("failed_in", traceback.extract_tb(e.__traceback__)[-1].name, e.errno)
    shutil.copytree(os.path.join(workdir, "tb"), copy_to)
    ours = OSError(code, "the checkpoint of step 3 could not be written "
                   f"({os.strerror(code)}); the checkpoint of step 2 is intact")
    sys.stdout.flush()
    if how == "with":  # closed by the `with` while our error propagates
      with w:
        raise ours
    raise ours  # the writer is left open, as the run loop leaves it
""")


def _mount_prefix(mountpoint) -> list | None:
  """A command prefix that runs its command with a 64 KiB tmpfs on `mountpoint`.

  The tmpfs lives in a private mount namespace, so it vanishes with the child
  and never needs unmounting. None where namespaces or mounts are not allowed.
  """
  if shutil.which("unshare") is None:
    return None
  user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
  prefix = ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"', str(mountpoint)]
  probe = subprocess.run([*prefix, "sh", "-c", f'test "$(stat -f -c %T {mountpoint})" = tmpfs'],
                         capture_output=True, timeout=60, check=False)
  return prefix if probe.returncode == 0 else None


@pytest.mark.parametrize("disk,writes,how", [
    # The issue: metrics written, the checkpoint fails, the run exits with the writer open.
    ("tmpfs", "few", "open"),
    # A metrics write itself hits the full disk (the TB file's records are the larger).
    ("tmpfs", "until_failure", "open"),
    # ... and the writer is closed by a `with` while the run's error propagates.
    ("tmpfs", "until_failure", "with"),
    ("file_size_limit", "until_failure", "with"),
])
def test_a_full_disk_leaves_our_error_last_and_no_stray_traceback(tmp_path, disk, writes, how):
  """The child's only traceback is its own error's, and it ends stderr."""
  mountpoint = tmp_path / "disk"
  mountpoint.mkdir()
  prefix = []
  if disk == "tmpfs":
    prefix = _mount_prefix(mountpoint)
    if prefix is None:  # said, not skipped: the same property is checked on the fallback
      warnings.warn("cannot mount a tmpfs here (no root or user namespaces); "
                    "testing the full disk with a file size limit instead")
      prefix, disk = [], "file_size_limit"
  copy = tmp_path / "tb_copy"
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
  proc = subprocess.run(
      [*prefix, sys.executable, "-c", _CHILD, str(METRICS_PY), str(mountpoint / "run"),
       str(copy), disk, writes, how],
      capture_output=True, text=True, timeout=120, env=env, check=False)
  err = proc.stderr
  assert proc.returncode == 1, err
  code = errno.ENOSPC if disk == "tmpfs" else errno.EFBIG
  if writes == "until_failure":  # the TensorBoard file is the one that hit the full disk
    assert proc.stdout.split() == ["failed_in", "_write_event", str(code)], (proc.stdout, err)
  assert "Exception in thread" not in err and "Exception ignored" not in err, err
  assert err.count("Traceback") == 1, err
  last = err.rstrip().splitlines()[-1]
  assert last == (f"OSError: [Errno {code}] the checkpoint of step 3 could not be written "
                  f"({os.strerror(code)}); the checkpoint of step 2 is intact"), err
  # Every record that made it is whole: the failed one was cut off, not left half-written.
  (path,) = _event_files(copy)
  steps = [s for _, s, _ in _scalars(_read_events(path))]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1
