"""Self-attention through Pallas's splash kernel (TPU; interpreted elsewhere).

`attention.splash_attention` is the entry point (shape checks, the queries
without a visible key); this module maps our masks and layout onto the
kernel, JAX's block-sparse FlashAttention for TPU
(`jax.experimental.pallas.ops.tpu.splash_attention`): it never stores the
score matrix, in the forward or the backward pass, and skips the blocks the
causal / sliding-window mask hides. It covers self-attention over a whole
sequence (training, scoring, a prefill that writes a cache from slot 0).

How the mask of `attention.py` maps onto the kernel's:
* causal by slot, and the window w as its local mask (keys q - w + 1 .. q);
* valid keys as segment ids: key slot s has segment 1 if it holds a real
  token, else 0; a query that sees at least one valid key has segment 1, so it
  sees exactly the valid keys of its causal window;
* a query that sees no valid key (a left pad) gets segment 0: its own slot is
  then a pad, so it sees at least itself and the kernel's softmax stays
  finite; the caller replaces its output.

Grouped-query attention runs the kernel's multi-query form once per kv head
(its G query heads over one key/value head), vmapped over batch rows and kv
heads. The kernel takes unscaled scores, so the queries are scaled first.
Under `partitioning.activation_sharding` the kernel runs inside `shard_map`,
one shard of batch rows and kv heads per device: a Pallas call is opaque to
XLA's partitioner, which would otherwise gather the whole batch onto every
device.

Off TPU the kernel runs in Pallas's interpreter (slow; it is how the tests
check it on CPU), unless `interpret` says otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)

from onpo_jax.models import partitioning

# Mosaic tiles the sequence axes of a block by TPU lanes.
_TPU_LANES = 128


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def block_size(length: int, chunk_size: int) -> int:
  """Queries and keys per block: chunk_size, at most the (padded) length.

  The kernel tiles blocks by TPU lanes, so a block is a multiple of 128
  slots (in the interpreter too); shorter sequences are padded to one block.
  """
  return _round_up(min(chunk_size, length), _TPU_LANES)


def _kernel(length: int, groups: int, window: int | None, block: int,
            interpret: bool):
  """The multi-query splash kernel for one static shape and mask.

  Built at every trace, not cached: the kernel holds the mask's block tables
  as arrays of the trace that made it. Building them is numpy work over
  (length / block)² blocks.
  """
  shape = (length, length)
  if window is None:
    base = splash_mask.CausalMask(shape)
  else:
    base = splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  sizes = splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return splash_kernel.make_splash_mqa(
      splash_mask.MultiHeadMask([base] * groups), block_sizes=sizes,
      head_shards=1, q_seq_shards=1, interpret=interpret)


def _run_kernel(kernel, q, k, v, q_segments, kv_segments):
  """q [B, Hkv, G, L, d], k / v [B, Hkv, L, d], segments [B, L] -> like q."""

  def one_row(q_b, k_b, v_b, qs, ks):
    segments = splash_kernel.SegmentIds(q=qs, kv=ks)
    per_head = jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh,
                                                   segment_ids=segments))
    return per_head(q_b, k_b, v_b)

  return jax.vmap(one_row)(q, k, v, q_segments, kv_segments)


def _sharded(fn, q, k, v, q_segments, kv_segments):
  """fn under shard_map when an activation-sharding context is active."""
  active = partitioning.active_sharding()
  if active is None:
    return fn(q, k, v, q_segments, kv_segments)
  mesh, rules = active
  mesh_shape = dict(mesh.shape)
  # Batch and kv heads split as the activations' logical names say; a
  # name whose mesh axes do not divide its dimension stays whole.
  batch_axes, head_axes = partitioning.logical_to_spec(
      ("batch", "kv_heads"), rules, mesh_shape, q.shape[:2])
  p = jax.sharding.PartitionSpec
  heads = p(batch_axes, head_axes)
  rows = p(batch_axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, rows, rows),
                       out_specs=heads, check_vma=False)(
                           q, k, v, q_segments, kv_segments)


def self_attention(q, k, v, key_mask, seen, *, sliding_window, scale: float,
                   chunk_size: int, interpret: bool | None = None):
  """The kernel's softmax self-attention; see `attention.splash_attention`.

  Args:
    q: [B, L, Hkv, G, d] queries (compute dtype).
    k, v: [B, L, Hkv, d] keys and values, the same L slots as the queries.
    key_mask: [B, L] bool, slot holds a real token.
    seen: [B, L] bool, the query sees at least one valid key.
    sliding_window: None or the window w.
    scale: the score scale.
    chunk_size: queries and keys per block (see `block_size`).
    interpret: run the kernel in Pallas's interpreter; None means "unless
      the default backend is TPU".

  Returns:
    [B, L, Hkv, G, d] in the compute dtype; rows where `seen` is False hold
    an arbitrary finite value.
  """
  _, length, _, g, _ = q.shape
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  block = block_size(length, chunk_size)
  padded = _round_up(length, block)
  extra = padded - length
  # Padded slots are pads: segment 0 both as keys and as queries.
  q_segments = jnp.pad(seen.astype(jnp.int32), ((0, 0), (0, extra)))
  kv_segments = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, extra)))
  qh = jnp.pad((q * scale).astype(q.dtype).transpose(0, 2, 3, 1, 4),
               ((0, 0),) * 3 + ((0, extra), (0, 0)))
  kh, vh = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, extra),
                                               (0, 0))) for x in (k, v))
  kernel = _kernel(padded, g, sliding_window, block, bool(interpret))
  out = _sharded(functools.partial(_run_kernel, kernel), qh, kh, vh,
                 q_segments, kv_segments)
  # [B, Hkv, G, L', d] -> [B, L, Hkv, G, d]
  return out[:, :, :, :length].transpose(0, 3, 1, 2, 4).astype(q.dtype)
