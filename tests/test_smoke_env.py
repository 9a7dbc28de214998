"""The test environment itself: fake devices and the package import."""

import jax

import onpo_jax


def test_eight_fake_cpu_devices():
  assert jax.device_count() == 8
  assert all(d.platform == "cpu" for d in jax.devices())


def test_package_imports():
  assert onpo_jax.__version__
