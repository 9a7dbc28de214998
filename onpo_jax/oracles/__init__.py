"""Preference oracles: who says which of two responses is better.

`base` holds the interface every oracle implements (`Oracle`: P(a ≻ b | x) with
P(a ≻ b) + P(b ≻ a) = 1 exactly), Bernoulli comparisons and full preference
matrices; `synthetic` the testbed's random-feature general oracle and its
Bradley–Terry part; `judge` the pairwise LM judge ("pair-pm", the paper's
oracle) and `reward_model` a BT reward model, both on `onpo_jax.models`.
This package imports the core math and `models`; nothing in it imports a job.
The two model-based oracles are imported from their modules, so that the
synthetic ones stay light.
"""

from onpo_jax.oracles.base import canonical_order
from onpo_jax.oracles.base import compare
from onpo_jax.oracles.base import Oracle
from onpo_jax.oracles.base import preference_matrix
from onpo_jax.oracles.base import symmetric_sigmoid
from onpo_jax.oracles.synthetic import BTRewardOracle
from onpo_jax.oracles.synthetic import make_synthetic_oracle
from onpo_jax.oracles.synthetic import synthetic_reward_oracle
from onpo_jax.oracles.synthetic import SyntheticOracle
