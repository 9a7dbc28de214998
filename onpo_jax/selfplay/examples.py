"""Training examples of one round: sampled responses + oracle -> typed batches.

One builder serves every backend. It is written in `jax.numpy`, so the testbed
jits it while the real-checkpoint backend calls it eagerly (its judge decodes
text on the host). Responses are right-padded after their end-of-sequence
token: `response_mask` marks the generated tokens up to and including EOS, and
only those are attended to and scored (docs/conventions.md, "Masks").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax import losses
from onpo_jax import pairs as pairs_lib
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.selfplay.methods import SampleBatch


def full_sequences(prompt_tokens, prompt_mask, responses, response_mask, pad_id: int = 0):
  """Prompt [N, P] + response [N, R] -> (tokens, attention mask, scored mask), each [N, P+R].

  Response positions after EOS (mask False) are written as `pad_id` and are
  neither attended to nor scored, so lp(y) sums exactly the generated tokens.
  """
  prompt_tokens, responses = jnp.asarray(prompt_tokens), jnp.asarray(responses)
  prompt_mask, response_mask = jnp.asarray(prompt_mask, bool), jnp.asarray(response_mask, bool)
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens/prompt_mask must both be [N, P]; got {prompt_tokens.shape}, "
                     f"{prompt_mask.shape}")
  if responses.shape != response_mask.shape or responses.shape[0] != prompt_tokens.shape[0]:
    raise ValueError(f"responses/response_mask must both be [N={prompt_tokens.shape[0]}, R]; "
                     f"got {responses.shape}, {response_mask.shape}")
  resp = jnp.where(response_mask, responses, pad_id).astype(jnp.int32)
  tokens = jnp.concatenate([prompt_tokens.astype(jnp.int32), resp], axis=1)
  attn = jnp.concatenate([prompt_mask, response_mask], axis=1)
  scored = jnp.concatenate([jnp.zeros_like(prompt_mask), response_mask], axis=1)
  return tokens, attn, scored


def sppo_win_rate_matrix(oracle, prompt_tokens, prompt_mask, responses, response_mask):
  """[n, K, K] P(y_i ≻ y_j | x) among the K samples of each prompt: K(K−1)/2 queries.

  The upper triangle comes from the oracle, the rest from P + Pᵀ = 1 and a
  diagonal of ½.
  """
  n, k, length = responses.shape
  ii, jj = np.triu_indices(k, 1)
  m = len(ii)
  rep = lambda a: jnp.repeat(jnp.asarray(a), m, axis=0)
  p_upper = jnp.asarray(oracle.preference_prob(
      rep(prompt_tokens), rep(prompt_mask), responses[:, ii].reshape(n * m, length),
      response_mask[:, ii].reshape(n * m, length), responses[:, jj].reshape(n * m, length),
      response_mask[:, jj].reshape(n * m, length))).reshape(n, m)
  mat = jnp.full((n, k, k), 0.5, p_upper.dtype)
  return mat.at[:, ii, jj].set(p_upper).at[:, jj, ii].set(1.0 - p_upper)


def build_examples(data: str, pairing: str, prompt_tokens, prompt_mask, responses, response_mask,
                   opponents, opponent_mask, key: jax.Array, *, oracle, pad_id: int = 0,
                   tournament_mode: str = "deterministic"):
  """Training examples of one round for a method whose data kind is `data`.

  Args:
    data: 'pairs', 'samples' (SPPO) or 'mixture' (Nash-MD), as in `METHODS`.
    pairing: 'tournament' | 'lambda_p' | 'all_pairs' (pair methods).
    prompt_tokens, prompt_mask: [n, P] left-padded prompts.
    responses, response_mask: [n, K, R] sampled responses of each prompt.
    opponents, opponent_mask: [n, K, R] Nash-MD's mixture samples (else ignored).
    key: PRNG key of the oracle's Bernoulli comparisons.
    oracle: anything with `preference_prob(prompt_tokens, prompt_mask, a, a_mask, b, b_mask)`.
    pad_id: token written after EOS.
    tournament_mode: 'deterministic' (winner = P > ½, the published pipelines)
      or 'bernoulli' games of the tournament; λ_p and all pairs always draw.

  Returns:
    `PairBatch` with n·M pairs, or `SampleBatch` with n·K samples.
  """
  prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask, bool)
  responses, response_mask = jnp.asarray(responses), jnp.asarray(response_mask, bool)
  n, k, length = responses.shape
  rep = lambda a, m: jnp.repeat(a, m, axis=0)
  if data == "pairs":
    compare_fn = pairs_lib.oracle_compare_fn(oracle, prompt_tokens, prompt_mask, responses,
                                             response_mask)
    pr, _ = pairs_lib.build_pairs(pairing, compare_fn, key, n, k,
                                  tournament_mode=tournament_mode)
    m = pr.chosen.shape[1]
    take = lambda a, idx: jnp.take_along_axis(a, idx[:, :, None], 1).reshape(n * m, length)
    side = lambda idx: full_sequences(rep(prompt_tokens, m), rep(prompt_mask, m),
                                      take(responses, idx), take(response_mask, idx), pad_id)
    tok_w, attn_w, resp_w = side(pr.chosen)
    tok_l, attn_l, resp_l = side(pr.rejected)
    return PairBatch(tok_w, attn_w, resp_w, tok_l, attn_l, resp_l,
                     jnp.asarray(pr.weight).reshape(-1))
  flat, flat_mask = responses.reshape(n * k, length), response_mask.reshape(n * k, length)
  tok, attn, resp = full_sequences(rep(prompt_tokens, k), rep(prompt_mask, k), flat, flat_mask,
                                   pad_id)
  ones = jnp.ones((n * k,), jnp.float32)
  if data == "samples":
    mat = sppo_win_rate_matrix(oracle, prompt_tokens, prompt_mask, responses, response_mask)
    return SampleBatch(tok, attn, resp, losses.sppo_win_rates(mat).reshape(n * k), ones)
  if data != "mixture":
    raise ValueError(f"data={data!r}: expected 'pairs', 'samples' or 'mixture'")
  # Nash-MD: one query per policy sample against its mixture opponent.
  preference = oracle.preference_prob(
      rep(prompt_tokens, k), rep(prompt_mask, k), flat, flat_mask,
      jnp.asarray(opponents).reshape(n * k, length),
      jnp.asarray(opponent_mask, bool).reshape(n * k, length))
  return SampleBatch(tok, attn, resp, jnp.asarray(preference), ones)
