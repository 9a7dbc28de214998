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
    "host_malloc", "hugepages", ["hugepages", "reuse", "default"],
    "glibc malloc for XLA:CPU's per-step temporary buffers (onpo_jax/infra/host_memory.py): "
    "'hugepages' restarts the process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the "
    "temporaries fault in 2 MiB transparent huge pages, memory still returned; where glibc or "
    "the kernel lacks them it runs on glibc's defaults); 'reuse' keeps "
    "freed memory for the next step (no page faults, but resident memory stays at its "
    "high-water mark and above); 'default': glibc's own settings.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from onpo_jax.infra import host_memory

  # Before JAX starts its threads: each keeps the malloc arena it first used.
  malloc = host_memory.configure(_HOST_MALLOC.value)
  import jax  # Imported late so that absl flags are parsed first.

  from onpo_jax import main as onpo_main

  config = _CONFIG.value
  if config.get("distributed", None) and config.distributed.get("enabled", False):
    # JAX's own multi-host runtime; arguments left unset are auto-detected on
    # TPU pods and SLURM/Open MPI GPU clusters.
    jax.distributed.initialize(**onpo_main.distributed_kwargs(config.distributed))
  logging.info("JAX %s, process %d/%d, local devices %s, host malloc %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices(), malloc)
  onpo_main.run(config, _WORKDIR.value)


def _start(argv):
  """The command line's entry: `main`, after the restart "hugepages" needs."""
  from onpo_jax.infra import host_memory
  host_memory.start(_HOST_MALLOC.value)
  main(argv)


if __name__ == "__main__":
  app.run(_start)
