"""The testbed's backend for the self-play engine: everything jitted, evaluation exact.

Responses have a fixed length L and no end-of-sequence token (every one of the
V^L responses is a complete answer), so response masks are all True; examples
are built inside `jax.jit` with the synthetic oracle.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp

from onpo_jax import sampler as sampler_lib
from onpo_jax.selfplay import examples as examples_lib
from onpo_jax.selfplay.backend import Samples
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.selfplay.methods import PairLogps
from onpo_jax.testbed import env


class TestbedBackend:
  """`onpo_jax.selfplay.backend.Backend` of the exact-evaluation testbed.

  Args:
    graphdef: the policy's graphdef (every method shares the architecture).
    model_config: its `DecoderConfig`.
    oracle: the synthetic preference oracle.
    response_length: L, tokens per response.
    prompt_length: P, tokens per prompt (no padding).
    temperature: sampling temperature.
    reduction: 'sum' | 'mean' over response tokens.
    tournament_mode: how tournament games are decided (`pairs.COMPARISON_MODES`).
  """

  frozen = None  # every parameter of the policy is trained

  def __init__(self, graphdef, model_config, oracle, *, response_length: int,
               prompt_length: int, temperature: float, reduction: str,
               tournament_mode: str = "deterministic"):
    self.graphdef, self.oracle, self.reduction = graphdef, oracle, reduction
    self.pad_id = 0
    sampling = sampler_lib.SamplingConfig(
        max_new_tokens=int(response_length), temperature=float(temperature), eos_ids=(),
        pad_id=self.pad_id, prompt_buckets=(int(prompt_length),))
    self.sampler = sampler_lib.Sampler(graphdef, sampling, model_config=model_config)
    self.mixture_sampler = sampler_lib.MixtureSampler(
        graphdef, graphdef, sampling, policy_model_config=model_config,
        ref_model_config=model_config)
    self._seq_logps = jax.jit(self.sequence_logprobs)
    self.tournament_mode = tournament_mode
    self._build = self._build_fn(oracle)

  def _build_fn(self, oracle):
    return jax.jit(functools.partial(examples_lib.build_examples, oracle=oracle,
                                     pad_id=self.pad_id, tournament_mode=self.tournament_mode),
                   static_argnums=(0, 1))

  def with_oracle(self, oracle) -> "TestbedBackend":
    """This backend judging with `oracle` (another game of the same sizes).

    The samplers and log-prob functions are shared (they depend only on the
    policy's architecture), so only example building compiles again.
    """
    other = copy.copy(self)
    other.oracle, other._build = oracle, self._build_fn(oracle)
    return other

  def sample(self, params, prompt_tokens, prompt_mask, key) -> Samples:
    out = self.sampler(params, prompt_tokens, prompt_mask, key)
    return Samples(out.response_tokens, jnp.ones(out.response_tokens.shape, bool))

  def sample_mixture(self, params, ref_params, prompt_tokens, prompt_mask, key,
                     alpha: float) -> Samples:
    out = self.mixture_sampler(params, ref_params, prompt_tokens, prompt_mask, key, alpha)
    return Samples(out.response_tokens, jnp.ones(out.response_tokens.shape, bool))

  def build_examples(self, data, pairing, prompt_tokens, prompt_mask, responses, response_mask,
                     opponents, opponent_mask, key):
    return self._build(data, pairing, prompt_tokens, prompt_mask, responses, response_mask,
                       opponents, opponent_mask, key)

  def sequence_logprobs(self, params, tokens, attn, resp, frozen=None):
    del frozen  # None here
    return env.sequence_logprobs(self.graphdef, params, tokens, attn, resp, self.reduction)

  def anchor_logprobs(self, params, batch):
    if isinstance(batch, PairBatch):
      return PairLogps(self._seq_logps(params, batch.tok_w, batch.attn_w, batch.resp_w),
                       self._seq_logps(params, batch.tok_l, batch.attn_l, batch.resp_l))
    return self._seq_logps(params, batch.tok, batch.attn, batch.resp)
