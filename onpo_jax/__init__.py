"""onpo_jax: Optimistic Nash Policy Optimization (arXiv 2502.16852) in JAX.

The flat namespace follows the story of one self-play round:
oracle → sampler → pairs → losses → onpo_step → rounds → evaluation.
Subpackages: `onpo_jax.tabular` (exact games and dynamics), `onpo_jax.models`
(Flax NNX decoders, sharding, Hugging Face import/export), `onpo_jax.data`
(prompt collections). The tabular single-step functions stay in
`onpo_jax.tabular` (e.g. `onpo_jax.tabular.onpo_step`), so that the top-level
`onpo_step` is the optax transform.
"""

from onpo_jax import data
from onpo_jax import models
from onpo_jax import tabular
# Oracles: the general preference P(a ≻ b | x) and Bernoulli comparisons.
from onpo_jax.oracle import BTRewardOracle
from onpo_jax.oracle import compare
from onpo_jax.oracle import make_synthetic_oracle
from onpo_jax.oracle import Oracle
from onpo_jax.oracle import preference_matrix
from onpo_jax.oracle import SyntheticOracle
from onpo_jax.judge import load_pairwise_judge
from onpo_jax.judge import load_reward_model
from onpo_jax.judge import PairwiseJudgeOracle
from onpo_jax.judge import RewardModel
from onpo_jax.judge import RewardModelOracle
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
# Rounds, checkpoints and evaluation.
from onpo_jax.checkpoint import Checkpointer
from onpo_jax.rounds import Engine
from onpo_jax.rounds import METHODS
from onpo_jax.evaluation import exact_metrics
from onpo_jax.evaluation import policy_table
from onpo_jax.evaluation import win_rate_matrix
from onpo_jax.metrics import format_table
from onpo_jax.metrics import MetricWriter

__version__ = "0.1.0"
