r"""Single entry point for every onpo_jax experiment.

    python -m experiments.run --config=configs/tabular.py --workdir=runs/tabular
    python -m experiments.run --config=configs/default.py --workdir=runs/default

The config's `experiment` field picks the library function that does the work
(`onpo_jax.main.EXPERIMENTS`); all logic lives in `onpo_jax`, so Colab and tests
call the same code.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (with an optional `:arg`).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, plots and checkpoints.")
_HOST_MALLOC = flags.DEFINE_enum(
    "host_malloc", "default", ["reuse", "default"],
    "glibc malloc: 'reuse' keeps freed memory for the next step (one arena, no per-block "
    "mappings, no trimming): faster XLA:CPU steps, no page faults on their temporary "
    "buffers, but resident memory stays at its high-water mark and above "
    "(onpo_jax/infra/host_memory.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from onpo_jax.infra import host_memory

  # Before JAX starts its threads: each keeps the malloc arena it first used.
  reuse = host_memory.configure(_HOST_MALLOC.value)
  import jax  # Imported late so that absl flags are parsed first.

  from onpo_jax import main as onpo_main

  config = _CONFIG.value
  if config.get("distributed", None) and config.distributed.get("enabled", False):
    # JAX's own multi-host runtime; arguments left unset are auto-detected on
    # TPU pods and SLURM/Open MPI GPU clusters.
    jax.distributed.initialize(**onpo_main.distributed_kwargs(config.distributed))
  logging.info("JAX %s, process %d/%d, local devices %s, host malloc %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices(),
               "reuses freed memory" if reuse else "glibc's defaults")
  onpo_main.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
