"""The testbed world built from a config, and the SFT fit that starts every method.

`Testbed(config)` derives every random piece from `config.seed` (oracle,
prompts, the SFT start distribution μ, the initial policy), so a resumed run
rebuilds exactly the same world; `game_config(config, s)` is seed s's own game
and `sft_start` its SFT start.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onpo_jax import oracles as oracle_lib
from onpo_jax.testbed import env
from onpo_jax.testbed import evaluation


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "batch_size",
                                             "learning_rate"))
def _sft_fit(params, prompt_tokens, prompt_mask, responses, logp_start, key, *, graphdef,
             num_steps: int, batch_size: int, learning_rate: float):
  opt = optax.adam(learning_rate)

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

  (params, _), nll = jax.lax.scan(step, (params, opt.init(params)),
                                  jax.random.split(key, num_steps))
  return params, nll


def sft_fit(graphdef, params, prompt_tokens, prompt_mask, responses, logp_start, key, *,
            num_steps: int, batch_size: int, learning_rate: float):
  """Maximum likelihood on samples of μ (one `lax.scan`); returns (params, step losses).

  Compiled once per architecture and sizes: worlds of different seeds share it.
  """
  return _sft_fit(params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
                  jnp.asarray(responses), logp_start, key, graphdef=graphdef,
                  num_steps=int(num_steps), batch_size=int(batch_size),
                  learning_rate=float(learning_rate))


# Module-level so that every world with the same shapes reuses the executables.
_preference_matrix = jax.jit(oracle_lib.preference_matrix)
policy_table = jax.jit(evaluation.policy_table, static_argnums=0)
exact_metrics = jax.jit(evaluation.exact_metrics)


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
    ys = jnp.asarray(self.responses)
    if oc.kind == "synthetic":
      self.pref = _preference_matrix(self.oracle, self.prompt_tokens, self.prompt_mask, ys,
                                     jnp.ones(ys.shape, bool))
    else:  # the BT oracle holds a function: a constant of its own program
      self.pref = jax.jit(lambda pt, pm, ys: oracle_lib.preference_matrix(
          self.oracle, pt, pm, ys, jnp.ones(ys.shape, bool)))(
              self.prompt_tokens, self.prompt_mask, ys)
    self.logp_start = env.start_logprobs(self.k_style, tb.num_prompts, self.responses,
                                             tb.vocab_size, tb.start_temperature)
    mc = config.model
    self.model_config = env.model_config(
        mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers, mc.num_heads,
        mc.num_kv_heads, mc.head_dim, mc.max_position_embeddings, mc.get("dtype", "float32"))
    # A float64 policy (exact rounds) gets its game in float64 too.
    dt = jnp.promote_types(self.pref.dtype, self.model_config.jnp_param_dtype)
    self.pref, self.logp_start = self.pref.astype(dt), self.logp_start.astype(dt)
    self.graphdef, self.init_params = env.init_policy(self.model_config, config.seed)
    self.inputs = (self.prompt_tokens, self.prompt_mask, ys)  # what a policy table reads

  def table_fn(self, params):
    """[C, |Y|] log π(y | x) of `params`."""
    return policy_table(self.graphdef, params, *self.inputs)

  def metrics_fn(self, logp, logp_sft) -> dict:
    """`evaluation.exact_metrics` of a table against the SFT table."""
    return exact_metrics(self.pref, logp, logp_sft)

  def round_prompts(self, round_idx: int, n: int, key=None):
    """Prompts of round `round_idx` (the same for every method): a seeded draw from the C.

    `key` (default: the world's data key) lets seeds of one world draw differently.
    """
    c = self.prompt_tokens.shape[0]
    key = self.k_data if key is None else jax.random.fold_in(key, 2**16)
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, round_idx))).ravel()
    rng = np.random.default_rng([int(x) for x in seed])
    ids = np.concatenate([rng.permutation(c) for _ in range(-(-n // c))])[:n]
    return self.prompt_tokens[ids], self.prompt_mask[ids]


class Start:
  """A seed's starting point: world, SFT parameters and SFT table."""

  def __init__(self, world: Testbed, sft_params, sft_table):
    self.world, self.sft_params, self.sft_table = world, sft_params, sft_table


def game_config(config, seed: int):
  """The config of seed `seed`'s own game: oracle, prompts and SFT start from its own key."""
  c = config.copy_and_resolve_references()
  c.seed = int(config.seed) + 1 + seed
  return c


def sft_start(config, world: Testbed) -> Start:
  """The SFT fit of `config.sft` on `world` (deterministic: rebuilt on resume)."""
  params, _ = sft_fit(world.graphdef, world.init_params, world.prompt_tokens, world.prompt_mask,
                      world.responses, world.logp_start, world.k_sft,
                      num_steps=config.sft.num_steps, batch_size=config.sft.batch_size,
                      learning_rate=config.sft.learning_rate)
  return Start(world, params, world.table_fn(params))
