"""Fuzzed checkpoints: a damaged safetensors / GGUF file or config.json is named.

Property-based (hypothesis) tests of `onpo_jax.models.loading.load_checkpoint`,
the one entry jobs use for both formats, on the tiny checkpoints the other
tests build (`onpo_jax.testing.tiny_hf` for HF directories, test_gguf's
llama.cpp-style writer for GGUF files). Each case damages one copy in a known
way: cut at a random byte, random bytes overwritten in the header, one field
of the safetensors JSON header changed (shape, dtype, offsets, name), one
config.json field set to a wrong type or value, one GGUF metadata value or
tensor-info field (dims, type, offset) overwritten, the sharded index changed.
The property: the load either succeeds (the damage hit only values) or raises
the importer's own error — `hf_io.CheckpointError`, `gguf.GGUFError`, or the
ValueError / KeyError / FileNotFoundError / NotImplementedError the importers
raise themselves, exactly those types — whose message names the file (and the
tensor, where one tensor's shape is wrong). Nothing escapes from
safetensors, the gguf reader, numpy or JAX, and nothing exhausts memory (a
corrupt layer count or head size is checked against the stored shapes before
the model is built).

Deterministic (derandomized, no example database);
`pytest --hypothesis-show-statistics` counts the cases.
"""

import json
import os
import shutil
import struct

import gguf
import numpy as np
import pytest
from hypothesis import event, given, strategies as st

from onpo_jax.models import gguf as gguf_lib
from onpo_jax.models import hf_io
from onpo_jax.models import loading
from onpo_jax.testing import tiny_hf
from fuzzing import fuzz
from test_gguf import QTYPES, _write_tiny_gguf, tiny_torch  # noqa: F401 (a fixture)

# The importers' own errors; checked by exact type, so that a ValueError subclass
# from a library (UnicodeDecodeError, JSONDecodeError) does not pass for one.
OWN_ERRORS = (hf_io.CheckpointError, gguf_lib.GGUFError, ValueError, KeyError,
              FileNotFoundError, NotImplementedError)


def _load_or_named(path, names):
  """Loads `path`; on failure checks the error is the importers' own and names one of
  `names`. Returns the outcome (for the statistics) and the error message."""
  try:
    loading.load_checkpoint(path)
  except Exception as e:  # noqa: BLE001 - the property is about which exception
    assert type(e) in OWN_ERRORS, f"{type(e).__name__} escaped: {e}"
    msg = str(e)
    assert any(n in msg for n in names), f"no file named in: {msg[:400]}"
    assert len(msg) < 4000, "message quotes a whole header"
    event(f"refused: {type(e).__name__}")
    return "refused", msg
  event("loaded")
  return "loaded", ""


# ---------------------------------------------------------- HF (safetensors)


class _Files(dict):
  """{file name: bytes}, with a short repr for hypothesis' failure reports."""

  def __repr__(self):
    return f"<files {sorted(self)}>"


def _read_all(folder) -> _Files:
  out = _Files()
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = f.read()
  return out


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
  """The tiny llama checkpoint of test_hf_io, and its files' bytes."""
  path = tiny_hf.make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=3)
  files = _read_all(path)
  data = files[hf_io.SINGLE_FILE]
  n = struct.unpack("<Q", data[:8])[0]
  return _Files(path=path, files=files, header_len=n, header=json.loads(data[8:8 + n]),
                body=data[8 + n:])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fuzz_ckpt"))


def _hf_copy(work, ckpt, **replace) -> str:
  """A copy of the checkpoint directory with some files' bytes replaced."""
  path = os.path.join(work, "hf")
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  for name, data in (dict(ckpt["files"]) | replace).items():
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
  return path


def _safetensors(header, body) -> bytes:
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw + body


@fuzz(60)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_safetensors_is_named(work, hf_ckpt, cut):
  data = hf_ckpt["files"][hf_io.SINGLE_FILE]
  path = _hf_copy(work, hf_ckpt, **{hf_io.SINGLE_FILE: data[:int(cut * len(data))]})
  outcome, msg = _load_or_named(path, [os.path.join(path, hf_io.SINGLE_FILE)])
  assert outcome == "refused" and "truncated or corrupt" in msg


@fuzz(100)
@given(edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_damaged_safetensors_header_bytes(work, hf_ckpt, edits):
  data = bytearray(hf_ckpt["files"][hf_io.SINGLE_FILE])
  for where, byte in edits:
    data[int(where * (8 + hf_ckpt["header_len"]))] = byte
  path = _hf_copy(work, hf_ckpt, **{hf_io.SINGLE_FILE: bytes(data)})
  _load_or_named(path, [path])


_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I64", "U8", "I8", "BOOL", "F8_E4M3",
           "XYZ", 5, None, ["F32"]]


@st.composite
def header_edits(draw, header):
  """(edited header, tensor name, what was changed, whether that tensor alone is now
  wrong for config.json with its bytes still consistent)."""
  header = json.loads(json.dumps(header))
  names = sorted(k for k in header if k != "__metadata__")
  t = draw(st.sampled_from(names))
  entry = header[t]
  what = draw(st.sampled_from(["shape_same_size", "shape_any", "dtype", "offsets", "rename",
                               "drop", "extra", "metadata", "not_object"]))
  only_this = False
  if what == "shape_same_size":  # the same bytes, read with another shape
    numel = int(np.prod(entry["shape"]))
    shapes = [[numel]] + [[d, numel // d] for d in range(1, numel + 1) if numel % d == 0]
    new = draw(st.sampled_from([s for s in shapes if s != entry["shape"]]))
    only_this = True
    entry["shape"] = new
  elif what == "shape_any":
    entry["shape"] = draw(st.one_of(
        st.lists(st.integers(0, 200), max_size=3), st.just([2**62, 2**62]),
        st.just([-1, 4]), st.just("32"), st.just([1.5]), st.none()))
  elif what == "dtype":
    entry["dtype"] = draw(st.sampled_from(_DTYPES))
    only_this = entry["dtype"] in ("I32", "U32")  # 4 bytes, as F32: the sizes still agree
  elif what == "offsets":
    a, z = entry["data_offsets"]
    entry["data_offsets"] = draw(st.sampled_from(
        [[z, a], [a, z + 4], [a - 4, z - 4], [0, 0], [-1, z], [a, 2**70], "x", [a], None]))
  elif what == "rename":
    header[draw(st.sampled_from([t + "x", t.replace("layers.0", "layers.7"), "", "lm_head"]))] = \
        header.pop(t)
  elif what == "drop":
    header.pop(t)
  elif what == "extra":
    header["model.layers.0.mlp.extra.weight"] = dict(entry)
  elif what == "metadata":
    header["__metadata__"] = draw(st.sampled_from([{"format": 3}, [], "pt", {"a": None}]))
  else:
    header = draw(st.sampled_from([[], "x", 3, None]))
  return header, t, what, only_this


@fuzz(150)
@given(data=st.data())
def test_safetensors_header_fields_disagreeing_with_config_are_named(work, hf_ckpt, data):
  header, name, what, only_this = data.draw(header_edits(hf_ckpt["header"]))
  event(f"header edit: {what}")
  path = _hf_copy(work, hf_ckpt, **{hf_io.SINGLE_FILE: _safetensors(header, hf_ckpt["body"])})
  outcome, msg = _load_or_named(path, [path])
  if only_this:
    # One tensor's shape or dtype disagrees with config.json: named with its file.
    assert outcome == "refused" and name in msg and hf_io.SINGLE_FILE in msg, msg


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 200), st.sampled_from([0, -1, 2**31, 2**40, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.sampled_from([[], [1, 2], {}, {"rope_type": "llama3"}, {"rope_type": "yarn", "factor": 2},
                     {"type": "linear", "factor": 0.5}, "silu", "gelu", "qwen2", "mistral"]))


@fuzz(200)
@given(data=st.data())
def test_config_json_fields_of_wrong_type_or_size_are_named(work, hf_ckpt, data):
  config = json.loads(hf_ckpt["files"]["config.json"])
  key = data.draw(st.sampled_from(sorted(config) + ["rope_scaling", "mlp_bias", "hidden_act"]))
  config[key] = data.draw(_JSON_VALUES)
  event(f"config.json key {key}")
  path = _hf_copy(work, hf_ckpt, **{"config.json": json.dumps(config).encode()})
  _load_or_named(path, [path])


@fuzz(50)
@given(cut=st.floats(0.0, 1.0, exclude_max=True), junk=st.binary(max_size=6))
def test_damaged_config_json_text_is_named(work, hf_ckpt, cut, junk):
  text = hf_ckpt["files"]["config.json"]
  at = int(cut * len(text))
  path = _hf_copy(work, hf_ckpt, **{"config.json": text[:at] + junk})
  outcome, msg = _load_or_named(path, [os.path.join(path, "config.json")])
  assert outcome == "refused"


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
  path = tiny_hf.make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), "llama",
                                      max_shard_size="20KB")
  return _read_all(path)


@fuzz(60)
@given(data=st.data())
def test_damaged_sharded_index_is_named(work, sharded_ckpt, data):
  index = json.loads(sharded_ckpt[hf_io.INDEX_FILE])
  names = sorted(index["weight_map"])
  kind = data.draw(st.sampled_from(["value", "weight_map", "text"]))
  if kind == "value":
    index["weight_map"][data.draw(st.sampled_from(names))] = data.draw(st.one_of(
        st.sampled_from(sorted(set(index["weight_map"].values())) + ["missing.safetensors",
                                                                       "", "../x", None, 3, []]),
        st.text(max_size=6)))
    raw = json.dumps(index).encode()
  elif kind == "weight_map":
    index["weight_map"] = data.draw(st.sampled_from([None, [], "x", 3]))
    raw = json.dumps(index).encode()
  else:
    raw = sharded_ckpt[hf_io.INDEX_FILE][:data.draw(st.integers(0, 40))] + b"\xff"
  event(f"index edit: {kind}")
  path = os.path.join(work, "sharded")
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  for name, content in (dict(sharded_ckpt) | {hf_io.INDEX_FILE: raw}).items():
    with open(os.path.join(path, name), "wb") as f:
      f.write(content)
  _load_or_named(path, [path])


# ----------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_ckpts(tmp_path_factory, tiny_torch):  # noqa: F811
  """test_gguf's tiny llama written as F32 and as Q8_0, with its fields' byte spans."""
  root = tmp_path_factory.mktemp("gguf")
  out = _Files()
  for qtype in (QTYPES.F32, QTYPES.Q8_0):
    path = str(root / f"tiny_{qtype.name}.gguf")
    _write_tiny_gguf(path, tiny_torch, qtype)
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    slots = []  # (what, tensor name or None, byte offset, numpy dtype of the part)
    for key, field in reader.fields.items():
      if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "token_type")):
        continue
      for j in field.data:
        part = field.parts[j]
        slots.append((f"metadata {key}", None, part.__array_interface__["data"][0] - base,
                      part.dtype))
    for t in reader.tensors:
      for label, part in zip(("name length", "name", "n_dims", "dims", "type", "offset"),
                             t.field.parts):
        slots.append((f"tensor {label}", t.name, part.__array_interface__["data"][0] - base,
                      part.dtype))
    with open(path, "rb") as f:
      data = f.read()
    out[qtype.name] = _Files(
        data=data, data_offset=int(reader.data_offset), slots=slots,
        tensors={t.name: (t.field.parts[3].__array_interface__["data"][0] - base,
                          [int(n) for n in t.shape]) for t in reader.tensors})
    del reader
  return out


def _gguf_copy(work, data: bytes) -> str:
  path = os.path.join(work, "damaged.gguf")
  with open(path, "wb") as f:
    f.write(data)
  return path


@fuzz(60)
@given(qtype=st.sampled_from(["F32", "Q8_0"]), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_gguf_is_named(work, gguf_ckpts, qtype, cut):
  g = gguf_ckpts[qtype]
  at = int(cut * len(g["data"]))
  path = _gguf_copy(work, g["data"][:at])
  outcome, msg = _load_or_named(path, [path])
  if at < g["data_offset"]:
    assert outcome == "refused"  # the header is incomplete


@fuzz(100)
@given(qtype=st.sampled_from(["F32", "Q8_0"]),
       edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_damaged_gguf_header_bytes(work, gguf_ckpts, qtype, edits):
  g = gguf_ckpts[qtype]
  data = bytearray(g["data"])
  for where, byte in edits:
    data[int(where * g["data_offset"])] = byte
  path = _gguf_copy(work, bytes(data))
  _load_or_named(path, [path])


# A mutated type or offset can make garbage values (NaN) of loadable tensors.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz(250)
@given(qtype=st.sampled_from(["F32", "Q8_0"]), data=st.data())
def test_gguf_metadata_and_tensor_info_mutations_are_named(work, gguf_ckpts, qtype, data):
  g = gguf_ckpts[qtype]
  what, _, offset, dtype = data.draw(st.sampled_from(g["slots"]), label="slot")
  event(what.split(" ")[0] + " " + ("value" if what.startswith("metadata") else what[7:]))
  raw = bytearray(g["data"])
  if dtype.kind in "iu":
    value = data.draw(st.one_of(st.sampled_from([0, 1, 2, 3, 7, 30, 2**31, 2**32 - 1, 2**63]),
                                st.integers(0, 2**64 - 1)), label="value")
    raw[offset:offset + dtype.itemsize] = (value % 2**(8 * dtype.itemsize)).to_bytes(
        dtype.itemsize, "little")
  elif dtype.kind == "f":
    value = data.draw(st.sampled_from([0.0, -1.0, np.nan, np.inf, 1e30, 1e-30]), label="value")
    raw[offset:offset + dtype.itemsize] = np.array([value], dtype).tobytes()
  else:  # a string's bytes
    raw[offset] = data.draw(st.integers(0, 255), label="byte")
  path = _gguf_copy(work, bytes(raw))
  _load_or_named(path, [path])


@fuzz(40)
@given(data=st.data())
def test_gguf_tensor_with_another_shape_is_named(work, gguf_ckpts, data):
  """Dims of one 2-D tensor swapped: its bytes still fit, but not the model."""
  g = gguf_ckpts["F32"]
  swappable = sorted(n for n, (_, shape) in g["tensors"].items()
                     if len(shape) == 2 and shape[0] != shape[1])
  name = data.draw(st.sampled_from(swappable))
  offset, (ne0, ne1) = g["tensors"][name]
  raw = bytearray(g["data"])
  raw[offset:offset + 16] = struct.pack("<QQ", ne1, ne0)
  path = _gguf_copy(work, bytes(raw))
  outcome, msg = _load_or_named(path, [path])
  assert outcome == "refused" and repr(name) in msg and "shape" in msg, msg
