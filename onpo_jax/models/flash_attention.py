"""Chunked attention: online softmax over key blocks, never the score matrix.

The online softmax of Milakov & Gimelshein ("Online normalizer calculation
for softmax", arXiv 1805.02867) over key blocks, in the tiled form of
FlashAttention (Dao et al., arXiv 2205.14135, Alg. 1), with the backward pass
of FlashAttention-2 (Dao, arXiv 2307.08691, Alg. 2) as a custom VJP. Only one
[Bq, Bk] block of scores per head exists at a time, in the forward and in the
backward pass, and blocks hidden by the causal mask or the window are
skipped. Pure JAX: runs on any backend. Shapes and mask as in `attention.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from onpo_jax.models.attention_mask import (
    MASK_VALUE, AttentionMask, accum_dtype, attention_weights_mask,
    check_shapes, fill_unseen, has_visible_key)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_axis(x, axis: int, size: int, value=0):
  """x padded with `value` along `axis` up to `size` entries."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _slice(x, start, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_scores(qi, kj, scale, acc_dt):
  """[B, Hkv, G, Bq, Bk] scores q·k·scale of one block pair."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=acc_dt)
  return s * scale


def _block_visible(q_slots_i, k_start, bk: int, key_mask_j, window):
  """[B, 1, 1, Bq, Bk] visibility of one block pair (broadcast over heads)."""
  k_slots = k_start + jnp.arange(bk, dtype=jnp.int32)
  return attention_weights_mask(q_slots_i, k_slots, key_mask_j,
                                window)[:, None, None]


def _key_block_range(q_slots_i, bk: int, nk: int, window):
  """[lo, hi): the key blocks that any query of this block can see.

  Keys s ≤ max q_slot (causal), and s > min q_slot - window with a window.
  """
  hi = jnp.minimum(jnp.max(q_slots_i) // bk + 1, nk)
  if window is None:
    return jnp.zeros((), jnp.int32), hi
  lo = jnp.clip((jnp.min(q_slots_i) - window + 1) // bk, 0, nk)
  return lo, jnp.maximum(hi, lo)


def _query_block_range(q_min, q_max, k_start, bk: int, window):
  """[lo, hi): the query blocks (nondecreasing slots) that see key block j.

  A query block sees the keys [k_start, k_start + bk) when its largest slot
  is ≥ k_start and, with a window w, its smallest slot - w + 1 is ≤ the
  block's last key, k_start + bk - 1.
  """
  lo = jnp.searchsorted(q_max, k_start, side="left").astype(jnp.int32)
  if window is None:
    return lo, jnp.asarray(q_max.shape[0], jnp.int32)
  hi = jnp.searchsorted(q_min, k_start + bk - 1 + window - 1,
                        side="right").astype(jnp.int32)
  return lo, jnp.maximum(hi, lo)


def _blocked_inputs(q, k, v, mask: AttentionMask, bq: int, bk: int):
  """Pads queries to nq·Bq and keys to nk·Bk entries.

  Padded queries repeat the last slot (edge padding keeps the slots sorted)
  and padded keys are invalid, so they get probability 0.
  """
  lq, s_len = q.shape[1], k.shape[1]
  nq, nk = _cdiv(lq, bq), _cdiv(s_len, bk)
  slots = jnp.pad(mask.q_slots.astype(jnp.int32), (0, nq * bq - lq),
                  mode="edge")
  return (_pad_axis(q, 1, nq * bq), _pad_axis(k, 1, nk * bk),
          _pad_axis(v, 1, nk * bk), slots,
          _pad_axis(mask.key_mask, 1, nk * bk, False), nq, nk)


def _flash_forward(q, k, v, q_slots, key_mask, window, scale, bq, bk):
  """Online-softmax forward (FlashAttention Alg. 1, queries block by block).

  For each query block, over the visible key blocks j, with running row max
  m, normaliser l and unnormalised output acc (all per query and head):

    m' = max(m, max_s s_js),  p_js = exp(s_js - m') on visible keys else 0,
    l' = e^(m - m') l + Σ_s p_js,  acc' = e^(m - m') acc + p_j v_j,

  and finally out = acc / l, lse = m + log l (the log-normaliser the backward
  pass uses to rebuild p). m starts at the finite MASK_VALUE, so e^(m - m')
  never meets -inf - (-inf). A query with no visible key keeps l = 0 and gets
  out = 0 here; `chunked_attention` replaces it.

  Returns:
    (out [B, Lq, Hkv, G, d] in q.dtype, lse [B, Hkv, G, Lq] accumulate dtype).
  """
  b, lq, hkv, g, d = q.shape
  dt, acc_dt = q.dtype, accum_dtype(q.dtype)
  qp, kp, vp, slots, kmask, nq, nk = _blocked_inputs(
      q, k, v, AttentionMask(q_slots, key_mask), bq, bk)

  def query_block(args):
    qi, qs = args
    lo, hi = _key_block_range(qs, bk, nk, window)

    def body(j, carry):
      m, l, acc = carry
      start = j * bk
      vis = _block_visible(qs, start, bk, _slice(kmask, start, bk, 1), window)
      s = _block_scores(qi, _slice(kp, start, bk, 1), scale, acc_dt)
      m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, MASK_VALUE), axis=-1))
      p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(dt),
                      _slice(vp, start, bk, 1), preferred_element_type=acc_dt)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    init = (jnp.full((b, hkv, g, bq), MASK_VALUE, acc_dt),
            jnp.zeros((b, hkv, g, bq), acc_dt),
            jnp.zeros((b, hkv, g, bq, d), acc_dt))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    return acc / l_safe[..., None], jnp.where(seen, m + jnp.log(l_safe), 0.0)

  q_blocks = qp.reshape(b, nq, bq, hkv, g, d).swapaxes(0, 1)
  out, lse = jax.lax.map(query_block, (q_blocks, slots.reshape(nq, bq)))
  # [nq, B, Hkv, G, Bq, d] -> [B, Lq, Hkv, G, d]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hkv, g, d)
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, nq * bq)
  return out[:, :lq].astype(dt), lse[..., :lq]


def _flash_backward(q, k, v, q_slots, key_mask, out, lse, dout, window, scale,
                    bq, bk):
  """FlashAttention-2 backward (Alg. 2): key blocks outside, queries inside.

  With p_js = exp(s_js - lse) rebuilt per block and D = rowsum(dout ⊙ out):

    dv_j = Σ_i p_ijᵀ dout_i,   dp_ij = dout_i v_jᵀ,
    ds_ij = p_ij ⊙ (dp_ij - D_i),
    dq_i = scale Σ_j ds_ij k_j,   dk_j = scale Σ_i ds_ijᵀ q_i.

  dk_j, dv_j accumulate over the query blocks that see key block j; dq is a
  running [B, Lq, Hkv, G, d] sum.
  """
  b, lq, hkv, g, d = q.shape
  s_len = k.shape[1]
  dt, acc_dt = q.dtype, accum_dtype(q.dtype)
  qp, kp, vp, slots, kmask, nq, nk = _blocked_inputs(
      q, k, v, AttentionMask(q_slots, key_mask), bq, bk)
  dop = _pad_axis(dout, 1, nq * bq)
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(acc_dt),
                     out.astype(acc_dt))
  lse_p = _pad_axis(lse, 3, nq * bq)
  delta_p = _pad_axis(delta, 3, nq * bq)
  slot_blocks = slots.reshape(nq, bq)
  q_min, q_max = slot_blocks.min(axis=1), slot_blocks.max(axis=1)

  def key_block(dq, j):
    start = j * bk
    kj, vj = _slice(kp, start, bk, 1), _slice(vp, start, bk, 1)
    mj = _slice(kmask, start, bk, 1)
    lo, hi = _query_block_range(q_min, q_max, start, bk, window)

    def body(i, carry):
      dq, dk, dv = carry
      qs = i * bq
      qi, doi = _slice(qp, qs, bq, 1), _slice(dop, qs, bq, 1)
      vis = _block_visible(_slice(slots, qs, bq, 0), start, bk, mj, window)
      s = _block_scores(qi, kj, scale, acc_dt)
      p = jnp.where(vis, jnp.exp(s - _slice(lse_p, qs, bq, 3)[..., None]),
                    0.0)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dt), doi,
                           preferred_element_type=acc_dt)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj,
                      preferred_element_type=acc_dt)
      ds = (p * (dp - _slice(delta_p, qs, bq, 3)[..., None])).astype(dt)
      dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj,
                        preferred_element_type=acc_dt) * scale
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, _slice(dq, qs, bq, 1) + dq_i, qs, axis=1)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi,
                           preferred_element_type=acc_dt) * scale
      return dq, dk, dv

    zeros = jnp.zeros((b, bk, hkv, d), acc_dt)
    dq, dk, dv = jax.lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq0 = jnp.zeros((b, nq * bq, hkv, g, d), acc_dt)
  dq, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(nk, dtype=jnp.int32))

  def unblock(x):  # [nk, B, Bk, Hkv, d] -> [B, S, Hkv, d]
    return x.swapaxes(0, 1).reshape(b, nk * bk, hkv, d)[:, :s_len].astype(dt)

  return dq[:, :lq].astype(dt), unblock(dk), unblock(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_slots, key_mask, window, scale, bq, bk):
  """Attention output of valid-key queries (0 for the others), custom VJP."""
  return _flash_forward(q, k, v, q_slots, key_mask, window, scale, bq, bk)[0]


def _flash_fwd(q, k, v, q_slots, key_mask, window, scale, bq, bk):
  out, lse = _flash_forward(q, k, v, q_slots, key_mask, window, scale, bq, bk)
  return out, (q, k, v, q_slots, key_mask, out, lse)


def _flash_bwd(window, scale, bq, bk, res, dout):
  q, k, v, q_slots, key_mask, out, lse = res
  dq, dk, dv = _flash_backward(q, k, v, q_slots, key_mask, out, lse, dout,
                               window, scale, bq, bk)
  # Slots and the key mask are integer / boolean: no cotangent.
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, mask: AttentionMask, *, sliding_window,
                      scale: float, chunk_size: int):
  """Softmax attention without the score matrix (online softmax over blocks).

  Same value as `dense_attention` up to rounding. Queries and keys are cut
  into blocks of `chunk_size` (fewer when the sequence is shorter); memory
  per head is O(chunk_size² + L·d) instead of O(Lq·S), in the backward pass
  too (a custom VJP recomputes each block's probabilities from the saved
  log-normaliser).

  Args:
    q: [B, Lq, Hkv, G, d] queries (compute dtype).
    k, v: [B, S, Hkv, d] keys and values (same dtype).
    mask: the AttentionMask; q_slots must be nondecreasing.
    sliding_window: None or the window w.
    scale: the score scale.
    chunk_size: queries and keys per block.

  Returns:
    [B, Lq, Hkv, G, d] in the compute dtype.
  """
  check_shapes(q, k, v, mask)
  if chunk_size <= 0:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
  lq, s_len = q.shape[1], k.shape[1]
  out = _flash(q, k, v, mask.q_slots.astype(jnp.int32),
               mask.key_mask.astype(bool), sliding_window, float(scale),
               min(chunk_size, lq), min(chunk_size, s_len))
  return fill_unseen(out, v, has_visible_key(mask, sliding_window))
