"""onpo_jax: Optimistic Nash Policy Optimization (arXiv 2502.16852) in JAX.

The flat namespace follows the story of one self-play round:
oracles → sampler → pairs → losses → onpo_step → selfplay engine → evaluation.
The core math sits at the top of the package (`logprobs`, `losses`, `pairs`,
`onpo_step`, `sampler`); folders by role: `oracles/` (synthetic, pairwise judge,
reward model), `selfplay/` (method table, engine, loop), one folder per job
(`tabular/`, `testbed/`, `llm/`), `models/` (Flax NNX decoders, sharding, HF
import/export), `data/` (prompt collections), `infra/` (checkpoints, metrics,
plots) and `testing/` (tiny local checkpoints). The tabular single-step
functions stay in `onpo_jax.tabular` (e.g. `onpo_jax.tabular.onpo_step`), so
that the top-level `onpo_step` is the optax transform.

`import onpo_jax` imports neither tensorflow_datasets nor transformers: the
model-based oracles (`onpo_jax.oracles.judge`, `.reward_model`), `onpo_jax.data`
and the jobs are imported from their modules.
"""

from onpo_jax import tabular
# Oracles: the general preference P(a ≻ b | x) and Bernoulli comparisons.
from onpo_jax.oracles import BTRewardOracle
from onpo_jax.oracles import compare
from onpo_jax.oracles import make_synthetic_oracle
from onpo_jax.oracles import Oracle
from onpo_jax.oracles import preference_matrix
from onpo_jax.oracles import SyntheticOracle
# Sampler.
from onpo_jax.sampler import MixtureSampler
from onpo_jax.sampler import SampleOutput
from onpo_jax.sampler import Sampler
from onpo_jax.sampler import SamplingConfig
# Pairs.
from onpo_jax.pairs import all_pairs
from onpo_jax.pairs import build_pairs
from onpo_jax.pairs import lambda_p
from onpo_jax.pairs import Pairs
from onpo_jax.pairs import tournament
# Log-probs and losses.
from onpo_jax.logprobs import masked_entropy
from onpo_jax.logprobs import reduce_logprobs
from onpo_jax.logprobs import sequence_logprobs
from onpo_jax.logprobs import token_logprobs_from_logits
from onpo_jax.losses import dpo_loss
from onpo_jax.losses import inpo_loss
from onpo_jax.losses import ipo_loss
from onpo_jax.losses import nash_md_loss
from onpo_jax.losses import omd_loss
from onpo_jax.losses import online_ipo_loss
from onpo_jax.losses import onpo_loss
from onpo_jax.losses import sppo_loss
from onpo_jax.losses import sppo_win_rates
# The optimistic state, as an optax transform.
from onpo_jax.onpo_step import onpo_anchor_params
from onpo_jax.onpo_step import onpo_begin_phase
from onpo_jax.onpo_step import onpo_end_phase
from onpo_jax.onpo_step import onpo_step
from onpo_jax.onpo_step import OnpoEvent
from onpo_jax.onpo_step import OnpoStepState
# Self-play engine, checkpoints and metrics.
from onpo_jax.infra.checkpoint import Checkpointer
from onpo_jax.infra.metrics import format_table
from onpo_jax.infra.metrics import MetricWriter
from onpo_jax.selfplay.engine import Engine
from onpo_jax.selfplay.engine import METHODS

__version__ = "0.1.0"
