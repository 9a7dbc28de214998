"""Type checks that input validation shares: integers and finite reals, never bools.

`True` passes `isinstance(value, int)`, but a bool given as a count, a length or
a rate is a slip, not 1: every check here refuses it, so a config field or an
argument that expects a number names the field instead of running with 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any, minimum: int | None = None, maximum: int | None = None) -> bool:
  """Whether `value` is an integer (Python or numpy) in [minimum, maximum], not a bool.

  Args:
    value: anything.
    minimum: the smallest value allowed (None: no lower bound).
    maximum: the largest value allowed (None: no upper bound).
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    return False
  return ((minimum is None or value >= minimum)
          and (maximum is None or value <= maximum))


def is_real(value: Any) -> bool:
  """Whether `value` is a finite int or float (Python or numpy), not a bool.

  NaN fails no `<` check and ±inf turns every later product into NaN, so
  neither may reach a range check.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond the float range
    return False
