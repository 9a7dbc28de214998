"""Dispatch from a config's `experiment` field to the library function that runs it."""

import importlib
from typing import Any, Callable

import ml_collections

# experiment name -> "module:function"; imported lazily so that a tabular run
# does not pay for importing the model stack.
EXPERIMENTS = {
    "tabular": "onpo_jax.tabular.experiment:run",
    "selfplay": "onpo_jax.testbed.job:run",
    "llm": "onpo_jax.llm.job:run",
}


def get_experiment(name: str) -> Callable[[ml_collections.ConfigDict, str], Any]:
  """Returns the `run(config, workdir)` function registered under `name`."""
  if name not in EXPERIMENTS:
    raise ValueError(
        f"config.experiment={name!r} is unknown; expected one of {sorted(EXPERIMENTS)}")
  module, fn = EXPERIMENTS[name].split(":")
  return getattr(importlib.import_module(module), fn)


def distributed_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments for `jax.distributed.initialize` from `config.distributed`."""
  keys = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
  return {k: cfg[k] for k in keys if cfg.get(k, None) is not None}


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs the experiment named by `config.experiment`, writing into `workdir`."""
  if "experiment" not in config:
    raise ValueError("config has no `experiment` field; expected e.g. 'tabular'")
  return get_experiment(config.experiment)(config, workdir)
