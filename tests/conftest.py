"""Test configuration: 8 fake CPU devices, set before JAX initialises.

Multi-device code (meshes, shardings, collectives) is tested on a fake 8-device
CPU mesh. The flag must be in the environment before the first
`import jax` anywhere in the process, so it is set at conftest import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network: transformers / datasets must read local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    "tests need 8 fake CPU devices; XLA_FLAGS was set too late: "
    f"{jax.devices()}")

# pytest-xdist (`--dist loadfile`; pytest.ini turns off its reordering by test
# count) hands whole files to the workers in collection order. Starting with
# the slowest files and letting the quick ones fill in at the end
# (longest-processing-time-first scheduling) keeps one worker from running a
# 5-minute file alone while the other sits idle. Listed slowest first
# (per-file seconds of one 2-worker run); the rest keep their order.
_SLOW_FILES = (
    "test_train.py", "test_smollm2.py", "test_attention.py", "test_tracking.py",
    "test_selfplay.py", "test_lora_job.py", "test_lora_testbed.py",
    "test_notebooks.py", "test_gguf.py", "test_lora.py", "test_llm.py",
    "test_splash_attention.py",
    "test_resume.py", "test_multihost.py", "test_exact_mode.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FILES)}
  # A stable sort: the tests of one file keep their order.
  items.sort(key=lambda item: rank.get(item.path.name, len(_SLOW_FILES)))
