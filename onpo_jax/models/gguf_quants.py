"""Dequantisation of GGUF tensor data (llama.cpp's GGML block formats) in numpy.

Each quantised format stores a tensor row as consecutive fixed-size blocks of
bytes; every function below takes those blocks as a [n_blocks, type_size] uint8
array and returns [n_blocks, block_size] float32 values. The layouts are
ggml's block structs (`ggml-common.h`): little-endian float16 scales first or
last, then packed integers. The arithmetic is float32 in the order of ggml's
reference `dequantize_row_*` (e.g. `(d * scale) * q - dmin * min`), so the
results are the same floats llama.cpp computes, not merely close ones.

The type codes are GGML's `ggml_type` enum values, written out here so the
format tables do not depend on the `gguf` package (its own dequantiser is the
independent reference in tests/test_gguf.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

# Elements per block of the "K-quants" (super-blocks of 8 or 16 sub-blocks).
QK_K = 256
# Elements per block of the legacy formats (Q4_0, Q4_1, Q8_0).
QK = 32


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
  """The little-endian float16 at byte `offset` of every block, as [n, 1] float32."""
  raw = np.ascontiguousarray(blocks[:, offset:offset + 2])
  return raw.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """Low then high 4-bit halves of each byte: [..., k] uint8 -> [..., 2k] uint8.

  ggml packs element j in the low nibble and element j + k in the high nibble of
  byte j (not two neighbours per byte), so the halves are concatenated.
  """
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
  """F32: 4 bytes per element."""
  return np.ascontiguousarray(blocks).view("<f4").astype(np.float32)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
  """F16: IEEE half precision, widened exactly."""
  return np.ascontiguousarray(blocks).view("<f2").astype(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
  """BF16: the top 16 bits of a float32, so a shift widens it exactly."""
  bits = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16
  return bits.view(np.float32)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
  """Q8_0 (34 bytes / 32 values): f16 scale d, then 32 int8 q; x = q·d."""
  d = _f16(blocks, 0)
  q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
  return q * d


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
  """Q4_0 (18 bytes / 32 values): f16 d, 16 bytes of 4-bit q; x = (q - 8)·d."""
  d = _f16(blocks, 0)
  q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
  return q.astype(np.float32) * d


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
  """Q4_1 (20 bytes / 32 values): f16 d, f16 m, 4-bit q; x = q·d + m."""
  d = _f16(blocks, 0)
  m = _f16(blocks, 2)
  q = _nibbles(blocks[:, 4:]).astype(np.float32)
  return q * d + m


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unpacks the 8 six-bit (scale, min) pairs of a Q4_K / Q5_K super-block.

  The 12 bytes hold sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and
  4-7 (mins); sub-blocks 4-7 take their low 4 bits from the nibbles of bytes
  8-11 and their top 2 bits from the spare top bits of bytes 0-3 / 4-7
  (ggml's `get_scale_min_k4`).

  Args:
    scales: [n, 12] uint8.

  Returns:
    (scale, min), each [n, 8] float32 (integers 0..63).
  """
  s = scales.astype(np.uint8)
  lo_sc = s[:, 0:4] & 63
  lo_mn = s[:, 4:8] & 63
  hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
  hi_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
  sc = np.concatenate([lo_sc, hi_sc], axis=1).astype(np.float32)
  mn = np.concatenate([lo_mn, hi_mn], axis=1).astype(np.float32)
  return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
  """[n, 128] packed bytes -> [n, 8, 32] 4-bit values of the 8 sub-blocks.

  Each 32-byte chunk c carries sub-block 2c in its low nibbles and sub-block
  2c + 1 in its high nibbles.
  """
  chunks = qs.reshape(qs.shape[0], 4, 1, 32)
  return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
  """Q4_K (144 bytes / 256 values): f16 d, f16 dmin, 12 bytes of packed 6-bit
  sub-block scales and mins, 128 bytes of 4-bit q in 8 sub-blocks of 32;
  x = (d·scale)·q - dmin·min."""
  d = _f16(blocks, 0)
  dmin = _f16(blocks, 2)
  sc, mn = _k_scales_mins(blocks[:, 4:16])
  q = _k_nibbles(blocks[:, 16:144]).astype(np.float32)
  scale = (d * sc)[:, :, None]
  offset = (dmin * mn)[:, :, None]
  return (scale * q - offset).reshape(-1, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
  """Q5_K (176 bytes / 256 values): as Q4_K with a fifth bit per value: 32
  bytes qh whose bit s of byte l is the high bit of value l of sub-block s."""
  d = _f16(blocks, 0)
  dmin = _f16(blocks, 2)
  sc, mn = _k_scales_mins(blocks[:, 4:16])
  qh = blocks[:, 16:48]
  low = _k_nibbles(blocks[:, 48:176])
  high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
  q = (low | (high << 4)).astype(np.float32)
  scale = (d * sc)[:, :, None]
  offset = (dmin * mn)[:, :, None]
  return (scale * q - offset).reshape(-1, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
  """Q6_K (210 bytes / 256 values): 128 bytes ql (low 4 bits), 64 bytes qh
  (high 2 bits), 16 int8 scales (one per 16 values), f16 d last;
  x = (d·scale)·(q - 32).

  Each half of 128 values uses 64 bytes of ql (values 0-63 from the low
  nibbles, 64-127 from the high ones) and 32 bytes of qh (2-bit field k of
  byte l is the high part of value 32k + l).
  """
  n = blocks.shape[0]
  ql = blocks[:, 0:128].reshape(n, 2, 64)
  qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
  sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
  d = _f16(blocks, 208)
  low = _nibbles(ql)  # [n, 2, 128]
  shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
  high = ((qh >> shifts) & 3).reshape(n, 2, 128)
  q = (low | (high << 4)).astype(np.int8) - np.int8(32)
  scale = np.repeat(d * sc, 16, axis=1)  # value i uses scales[i // 16]
  return scale * q.reshape(n, QK_K).astype(np.float32)


class QuantFormat(NamedTuple):
  """One GGML tensor type: its name, block geometry and dequantiser."""
  name: str
  block_size: int  # values per block
  type_size: int  # bytes per block
  dequantize: Callable[[np.ndarray], np.ndarray]


# {ggml_type code: format} for every type this project reads.
FORMATS: dict[int, QuantFormat] = {
    0: QuantFormat("F32", 1, 4, dequantize_f32),
    1: QuantFormat("F16", 1, 2, dequantize_f16),
    2: QuantFormat("Q4_0", QK, 18, dequantize_q4_0),
    3: QuantFormat("Q4_1", QK, 20, dequantize_q4_1),
    8: QuantFormat("Q8_0", QK, 34, dequantize_q8_0),
    12: QuantFormat("Q4_K", QK_K, 144, dequantize_q4_k),
    13: QuantFormat("Q5_K", QK_K, 176, dequantize_q5_k),
    14: QuantFormat("Q6_K", QK_K, 210, dequantize_q6_k),
    30: QuantFormat("BF16", 1, 2, dequantize_bf16),
}
SUPPORTED_TYPES = tuple(f.name for f in FORMATS.values())


def dequantize(raw: np.ndarray, qtype: int, n_values: int) -> np.ndarray:
  """Dequantises one tensor's bytes.

  Args:
    raw: the tensor's data as bytes (any shape; it is flattened).
    qtype: its ggml_type code (a key of FORMATS).
    n_values: number of values the tensor holds.

  Returns:
    [n_values] float32.

  Raises:
    KeyError: qtype is not a supported type.
    ValueError: n_values is not a whole number of blocks, or `raw` does not
      hold exactly that many blocks.
  """
  fmt = FORMATS[int(qtype)]
  if n_values % fmt.block_size:
    raise ValueError(f"{n_values} values are not a whole number of {fmt.name} "
                     f"blocks of {fmt.block_size}")
  n_blocks = n_values // fmt.block_size
  raw = np.asarray(raw).reshape(-1).view(np.uint8)
  if raw.size != n_blocks * fmt.type_size:
    raise ValueError(f"{fmt.name} data holds {raw.size} bytes, expected "
                     f"{n_blocks * fmt.type_size} for {n_values} values")
  return fmt.dequantize(raw.reshape(n_blocks, fmt.type_size)).reshape(-1)
