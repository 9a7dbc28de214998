"""Float tolerances tied to the magnitude of what they compare.

Two float32 computations of the same math (ours under XLA against transformers
under PyTorch, or two XLA programs that sum in a different order: sharded vs
single device, KV cache vs full forward) differ by rounding only, and float32
rounding is relative: each operation is exact up to a factor (1 ± u), u = eps/2,
eps = 2**-23 ≈ 1.19e-7, so an accumulation of n terms is off by at most about
n·u times the size of what it sums (Higham's γ_n). The error of a result is
therefore proportional to its magnitude, and an absolute bound such as 1e-4 on
logits of size 100 is a 1e-6 relative bound, i.e. about 8 ulps: below what the
kernels XLA and PyTorch pick for a given CPU can promise.

`assert_close_rel` bounds max |ours - ref| by rtol · max |ref|: the scale is the
largest reference entry of the compared block, not each element's own size,
because an entry near zero (a logit that happens to cancel) still carries the
rounding of the large partial sums it came from. Each caller picks rtol as
eps × (the float32 accumulation depth of its computation), with the reasoning
stated where it is used.

These bounds stay tight enough to catch wrong code: a mis-mapped tensor (q and
k swapped, a matrix transposed, a missing RoPE permutation) or a wrong formula
changes the outputs by 1e-2 to 1 relative, orders of magnitude above them.
"""

import numpy as np

# float32 machine epsilon (spacing of floats at 1.0), 2**-23.
F32_EPS = float(np.finfo(np.float32).eps)

# Whole-decoder float32 forward passes (tiny test models: hidden ≤ 32,
# intermediate ≤ 48, head_dim 8, ≤ 16 positions, 2 layers). Along the path to a
# logit, the accumulations of one layer are: two RMSNorm mean squares (hidden
# each), the q/k/v projections (hidden), the attention scores (head_dim), the
# softmax denominator and the weighted values (positions each), the output
# projection (heads × head_dim = hidden), the gate/up (hidden) and down
# (intermediate) projections: 2·32 + 32 + 8 + 2·16 + 32 + 32 + 48 = 248 terms;
# ×2 layers, plus the final norm and the unembedding (2·32), n ≈ 560. The
# difference of two float32 implementations is at most twice n·u = n·eps
# relative: 560 · 1.19e-7 ≈ 6.7e-5. Softmax and RMSNorm are well conditioned
# relative to the scale used here (max |logit|), so no further factor is needed;
# observed errors are 1e-7 to 1e-6 of max |logit| (see tests), mis-mapped
# tensors 1e-1 and more.
DECODER_DEPTH = 560
DECODER_RTOL = DECODER_DEPTH * F32_EPS

# Gradients of a tiny decoder's loss: the backward pass runs the forward's
# accumulations again, transposed (560), plus the log-sum-exp over the
# vocabulary (≤ 128) and the sum over batch × positions into each weight
# gradient (≤ 32): n ≈ 560 + 560 + 128 + 32 = 1280, i.e. 1.5e-4 relative to the
# largest entry of each gradient leaf. Observed: ≤ 2e-7.
DECODER_GRAD_DEPTH = 2 * DECODER_DEPTH + 128 + 32
DECODER_GRAD_RTOL = DECODER_GRAD_DEPTH * F32_EPS

# Log-probs of a tiny decoder (token_logprobs, the sampler's cached decode):
# the forward (560) and a log-sum-exp over ≤ 128 vocabulary entries. They are
# differences z - lse(z) whose rounding is proportional to |z| and |lse|, not to
# the log-prob itself, so they are scaled by `logprob_scale`.
LOGPROB_DEPTH = DECODER_DEPTH + 128
LOGPROB_RTOL = LOGPROB_DEPTH * F32_EPS


def logprob_scale(logits, logprobs):
  """max |logit| + max |log-prob|, which bounds |z| + |lse(z)| (lse = z - lp)."""
  return float(np.abs(np.asarray(logits, np.float64)).max()
               + np.abs(np.asarray(logprobs, np.float64)).max())


# bfloat16 machine epsilon, 2**-7 (8 significant bits).
BF16_EPS = 2.0 ** -7


def max_rel_error(ours, ref, mask=None, scale=None):
  """(max |ours - ref| / scale, scale), with scale = max |ref| by default."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  if mask is not None:
    ours, ref = ours[np.asarray(mask)], ref[np.asarray(mask)]
  assert ours.size, "nothing to compare"
  assert np.isfinite(ours).all() and np.isfinite(ref).all()
  scale = float(np.abs(ref).max()) if scale is None else float(scale)
  diff = float(np.abs(ours - ref).max())
  if scale == 0:  # an all-zero reference: only an exact match is close
    return (0.0 if diff == 0 else float("inf")), scale
  return diff / scale, scale


def assert_tree_close_rel(ours, ref, *, rtol, what=""):
  """assert_close_rel on each pair of leaves (e.g. gradients), each leaf scaled
  by its own max |ref|, since each is computed by its own accumulations."""
  import jax  # here, so that importing this module never initialises JAX
  paths = jax.tree_util.tree_leaves_with_path(ref)
  leaves = jax.tree.leaves(ours)
  assert len(paths) == len(leaves), (len(paths), len(leaves))
  return max(assert_close_rel(a, b, rtol=rtol,
                              what=f"{what}{jax.tree_util.keystr(p)}")
             for a, (p, b) in zip(leaves, paths))


def assert_close_rel(ours, ref, *, rtol, mask=None, scale=None, what=""):
  """Asserts max |ours - ref| <= rtol · scale (scale: max |ref| by default).

  Args:
    ours, ref: arrays of one shape (compared in float64).
    rtol: the bound relative to `scale`; state why at the call site.
    mask: optional boolean mask of the entries to compare (e.g. real tokens).
    scale: the magnitude the rounding error is proportional to, when it is not
      the reference itself (e.g. max |logit| for log-probs or probabilities
      computed from those logits).
    what: a label for the failure message.

  Returns:
    The measured ratio max |ours - ref| / scale (printed too; run pytest with
    -s to see it).
  """
  ratio, scale = max_rel_error(ours, ref, mask, scale)
  print(f"[tolerance] {what}: max|diff|/scale = {ratio:.3g} "
        f"(scale {scale:.3g}, bound {rtol:.3g})")
  assert ratio <= rtol, (
      f"{what}: max|ours - ref| = {ratio * scale:.3g} is {ratio:.3g} × the "
      f"scale {scale:.3g}, above the relative bound {rtol:.3g}")
  return ratio

# A real 30-layer model (SmolLM2-135M: hidden 576, intermediate 1536, 9 heads of
# 64) in float32. Its logits amplify one-ulp changes far beyond the tiny models:
# measured on batches of three left-padded chat prompts (max |logit| 39 to 40),
# the same weights give max |Δlogit| of
#   1.6e-4 (4.1e-6 relative): our decoder run eagerly vs under jit (XLA fuses
#          and orders the sums differently),
#   9.4e-5 (2.3e-6 relative): transformers vs itself with 11 of its 32 RoPE
#          inverse frequencies moved by one ulp (float32 vs float64-then-rounded
#          arithmetic, both correct to rounding),
#   1.2e-4 to 1.6e-4 (3.1e-6 to 4.0e-6 relative): ours vs transformers.
# In float64 (ours, and transformers' model .double()) 1.9e-5 remains: transformers
# keeps its RoPE angles, RMSNorm statistics and attention softmax in float32
# whatever the model dtype, so it is no float64 reference.
# So an absolute 1e-4 lies below the model's own float32 noise and would fail
# between two correct implementations (ours vs itself included). The bound is
# 1e-5 of max |logit|, 2.5× the largest noise measured; a mis-mapped tensor moves
# logits by 1e-2 relative and more (measured: leaving only layer 0's q/k rows in
# llama.cpp's order moves them by 8.5, 0.22 relative).
REAL_MODEL_LOGIT_RTOL = 1e-5
