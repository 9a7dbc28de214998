"""The inner optimizer of every regression of the `llm` job.

AdamW with the paper's linear-warm-up cosine schedule, global-norm clipping and
`optax.MultiSteps` gradient accumulation (ONPO arXiv 2502.16852 §5: global batch
128 pairs, cosine schedule, warm-up ratio 0.03). One regression is one
fine-tuning run: the schedule restarts with each regression because
`onpo_step` (and the baselines' per-round `init`) reset the inner state. The
optimizer's constants and the per-regression restart are not stated in the
paper; they are our defaults (docs/algorithm.md §5.2).

Sizes, all from the `selfplay` config section:
  * examples per prompt: the pairs a pairing yields from K samples, or K for
    the per-sample methods (SPPO, Nash-MD);
  * micro-steps per update: `global_batch_size / minibatch_size`;
  * updates per regression: `epochs · prompts_per_round · examples per prompt /
    global_batch_size`, which sets the length of the schedule.
"""

from __future__ import annotations

import math

import optax

from onpo_jax import pairs as pairs_lib
from onpo_jax.selfplay import methods as methods_lib


def warmup_cosine(*, peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 at `total_steps` (transformers' cosine).

  lr(s) = peak · s / w for s < w, else peak · ½(1 + cos(π (s − w)/(T − w))),
  held at 0 past T; w = warmup_steps, T = total_steps. This is
  `optax.warmup_cosine_decay_schedule` with init and end values 0 and
  decay_steps = T (optax counts the warm-up inside decay_steps); w = 0 starts
  at the peak.

  Args:
    peak: peak learning rate (> 0).
    warmup_steps: w, 0 <= w < T.
    total_steps: T >= 1, the optimizer updates of one regression.

  Returns:
    An optax schedule: update count (from 0, traced or not) -> learning rate.

  Raises:
    ValueError: on a non-positive peak, T < 1 or w outside [0, T).
  """
  # optax would reject w = T only inside cosine_decay_schedule, naming decay_steps;
  # checking here names the run's own quantities.
  if not peak > 0 or total_steps < 1 or not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_cosine: need peak > 0, total_steps >= 1 and 0 <= warmup_steps < "
                     f"total_steps; got {peak}, {total_steps}, {warmup_steps}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=0.0)


def accumulation_steps(global_batch_size: int, minibatch_size: int) -> int:
  """Micro-batches per optimizer update; the global batch must be a multiple.

  Args:
    global_batch_size: training examples per optimizer update.
    minibatch_size: training examples per micro-step (one forward/backward).

  Returns:
    global_batch_size // minibatch_size.

  Raises:
    ValueError: the global batch is not a positive multiple of the micro-batch.
  """
  if minibatch_size < 1 or global_batch_size < minibatch_size or global_batch_size % minibatch_size:
    raise ValueError(f"selfplay.global_batch_size={global_batch_size} must be a positive multiple "
                     f"of selfplay.minibatch_size={minibatch_size}")
  return global_batch_size // minibatch_size


def examples_per_prompt(config, name: str) -> int:
  """Training examples one prompt yields for method `name` (pairs or samples).

  Args:
    config: the llm config.
    name: a `selfplay.methods.METHODS` key.
  """
  spec = methods_lib.METHODS[name]
  k = int(config.selfplay.num_samples)
  if spec.data != "pairs":
    return k
  return pairs_lib.num_pairs_per_prompt(methods_lib.pairing(name, config.selfplay.pairing), k)


def updates_per_regression(config, name: str) -> int:
  """Optimizer updates of one regression: epochs · examples / global batch.

  Args:
    config: the llm config.
    name: a `selfplay.methods.METHODS` key.

  Raises:
    ValueError: a round's examples do not fill a whole number of global batches.
  """
  sp = config.selfplay
  n = int(sp.prompts_per_round) * examples_per_prompt(config, name)
  if n % int(sp.global_batch_size):
    raise ValueError(f"selfplay.prompts_per_round={sp.prompts_per_round} gives {n} training "
                     f"examples for {name!r}, not a multiple of selfplay.global_batch_size="
                     f"{sp.global_batch_size}; every update must see a full global batch")
  return int(sp.epochs) * n // int(sp.global_batch_size)


def make_inner_optimizer(config, num_updates: int) -> optax.GradientTransformation:
  """AdamW + warm-up cosine + clipping, wrapped in MultiSteps for accumulation.

  Args:
    config: the llm config (`selfplay` section).
    num_updates: optimizer updates of one regression (`updates_per_regression`).

  Returns:
    The inner optimizer; one `update` per micro-batch of
    `selfplay.minibatch_size` examples, parameters move every
    `global_batch_size / minibatch_size` micro-batches.
  """
  sp = config.selfplay
  # ceil as transformers' get_cosine_schedule_with_warmup(ceil(ratio · T)); at
  # least one cosine step so that a 1-update regression still trains.
  warmup = int(math.ceil(float(sp.warmup_ratio) * num_updates))
  warmup = min(warmup, num_updates - 1)
  if sp.lr_schedule == "cosine":
    lr = warmup_cosine(peak=float(sp.learning_rate), warmup_steps=warmup, total_steps=num_updates)
  else:
    lr = float(sp.learning_rate)
  parts = []
  if sp.max_grad_norm:
    parts.append(optax.clip_by_global_norm(float(sp.max_grad_norm)))
  parts.append(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(sp.weight_decay)))
  inner = optax.chain(*parts)
  accum = accumulation_steps(int(sp.global_batch_size), int(sp.minibatch_size))
  if accum > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accum).gradient_transformation()
  return inner
