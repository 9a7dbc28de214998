"""layers.dense against numpy: float32/float64 as the plain einsum, and below
float32 each product, forward and backward, summed in float32 and rounded once.

Tolerances: float32 and float64 as in test_decoder.py (1e-5 and 1e-12 on O(1)
values); bfloat16 results are compared with the exact float64 sum rounded to
bfloat16 once (`_assert_rounded_once`).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax.models import layers
import tolerances
from test_decoder import F32_TOL, F64_TOL, _maybe_jit, _x64


_DENSE_SPEC = "bld,dhk->blhk"  # a q/k/v projection: kernel [D, heads, head_dim]


def _dense_operands(rng, depth=256):
  return rng.randn(2, 3, depth), rng.randn(depth, 4, 8) / np.sqrt(depth)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_dense(dtype, use_jit):
  x, w = (a.astype(dtype) for a in _dense_operands(np.random.RandomState(4)))
  with _x64(dtype):
    got = _maybe_jit(lambda x, w: layers.dense(_DENSE_SPEC, x, w), use_jit)(
        jnp.asarray(x), jnp.asarray(w))
  assert got.dtype == dtype
  want = np.einsum(_DENSE_SPEC, x.astype(np.float64), w.astype(np.float64))
  tol = F32_TOL if dtype == np.float32 else F64_TOL
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("...d,df->...f", (5, 7), (7, 3)),             # one token axis: nothing merged
    ("...d,df->...f", (2, 3, 4, 7), (7, 3)),       # three merged
    ("blhk,hkd->bld", (2, 3, 4, 5), (4, 5, 6)),    # the attention output: two contracted
    ("bld,dhk->lbhk", (2, 3, 7), (7, 4, 5)),       # output not in x's order: not merged
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_dense_and_its_gradients_with_merged_token_axes(spec, x_shape, w_shape, dtype,
                                                        use_jit):
  rng = np.random.RandomState(11)
  x, w = rng.randn(*x_shape).astype(dtype), rng.randn(*w_shape).astype(dtype)
  ct = np.einsum(spec, x, w)
  ct = rng.randn(*ct.shape).astype(dtype)
  x64, w64, ct64 = (a.astype(np.float64) for a in (x, w, ct))
  ins, out = spec.split("->")
  a, b = ins.split(",")
  if "..." in a:
    a, out = a.replace("...", "ABC"[:x.ndim - 1]), out.replace("...", "ABC"[:x.ndim - 1])
  want = (np.einsum(f"{out},{b}->{a}", ct64, w64), np.einsum(f"{a},{out}->{b}", x64, ct64))
  loss = lambda x, w: jnp.sum(layers.dense(spec, x, w) * ct)
  with _x64(dtype):
    got = _maybe_jit(lambda x, w: layers.dense(spec, x, w), use_jit)(x, w)
    grads = _maybe_jit(jax.grad(loss, argnums=(0, 1)), use_jit)(x, w)
  tol = F32_TOL if dtype == np.float32 else F64_TOL
  assert got.dtype == dtype and got.shape == ct.shape
  np.testing.assert_allclose(np.asarray(got), np.einsum(spec, x64, w64), rtol=tol, atol=tol)
  for g, wanted in zip(grads, want):
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g), wanted, rtol=tol, atol=tol)


def test_dense_float32_kernel_gradient_contracts_one_token_axis():
  # The [B, L] axes are merged, so the kernel's gradient contracts one axis:
  # XLA:CPU would transpose both operands of a product that contracts B and L
  # (a copy of each activation per step).
  x, w = (jnp.asarray(a, jnp.float32) for a in _dense_operands(np.random.RandomState(12)))
  for spec, kernel in ((_DENSE_SPEC, w), ("...d,df->...f", w.reshape(w.shape[0], -1))):
    loss = lambda x, w: jnp.sum(layers.dense(spec, x, w))
    dots = [e for e in jax.make_jaxpr(jax.grad(loss, argnums=1))(x, kernel).eqns
            if e.primitive.name == "dot_general"]
    assert len(dots) == 2, dots  # the forward product and the kernel's gradient
    (contracted, _), _ = dots[1].params["dimension_numbers"]
    # (jax may produce the kernel's gradient with its axes permuted.)
    assert sorted(dots[1].outvars[0].aval.shape) == sorted(kernel.shape), dots[1]
    assert len(contracted) == 1, dots[1]


def _assert_rounded_once(got, exact):
  """got (bfloat16) is the float64 `exact` rounded to bfloat16 once.

  A float32 sum of at most a few hundred bfloat16 products is within
  256 · 2^-24 (relative) of the exact sum, so it rounds to the same bfloat16
  except near a rounding boundary: one ulp (2^-7 relative at most) on a few
  entries. Rounding partial sums to bfloat16 would be off by several ulps.
  """
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  want = np.asarray(jnp.asarray(exact, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=tolerances.BF16_EPS, atol=0)
  assert np.mean(got != want) <= 0.02, np.mean(got != want)


@pytest.mark.parametrize("use_jit", [False, True])
def test_dense_bfloat16_rounds_each_float32_product_once(use_jit):
  rng = np.random.RandomState(5)
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _dense_operands(rng))
  ct = jnp.asarray(rng.randn(2, 3, 4, 8), jnp.bfloat16)
  x64, w64, ct64 = (np.asarray(a, np.float64) for a in (x, w, ct))
  dense = lambda x, w: layers.dense(_DENSE_SPEC, x, w)
  _assert_rounded_once(_maybe_jit(dense, use_jit)(x, w), np.einsum(_DENSE_SPEC, x64, w64))
  # Reverse mode: dx = ct · wᵀ and dw = xᵀ · ct, each summed in float32 and
  # rounded once, with respect to both operands and to one (the other frozen).
  want = (np.einsum("blhk,dhk->bld", ct64, w64), np.einsum("bld,blhk->dhk", x64, ct64))
  loss = lambda x, w: jnp.sum((dense(x, w) * ct).astype(jnp.float32))
  for argnums in ((0, 1), (0,), (1,)):
    grads = _maybe_jit(jax.grad(loss, argnums=argnums), use_jit)(x, w)
    for got, i in zip(grads, argnums):
      _assert_rounded_once(got, want[i])


@pytest.mark.parametrize("use_jit", [False, True])
def test_dense_bfloat16_with_float32_output(use_jit):
  # The logits' form: a float32 result, whose float32 cotangent is rounded to
  # bfloat16 before the backward products (each then rounded once).
  rng = np.random.RandomState(10)
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _dense_operands(rng))
  ct = jnp.asarray(rng.randn(2, 3, 4, 8), jnp.float32)
  x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
  ct64 = np.asarray(ct.astype(jnp.bfloat16), np.float64)
  dense = lambda x, w: layers.dense(_DENSE_SPEC, x, w, out_dtype=jnp.float32)
  got = _maybe_jit(dense, use_jit)(x, w)
  assert got.dtype == jnp.float32
  # A float32 sum of 256 products of 8-bit significands: within 256 · 2^-24
  # of the exact sum relative to the sum of |products|.
  exact = np.einsum(_DENSE_SPEC, x64, w64)
  bound = 256 * 2.0 ** -24 * np.einsum(_DENSE_SPEC, np.abs(x64), np.abs(w64))
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= bound)
  dx, dw = _maybe_jit(jax.grad(lambda x, w: jnp.sum(dense(x, w) * ct), argnums=(0, 1)),
                      use_jit)(x, w)
  _assert_rounded_once(dx, np.einsum("blhk,dhk->bld", ct64, w64))
  _assert_rounded_once(dw, np.einsum("bld,blhk->dhk", x64, ct64))


def test_dense_bfloat16_backward_multiplies_bfloat16_operands_into_float32():
  # The backward's products must be bfloat16 x bfloat16 -> float32 dots (the
  # fast GEMM); a frozen operand's cotangent is not computed at all.
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _dense_operands(np.random.RandomState(8)))
  for out_dtype, argnums in itertools.product((None, jnp.float32), ((0, 1), (0,), (1,))):
    loss = lambda x, w: jnp.sum(
        layers.dense(_DENSE_SPEC, x, w, out_dtype=out_dtype).astype(jnp.float32))
    dots = [e for e in jax.make_jaxpr(jax.grad(loss, argnums=argnums))(x, w).eqns
            if e.primitive.name == "dot_general"]
    assert len(dots) == 1 + len(argnums), (out_dtype, argnums, dots)
    for e in dots:
      assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
      assert e.params["preferred_element_type"] == jnp.float32, e


def test_dense_forward_mode():
  # float32 is the plain einsum, forward mode included; below float32 the
  # custom VJP has no forward mode, and JAX says so.
  x, w = (jnp.asarray(a, jnp.float32) for a in _dense_operands(np.random.RandomState(9)))
  _, t = jax.jvp(lambda x: layers.dense(_DENSE_SPEC, x, w), (x,), (x,))
  np.testing.assert_array_equal(np.asarray(t), np.asarray(jnp.einsum(_DENSE_SPEC, x, w)))
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda x: layers.dense(_DENSE_SPEC, x, wb), (xb,), (xb,))


@pytest.mark.parametrize("spec", [
    "bld,dhk",            # no output
    "bld,dhk,k->blh",     # three operands
    "bld,dk->bk",         # l summed within x
    "bld,dhk->blhkk",     # k repeated in the output
    "bld,dhk->blhkq",     # q in the output only
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dense_rejects_specs_it_cannot_transpose(spec, dtype):
  x = jnp.zeros((1, 1, 1), dtype)
  w = jnp.zeros((1,) * len(spec.split(",")[1].split("-")[0]), dtype)
  with pytest.raises(ValueError, match="dense spec"):
    layers.dense(spec, x, w)
