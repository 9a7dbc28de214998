"""The testbed world built from a config, and the SFT fit that starts every method.

`Testbed(config)` derives every random piece from `config.seed` (oracle,
prompts, the SFT start distribution μ, the initial policy), so a resumed run
rebuilds exactly the same world.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onpo_jax import oracles as oracle_lib
from onpo_jax.testbed import env
from onpo_jax.testbed import evaluation


def sft_fit(graphdef, params, prompt_tokens, prompt_mask, responses, logp_start, key, *,
            num_steps: int, batch_size: int, learning_rate: float):
  """Maximum likelihood on samples of μ (one `lax.scan`); returns (params, step losses)."""
  opt = optax.adam(learning_rate)
  prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
  responses = jnp.asarray(responses)

  def step(carry, k):
    p, st = carry
    kp, ky = jax.random.split(k)
    pi = jax.random.randint(kp, (batch_size,), 0, prompt_tokens.shape[0])
    yi = jax.random.categorical(ky, logp_start[pi])
    tok, attn, resp = env.full_sequences(prompt_tokens[pi], prompt_mask[pi], responses[yi])
    nll, grads = jax.value_and_grad(lambda q: -jnp.mean(
        env.sequence_logprobs(graphdef, q, tok, attn, resp, "sum")))(p)
    updates, st = opt.update(grads, st, p)
    return (optax.apply_updates(p, updates), st), nll

  @jax.jit
  def fit(p, k):
    (p, _), nll = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k, num_steps))
    return p, nll

  return fit(params, key)


class Testbed:
  """Everything derived deterministically from a testbed config (rebuilt on resume).

  Attributes:
    responses: [|Y|, L] every response.
    prompt_tokens, prompt_mask: [C, P] the testbed prompts.
    oracle: the preference oracle; pref: its full matrix [C, |Y|, |Y|].
    logp_start: [C, |Y|] the SFT start distribution μ.
    model_config, graphdef, init_params: the policy before SFT.
    table_fn: params -> [C, |Y|] log π table; metrics_fn: exact metrics of a table.
  """

  def __init__(self, config):
    tb = config.testbed
    keys = jax.random.split(jax.random.key(config.seed), 6)
    self.k_oracle, self.k_prompts, self.k_style, self.k_sft, self.k_data, self.k_run = keys
    self.responses = env.enumerate_responses(tb.vocab_size, tb.response_length)
    self.prompt_tokens, self.prompt_mask = env.make_prompts(
        self.k_prompts, tb.num_prompts, tb.prompt_length, tb.vocab_size)
    oc = config.oracle
    synthetic = oracle_lib.make_synthetic_oracle(
        self.k_oracle, vocab_size=oc.vocab_size, max_prompt_length=tb.prompt_length,
        max_response_length=tb.response_length, feature_dim=oc.feature_dim,
        strength=oc.strength, cyclic=oc.cyclic, cyclic_spread=oc.cyclic_spread)
    self.oracle = (synthetic if oc.kind == "synthetic"
                   else oracle_lib.synthetic_reward_oracle(synthetic))
    self.pref = jax.jit(lambda pt, pm, ys: oracle_lib.preference_matrix(
        self.oracle, pt, pm, ys, jnp.ones(ys.shape, bool)))(
            self.prompt_tokens, self.prompt_mask, self.responses)
    self.logp_start = env.start_logprobs(self.k_style, tb.num_prompts, self.responses,
                                             tb.vocab_size, tb.start_temperature)
    mc = config.model
    self.model_config = env.model_config(
        mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers, mc.num_heads,
        mc.num_kv_heads, mc.head_dim, mc.max_position_embeddings)
    self.graphdef, self.init_params = env.init_policy(self.model_config, config.seed)
    self.table_fn = jax.jit(lambda p: evaluation.policy_table(
        self.graphdef, p, self.prompt_tokens, self.prompt_mask, self.responses))
    self.metrics_fn = jax.jit(lambda lp, lp_sft: evaluation.exact_metrics(self.pref, lp, lp_sft))

  def round_prompts(self, round_idx: int, n: int):
    """Prompts of round `round_idx` (the same for every method): a seeded draw from the C."""
    c = self.prompt_tokens.shape[0]
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(self.k_data, round_idx))).ravel()
    rng = np.random.default_rng([int(x) for x in seed])
    ids = np.concatenate([rng.permutation(c) for _ in range(-(-n // c))])[:n]
    return self.prompt_tokens[ids], self.prompt_mask[ids]
