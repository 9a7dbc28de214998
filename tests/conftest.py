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
