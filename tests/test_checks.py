"""onpo_jax.infra.checks: the integer and finite-real checks that input validation shares."""

import fractions

import numpy as np
import pytest

from onpo_jax.infra import checks


@pytest.mark.parametrize("value", [0, 7, -3, 2**70, np.int32(5), np.int64(-1), np.uint8(3)])
def test_integers_are_ints(value):
  assert checks.is_int(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, np.float32(2.0), "3", None,
                                   [1], np.array(1), fractions.Fraction(1, 1)])
def test_bools_floats_and_containers_are_not_ints(value):
  assert not checks.is_int(value)


def test_int_bounds_are_inclusive():
  assert checks.is_int(1, 1) and checks.is_int(5, 1, 5) and checks.is_int(-2, None, -2)
  assert not checks.is_int(0, 1)
  assert not checks.is_int(6, 1, 5)
  assert not checks.is_int(np.int64(2**31), 0, 2**31 - 1)
  assert not checks.is_int(True, 0, 1)  # a bool stays refused inside the bounds


@pytest.mark.parametrize("value", [0, -2, 0.5, 1e308, np.float32(0.25), np.float64(-3.0),
                                   np.int16(4), fractions.Fraction(1, 3)])
def test_finite_numbers_are_real(value):
  assert checks.is_real(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                                   np.float64("inf"), 10**400, True, np.bool_(False), "1.0",
                                   None, 1j, [0.5]])
def test_nonfinite_bool_and_other_values_are_not_real(value):
  assert not checks.is_real(value)
