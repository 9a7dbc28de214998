"""Exact evaluation on the enumerable testbed (`onpo_jax.testbed.env`).

Every response y ∈ Y = V^L is enumerated, so a policy is evaluated exactly:
teacher-forced log-probs give the table log π(y | x) [C, |Y|]; with the oracle's
full matrix P[x, y, y'] (`oracle.preference_matrix`) the tabular functions of
`onpo_jax.tabular.exact` give the duality gap (docs/algorithm.md §1.4:
DualGap(π) = E_x[2·max_y P(y ≻ π | x) − 1]), the win rate J(π1, π2) =
E_x E_{y1~π1, y2~π2} P(y1 ≻ y2) between any two policies, and the per-prompt
exact Nash equilibrium by linear programming (its gap ≈ 0) for reference.
The prompt distribution is uniform over the C testbed prompts.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax.testbed import env as testbed
from onpo_jax.tabular import exact


def policy_table(graphdef, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                 responses: jax.Array, *, chunk: int = 256) -> jax.Array:
  """log π(y | x) for every prompt and every enumerated response: [C, |Y|] float32.

  Always the *sum* of token log-probs (a probability, whatever the training
  reduction). Jittable with `graphdef` static.

  Args:
    graphdef: the policy's `nnx` graphdef.
    params: its parameters.
    prompt_tokens: [C, P] left-padded prompts.
    prompt_mask: [C, P] bool.
    responses: [|Y|, L] all responses (`testbed.enumerate_responses`).
    chunk: responses scored per forward pass (must divide |Y|).

  Returns:
    [C, |Y|] log-probabilities.
  """
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens/prompt_mask must be [C, P]; got {prompt_tokens.shape}, "
                     f"{prompt_mask.shape}")
  if responses.ndim != 2:
    raise ValueError(f"responses must be [|Y|, L]; got {responses.shape}")
  n_y = responses.shape[0]
  chunk = min(chunk, n_y)
  if n_y % chunk:
    raise ValueError(f"chunk={chunk} must divide the number of responses {n_y}")
  chunks = responses.reshape(n_y // chunk, chunk, responses.shape[1])

  def one_prompt(args):
    pt, pm = args

    def one_chunk(ys):
      tokens, attn, resp = testbed.full_sequences(
          jnp.broadcast_to(pt, (chunk,) + pt.shape), jnp.broadcast_to(pm, (chunk,) + pm.shape), ys)
      return testbed.sequence_logprobs(graphdef, params, tokens, attn, resp, "sum")

    return jax.lax.map(one_chunk, chunks).reshape(n_y)

  return jax.lax.map(one_prompt, (prompt_tokens, prompt_mask))


def exact_metrics(pref: jax.Array, logp_policy: jax.Array, logp_sft: jax.Array) -> dict:
  """Exact duality gap and win rate vs SFT of one policy table.

  Args:
    pref: [C, |Y|, |Y|] oracle preference matrix.
    logp_policy: [C, |Y|] log π.
    logp_sft: [C, |Y|] log π_SFT.

  Returns:
    dict of scalars: 'gap' (mean over prompts), 'gap_max' (worst prompt),
    'win_rate_vs_sft' (J(π, π_SFT)), 'mass' (mean Σ_y π(y|x), 1 up to rounding),
    'entropy' (mean over prompts, nats).
  """
  if logp_policy.shape != pref.shape[:2] or logp_sft.shape != pref.shape[:2]:
    raise ValueError(f"logp_policy and logp_sft must be [C, |Y|] = {pref.shape[:2]}; got "
                     f"{logp_policy.shape}, {logp_sft.shape}")
  pi = jnp.exp(logp_policy)
  gaps = exact.duality_gap(pref, pi)
  return {
      "gap": jnp.mean(gaps),
      "gap_max": jnp.max(gaps),
      "win_rate_vs_sft": jnp.mean(exact.preference_value(pref, pi, jnp.exp(logp_sft))),
      "mass": jnp.mean(jnp.sum(pi, axis=-1)),
      "entropy": jnp.mean(-jnp.sum(pi * logp_policy, axis=-1)),
  }


def win_rate_matrix(pref: jax.Array, logp_policies: jax.Array) -> jax.Array:
  """W[i, j] = J(π_i, π_j) averaged over prompts, for M policies.

  Args:
    pref: [C, |Y|, |Y|].
    logp_policies: [M, C, |Y|] log-prob tables.

  Returns:
    [M, M] with W + Wᵀ = 1 and diagonal 1/2 (up to rounding).
  """
  if logp_policies.ndim != 3 or logp_policies.shape[1:] != pref.shape[:2]:
    raise ValueError(f"logp_policies must be [M, C, |Y|] with [C, |Y|] = {pref.shape[:2]}; got "
                     f"{logp_policies.shape}")
  pis = jnp.exp(logp_policies)
  return jax.vmap(lambda a: jax.vmap(
      lambda b: jnp.mean(exact.preference_value(pref, a, b)))(pis))(pis)


def nash_reference(pref) -> Mapping[str, np.ndarray]:
  """Per-prompt exact Nash equilibrium by LP and its (≈ 0) duality gap.

  Args:
    pref: [C, |Y|, |Y|] (numpy-convertible; not traced).

  Returns:
    dict with 'pi' [C, |Y|] float64, 'value' [C] (1/2 for these symmetric games),
    'gap' (float, mean over prompts).
  """
  pref64 = np.asarray(pref, np.float64)
  pi, value = exact.nash_lp(pref64)
  gap = 2.0 * np.max(np.einsum("cij,cj->ci", pref64, pi), axis=-1) - 1.0
  return {"pi": pi, "value": value, "gap": float(np.mean(gap))}
