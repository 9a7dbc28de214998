"""Exact mode: each round's loss as the exact expectation over the enumerated responses.

The sampled testbed trains on pairs drawn from π_t, so a round's regression is
only solved in expectation. On the enumerable testbed (`testbed.env`) the
expectation itself is computable: every response y ∈ Y has a row in the policy
table log π(y | x) [C, |Y|] (`evaluation.policy_table`), and the oracle's full
matrix P[c, y, y'] is known. This module writes each method's expected loss in
matrix form *through the method table's own loss* (`selfplay.methods.METHODS`),
so the neural code path is the one the sampled mode uses; only the examples and
their probability weights change (docs/algorithm.md §3).

Pair methods (ONPO, OMD, INPO, DPO, online IPO). A λ_p pair is drawn from
π_t × π_t and ordered by the oracle, so the ordered pair (y_w, y_l) = (y, y')
has probability 2·π_t(y)·π_t(y')·P(y ≻ y'); with prompts uniform over the C
testbed prompts the exact loss is the weighted mean over all C·|Y|² ordered
pairs with weights π_t(y)·π_t(y')·P(y ≻ y')/C (the constant 2 cancels in the
weighted mean). Diagonal pairs y = y' are kept: they are part of the
expectation (probability π_t(y)²) and have margin 0, so they add the constant
(0 − target)² and change neither the gradient nor the minimiser. For ONPO,
OMD, INPO and online IPO the exact loss is minimised by the closed-form tabular
step (ONPO arXiv 2502.16852, Algorithm 1 and its key identity; docs/algorithm.md
§2-§3), e.g. π'_{t+1} ∝ π'_t · exp(η P(· ≻ π_t)) for ONPO, which
`regression_solution` returns and the tests check against
`onpo_jax.tabular.dynamics`. DPO uses the same λ_p weights here: its sampled
mode's best-vs-worst tournament pairs have no cheap exact distribution.

SPPO: samples y ~ π_t with the exact win rate P(y ≻ π_t) (Wu et al., arXiv
2405.00675, Eq. 4.7), weights π_t(y)/C.

Nash-MD (Munos et al., arXiv 2312.00886, §7): samples y ~ π_t with the exact
preference P(y ≻ π_mix) against the token-level geometric mixture
π_mix ∝ π_t^{1−α} π_ref^{α} (`mixture_logp_table`), weights π_t(y)/C. At
θ = θ_t the gradient of `nash_md_loss` with these weights is exactly
∇_θ [β KL(π_θ‖π_ref) − P(π_θ ≻ π_mix)] averaged over prompts, with the mixture
held fixed (the sampled estimator does not differentiate its samples either).

Memory: pair methods hold C·|Y|² pairs (0.5 M for C = 8, |Y| = 256).

Regressions are solved to a stated tolerance by `testbed.solver.solve_regression`,
a jitted full-batch loop over any optax transform (the job uses Gauss–Newton), including
`onpo_step(...)` for ONPO's two phases. `regression_residual` reports how far
a table is from the exact minimiser.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from onpo_jax import sampler as sampler_lib
from onpo_jax.models import decoder as decoder_lib
from onpo_jax.selfplay.methods import METHODS
from onpo_jax.selfplay.methods import PairLogps
from onpo_jax.tabular import exact as tabular_exact
from onpo_jax.testbed import env as testbed

# Methods whose exact regression has a closed-form minimiser (`regression_solution`).
SOLVABLE = ("onpo_two_step", "onpo_extrapolate", "omd", "inpo", "online_ipo")


class ExactData(NamedTuple):
  """One round's exact training data, built once per round by `exact_data`.

  Attributes:
    logp_prev: [C, |Y|] log π_t, the policy the round's data come from.
    pref: [C, |Y|, |Y|] P(y ≻ y' | x_c).
    weights: probability weights of the examples: [C·|Y|²] ordered pairs for
      pair methods, [C·|Y|] responses for SPPO and Nash-MD.
    target: None for pair methods; [C·|Y|] exact win rate P(y ≻ π_t) (SPPO) or
      preference P(y ≻ π_mix) against the Nash-MD mixture.
  """

  logp_prev: jax.Array
  pref: jax.Array
  weights: jax.Array
  target: Optional[jax.Array]


# ----------------------------------------------------------------------------
# Shape checks.


def _check_table(fn: str, name: str, table, shape=None) -> None:
  if jnp.ndim(table) != 2:
    raise ValueError(f"{fn}: {name} must be a [C, |Y|] table, got shape {jnp.shape(table)}")
  if shape is not None and tuple(jnp.shape(table)) != tuple(shape):
    raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {jnp.shape(table)}")


def _check_pref(fn: str, logp_prev, pref) -> None:
  _check_table(fn, "logp_prev", logp_prev)
  c, n = jnp.shape(logp_prev)
  if tuple(jnp.shape(pref)) != (c, n, n):
    raise ValueError(f"{fn}: pref must have shape [C, |Y|, |Y|] = {(c, n, n)} to match "
                     f"logp_prev {jnp.shape(logp_prev)}, got {jnp.shape(pref)}")


def _check_name(fn: str, name: str, allowed=None) -> None:
  allowed = tuple(METHODS) if allowed is None else allowed
  if name not in allowed:
    raise ValueError(f"{fn}: name must be one of {allowed}, got {name!r}")


# ----------------------------------------------------------------------------
# Examples and weights of the exact expectation.


def exact_pair_logps(table: jax.Array) -> PairLogps:
  """Every ordered pair (y_w, y_l) = (y, y') of every prompt, as `PairLogps`.

  Args:
    table: [C, |Y|] per-sequence log-probs of one policy.

  Returns:
    PairLogps with w = table[c, y] and l = table[c, y'], each flattened from
    [C, |Y|, |Y|] in (c, y, y') order, [C·|Y|²].
  """
  _check_table("exact_pair_logps", "table", table)
  c, n = table.shape
  w = jnp.broadcast_to(table[:, :, None], (c, n, n)).reshape(-1)
  l = jnp.broadcast_to(table[:, None, :], (c, n, n)).reshape(-1)
  return PairLogps(w=w, l=l)


def exact_pair_weights(logp_prev: jax.Array, pref: jax.Array) -> jax.Array:
  """λ_p pair probabilities π_t(y)·π_t(y')·P(y ≻ y')/C, in `exact_pair_logps` order.

  The pair (y, y') is drawn from π_t × π_t and ordered by the oracle
  (docs/algorithm.md §1, λ_p), prompts uniform; the weights sum to 1/2 (the
  losses' weighted mean normalises them). Diagonal pairs are kept (module
  docstring).

  Args:
    logp_prev: [C, |Y|] log π_t.
    pref: [C, |Y|, |Y|] P(y ≻ y' | x_c).

  Returns:
    [C·|Y|²] non-negative weights.
  """
  _check_pref("exact_pair_weights", logp_prev, pref)
  pi = jnp.exp(logp_prev)
  c = logp_prev.shape[0]
  return (pi[:, :, None] * pi[:, None, :] * pref / c).reshape(-1)


def exact_sppo_targets(logp_prev: jax.Array, pref: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SPPO's exact win rates P(y ≻ π_t) and sample weights π_t(y)/C.

  SPPO estimates P(y ≻ π_t) from K samples of π_t (Wu et al., arXiv
  2405.00675, Eq. 4.7); here it is exact and every response is a sample with
  its probability under π_t.

  Args:
    logp_prev: [C, |Y|] log π_t.
    pref: [C, |Y|, |Y|].

  Returns:
    (win_rate [C·|Y|], weights [C·|Y|]).
  """
  _check_pref("exact_sppo_targets", logp_prev, pref)
  pi = jnp.exp(logp_prev)
  win = tabular_exact.win_rate_vs_policy(pref, pi)
  return win.reshape(-1), (pi / logp_prev.shape[0]).reshape(-1)


def exact_nash_md_targets(logp_prev: jax.Array, logp_mix: jax.Array,
                          pref: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nash-MD's exact preference P(y ≻ π_mix) and sample weights π_t(y)/C.

  With these weights `nash_md_loss` is the exact expectation of its REINFORCE
  estimator over y ~ π_t and an opponent y' ~ π_mix (module docstring): at
  θ = θ_t its gradient is ∇_θ mean_c [β KL(π_θ‖π_ref) − P(π_θ ≻ π_mix)].

  Args:
    logp_prev: [C, |Y|] log π_t (the sampling policy of the round).
    logp_mix: [C, |Y|] log π_mix (`mixture_logp_table`).
    pref: [C, |Y|, |Y|].

  Returns:
    (preference [C·|Y|], weights [C·|Y|]).
  """
  fn = "exact_nash_md_targets"
  _check_pref(fn, logp_prev, pref)
  _check_table(fn, "logp_mix", logp_mix, logp_prev.shape)
  pi = jnp.exp(logp_prev)
  target = tabular_exact.win_rate_vs_policy(pref, jnp.exp(logp_mix))
  return target.reshape(-1), (pi / logp_prev.shape[0]).reshape(-1)


# ----------------------------------------------------------------------------
# Token-level tables of the decoder (Nash-MD's mixture).


def token_logits_table(graphdef, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                       responses: jax.Array, *, chunk: int = 256) -> jax.Array:
  """Teacher-forced next-token logits of every response token: [C, |Y|, L, V] float32.

  out[c, i, t] are the logits that predict token t of response i after prompt
  c (they depend on the prompt and y_<t only, the decoder being causal). As
  `evaluation.policy_table`, one forward pass per chunk of responses.

  Args:
    graphdef: the policy's `nnx` graphdef.
    params: its parameters.
    prompt_tokens: [C, P] left-padded prompts.
    prompt_mask: [C, P] bool.
    responses: [|Y|, L] all responses (`testbed.enumerate_responses`).
    chunk: responses per forward pass (must divide |Y|).

  Returns:
    [C, |Y|, L, V] logits.
  """
  fn = "token_logits_table"
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"{fn}: prompt_tokens and prompt_mask must be [C, P]; got "
                     f"{prompt_tokens.shape}, {prompt_mask.shape}")
  if responses.ndim != 2:
    raise ValueError(f"{fn}: responses must be [|Y|, L]; got {responses.shape}")
  n_y, length = responses.shape
  chunk = min(chunk, n_y)
  if chunk < 1 or n_y % chunk:
    raise ValueError(f"{fn}: chunk={chunk} must divide the number of responses {n_y}")
  p_len = prompt_tokens.shape[1]
  chunks = jnp.asarray(responses).reshape(n_y // chunk, chunk, length)

  def one_prompt(args):
    pt, pm = args

    def one_chunk(ys):
      tokens, attn, _ = testbed.full_sequences(
          jnp.broadcast_to(pt, (chunk,) + pt.shape), jnp.broadcast_to(pm, (chunk,) + pm.shape), ys)
      model = nnx.merge(graphdef, params)
      logits, _ = model(tokens, decoder_lib.positions_from_mask(attn), attn)
      # Column P − 1 + t holds the logits of response token t (the response
      # starts right after the left-padded prompt block).
      return logits[:, p_len - 1:p_len - 1 + length].astype(jnp.float32)

    out = jax.lax.map(one_chunk, chunks)
    return out.reshape((n_y,) + out.shape[2:])

  return jax.lax.map(one_prompt, (prompt_tokens, prompt_mask))


def _check_token_logits(fn: str, name: str, logits, responses) -> None:
  if jnp.ndim(logits) != 4 or jnp.ndim(responses) != 2 or (
      tuple(jnp.shape(logits)[1:3]) != tuple(jnp.shape(responses))):
    raise ValueError(f"{fn}: {name} must be [C, |Y|, L, V] with [|Y|, L] = responses.shape "
                     f"{jnp.shape(responses)}, got {jnp.shape(logits)}")


def _gather_sum(token_logp: jax.Array, responses: jax.Array) -> jax.Array:
  picked = jnp.take_along_axis(token_logp, jnp.asarray(responses)[None, :, :, None], axis=-1)
  return jnp.sum(picked[..., 0], axis=-1)


def sequence_logp_from_token_logits(token_logits: jax.Array, responses: jax.Array) -> jax.Array:
  """log π(y | x) = Σ_t log softmax(logits_t)[y_t] for every response: [C, |Y|].

  Args:
    token_logits: [C, |Y|, L, V] (`token_logits_table`).
    responses: [|Y|, L] int.
  """
  _check_token_logits("sequence_logp_from_token_logits", "token_logits", token_logits, responses)
  return _gather_sum(jax.nn.log_softmax(token_logits, axis=-1), responses)


def mixture_logp_table(token_logits_policy: jax.Array, token_logits_ref: jax.Array,
                       responses: jax.Array, alpha) -> jax.Array:
  """log π_mix(y | x) of Nash-MD's token-level geometric mixture: [C, |Y|].

  π_mix(y | x) = Π_t softmax((1−α)·log π_θ(·|x, y_<t) + α·log π_ref(·|x, y_<t))[y_t]
  (Munos et al., arXiv 2312.00886; the distribution `sampler.MixtureSampler`
  draws from, through the same `sampler.geometric_mixture_logprobs`). It is a
  normalised distribution over Y because each factor is a normalised
  next-token distribution given the prefix.

  Args:
    token_logits_policy: [C, |Y|, L, V] teacher-forced logits of π_θ.
    token_logits_ref: [C, |Y|, L, V] the same for π_ref.
    responses: [|Y|, L] int.
    alpha: mixture weight α ∈ [0, 1] on π_ref.

  Returns:
    [C, |Y|] log-probabilities.
  """
  fn = "mixture_logp_table"
  _check_token_logits(fn, "token_logits_policy", token_logits_policy, responses)
  _check_token_logits(fn, "token_logits_ref", token_logits_ref, responses)
  if jnp.shape(token_logits_ref) != jnp.shape(token_logits_policy):
    raise ValueError(f"{fn}: token_logits_ref must have shape {jnp.shape(token_logits_policy)} "
                     f"(like token_logits_policy), got {jnp.shape(token_logits_ref)}")
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha}")
  token_logp = sampler_lib.geometric_mixture_logprobs(token_logits_policy, token_logits_ref,
                                                      alpha)
  return _gather_sum(token_logp, responses)


# ----------------------------------------------------------------------------
# The exact loss of a method.


def exact_data(name: str, cfg, logp_prev: jax.Array, pref: jax.Array, *,
               logp_mix: Optional[jax.Array] = None) -> ExactData:
  """One round's exact data for method `name` (built once per round, from π_t).

  Args:
    name: a method of `selfplay.methods.METHODS`.
    cfg: the run config (no method's data depends on it yet; kept so every
      exact-mode builder takes the same arguments as `exact_loss`).
    logp_prev: [C, |Y|] log π_t.
    pref: [C, |Y|, |Y|].
    logp_mix: [C, |Y|] log π_mix, required for 'nash_md' only
      (`mixture_logp_table` of π_t and π_ref with cfg.nash_md.alpha).

  Returns:
    `ExactData`.
  """
  del cfg
  fn = "exact_data"
  _check_name(fn, name)
  _check_pref(fn, logp_prev, pref)
  data = METHODS[name].data
  if data == "pairs":
    return ExactData(logp_prev, pref, exact_pair_weights(logp_prev, pref), None)
  if data == "samples":
    win, w = exact_sppo_targets(logp_prev, pref)
    return ExactData(logp_prev, pref, w, win)
  if logp_mix is None:
    raise ValueError(f"{fn}: logp_mix (the [C, |Y|] mixture table) is required for {name!r}")
  target, w = exact_nash_md_targets(logp_prev, logp_mix, pref)
  return ExactData(logp_prev, pref, w, target)


def _method_logps(name: str, table: jax.Array):
  if METHODS[name].data == "pairs":
    return exact_pair_logps(table)
  return table.reshape(-1)


def exact_loss(name: str, cfg, lp_table: jax.Array, anchor_tables: dict,
               data: ExactData) -> tuple[jax.Array, dict]:
  """The exact expected loss of method `name` and its metrics.

  Calls `METHODS[name].loss(cfg, logps, anchors, target, weights)`, the loss the
  sampled mode uses, on all enumerated examples with their probabilities as
  weights (module docstring). Differentiable in `lp_table`; jittable with
  `name` and `cfg` static.

  Args:
    name: a method of `selfplay.methods.METHODS`.
    cfg: the run config (the method's hyperparameters, e.g. cfg.onpo.eta).
    lp_table: [C, |Y|] log π_θ of the trained policy (sum reduction).
    anchor_tables: {anchor name: [C, |Y|] table} for every anchor of the method
      ('aux' = π', 'prev' = π_t, 'ref' = SFT).
    data: `exact_data(name, ...)` of the round.

  Returns:
    (loss, metrics) of the method's loss.
  """
  fn = "exact_loss"
  _check_name(fn, name)
  shape = jnp.shape(data.logp_prev)
  _check_table(fn, "lp_table", lp_table, shape)
  missing = [a for a in METHODS[name].anchors if a not in anchor_tables]
  if missing:
    raise ValueError(f"{fn}: anchor_tables must hold {METHODS[name].anchors} for {name!r}; "
                     f"missing {missing}")
  anchors = {}
  for a in METHODS[name].anchors:
    _check_table(fn, f"anchor_tables[{a!r}]", anchor_tables[a], shape)
    anchors[a] = _method_logps(name, anchor_tables[a])
  expected = shape[0] * shape[1] * (shape[1] if METHODS[name].data == "pairs" else 1)
  if jnp.shape(data.weights) != (expected,):
    raise ValueError(f"{fn}: data.weights must have shape ({expected},) for {name!r} "
                     f"(build data with exact_data({name!r}, ...)), got {jnp.shape(data.weights)}")
  return METHODS[name].loss(cfg, _method_logps(name, lp_table), anchors, data.target,
                            data.weights)


# ----------------------------------------------------------------------------
# The exact minimiser and the residual of a regression.


def regression_solution(name: str, cfg, anchor_tables: dict, data: ExactData) -> jax.Array:
  """The exact minimiser of the round's regression over all tables: [C, |Y|] log-probs.

  With r_t(y) = P(y ≻ π_t) (docs/algorithm.md §2-§3; ONPO arXiv 2502.16852,
  Algorithm 1):
    onpo_*      log_softmax(log π' + η r_t)          (both phases; π' = anchor 'aux')
    omd         log_softmax(log π_t + r_t/η_I)
    inpo        log_softmax((τ/η_I) log π_ref + (1 − τ/η_I) log π_t + r_t/η_I)
    online_ipo  log_softmax(log π_ref + r_t/β)
  It is unique where π_t > 0 (the normal equations of the weighted least squares
  give Δ(y) = target·r_t(y) + const on the support of π_t).

  Args:
    name: one of `SOLVABLE`.
    cfg: the run config.
    anchor_tables: the anchors of the method, as for `exact_loss`.
    data: `exact_data(name, ...)` of the round.

  Returns:
    [C, |Y|] log π* (each row log-sums to 0).
  """
  fn = "regression_solution"
  _check_name(fn, name, SOLVABLE)
  shape = jnp.shape(data.logp_prev)
  for a in METHODS[name].anchors:
    if a not in anchor_tables:
      raise ValueError(f"{fn}: anchor_tables must hold {METHODS[name].anchors}; missing {a!r}")
    _check_table(fn, f"anchor_tables[{a!r}]", anchor_tables[a], shape)
  r = tabular_exact.win_rate_vs_policy(data.pref, jnp.exp(data.logp_prev))
  if name.startswith("onpo"):
    logits = anchor_tables["aux"] + cfg.onpo.eta * r
  elif name == "omd":
    logits = anchor_tables["prev"] + r / cfg.omd.eta_inpo
  elif name == "inpo":
    mix = cfg.inpo.tau / cfg.inpo.eta_inpo
    logits = (mix * anchor_tables["ref"] + (1.0 - mix) * anchor_tables["prev"]
              + r / cfg.inpo.eta_inpo)
  else:
    logits = anchor_tables["ref"] + r / cfg.online_ipo.beta
  return jax.nn.log_softmax(logits, axis=-1)


def regression_residual(name: str, cfg, lp_table: jax.Array, anchor_tables: dict,
                        data: ExactData) -> jax.Array:
  """Exact loss at `lp_table` minus its minimum (at `regression_solution`): ≥ 0.

  Every solvable loss is a weighted least squares in the margin, which is
  linear in the table, so the excess loss equals E_pairs[(d(y_w) − d(y_l))²]
  with d = lp_table − log π* (the cross term vanishes by the normal
  equations). It is computed in that form: non-negative and free of the
  cancellation of subtracting two losses.

  Args:
    name: one of `SOLVABLE`.
    cfg: the run config.
    lp_table: [C, |Y|] log π_θ reached by the regression.
    anchor_tables: anchors as for `exact_loss`.
    data: `exact_data(name, ...)` of the round.

  Returns:
    Scalar residual, 0 exactly at the solution.
  """
  fn = "regression_residual"
  _check_name(fn, name, SOLVABLE)
  _check_table(fn, "lp_table", lp_table, jnp.shape(data.logp_prev))
  d = lp_table - regression_solution(name, cfg, anchor_tables, data)
  pairs = exact_pair_logps(d)
  w = data.weights
  # Zero-weight pairs may hold -inf log-probs; keep them out of the arithmetic.
  sq = jnp.where(w > 0, jnp.square(pairs.w - pairs.l), 0.0)
  return jnp.sum(w * sq) / jnp.sum(w)
