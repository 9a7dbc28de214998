"""The hypothesis settings every fuzz test uses (tests/test_fuzz_*.py).

Derandomized so CI runs the same cases every time, with no example database
and no deadline (a case may compile); each test picks its number of cases.
"""

from hypothesis import HealthCheck
from hypothesis import settings

settings.register_profile(
    "onpo_fuzz", derandomize=True, deadline=None, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.large_base_example])


def fuzz(max_examples: int) -> settings:
  """The shared profile with this test's number of cases."""
  return settings(settings.get_profile("onpo_fuzz"), max_examples=max_examples)
