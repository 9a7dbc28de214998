"""What the self-play engine needs from a world: the backend protocol.

The engine (`onpo_jax.selfplay.engine`) runs a round of any method; a backend
supplies the parts that depend on the models and the oracle at hand. Two
implement it: the exact-evaluation testbed (`onpo_jax.testbed.backend`, tiny
policy, synthetic oracle, everything jitted) and real checkpoints
(`onpo_jax.llm.backend`, micro-batched sampling and scoring, a judge that reads
text on the host, offloaded roles). Evaluation is the job's (exact tables in
`onpo_jax.testbed.evaluation`, judged generations in `onpo_jax.llm.evaluation`):
the engine trains, it never evaluates.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

from onpo_jax.selfplay.methods import Batch
from onpo_jax.selfplay.methods import Logps


class Samples(NamedTuple):
  """Sampled responses, one row per (prompt, sample).

  Attributes:
    tokens: [rows, R] response tokens, `pad_id` after EOS.
    mask: [rows, R] bool, the generated tokens up to and including EOS.
  """

  tokens: Any
  mask: Any


class Backend(Protocol):
  """The parts of a round that depend on the models and the oracle.

  Attributes:
    frozen: arrays every log-prob pass reads but nothing trains (LoRA's base,
      `onpo_jax.llm.adapted`), or None. The engine passes them to its jitted
      train step as an argument, so they are not embedded in the executable.
  """

  frozen: Any

  def sample(self, params, prompt_tokens, prompt_mask, key: jax.Array) -> Samples:
    """One response per row from the policy `params` (rows are prompts repeated K times)."""
    ...

  def sample_mixture(self, params, ref_params, prompt_tokens, prompt_mask, key: jax.Array,
                     alpha: float) -> Samples:
    """One response per row from the token-level mixture π^{1−α}·π_ref^{α} (Nash-MD)."""
    ...

  def build_examples(self, data: str, pairing: str, prompt_tokens, prompt_mask, responses,
                     response_mask, opponents, opponent_mask, key: jax.Array) -> Batch:
    """Training examples of a round (`onpo_jax.selfplay.examples.build_examples`)."""
    ...

  def sequence_logprobs(self, params, tokens, attn, resp, frozen=None) -> jax.Array:
    """lp(y | x) [B] of full sequences; pure and traceable (runs inside the train step).

    `frozen` is the backend's `frozen`, as the traced argument of the step.
    """
    ...

  def anchor_logprobs(self, params, batch: Batch) -> Logps:
    """An anchor's log-probs of every example, computed once per regression."""
    ...
