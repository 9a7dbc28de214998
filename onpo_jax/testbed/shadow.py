"""The tabular shadow: the testbed's game played by the exact tabular dynamics.

In exact mode each neural round solves the exact expected regression
(`testbed.exact`), whose minimiser over *all* tables is the closed-form tabular
step. The shadow runs those closed-form steps on the same game (the testbed's
preference matrix P[c, y, y'] over the enumerated responses) from the same
start (the neural SFT table as π_1 = π'_1), with the config's step sizes. A
neural run that solves its regressions must track it; `tracking_kl` measures
how closely (docs/algorithm.md §2-§3; ONPO arXiv 2502.16852, Algorithm 1).

Methods and step sizes (`onpo_jax.tabular.dynamics`):
  onpo_two_step, onpo_extrapolate   ONPO with η = cfg.onpo.eta:
      π'_{t+1} ∝ π'_t exp(η r_t),  π_{t+1} ∝ π'_{t+1} exp(η r_t).
    Both variants have the same shadow: `extrapolate` sets the parameters to
    2·θ'_{t+1} − θ'_t, and for a tabular softmax policy logit π_{t+1} =
    2·logit π'_{t+1} − logit π'_t (+ const) is exactly the policy regression's
    solution; only for a network is it an approximation.
  omd    π_{t+1} ∝ π_t exp(r_t / η_I), η_I = cfg.omd.eta_inpo.
  inpo   π_{t+1} ∝ exp(r_t/η_I) π_ref^{τ/η_I} π_t^{1−τ/η_I}, τ = cfg.inpo.tau,
         η_I = cfg.inpo.eta_inpo, π_ref = the SFT table.
  online_ipo  π_{t+1} ∝ π_ref exp(r_t/β), β = cfg.online_ipo.beta (the exact
         minimiser of the λ_p IPO regression; a fixed-point iteration, not a
         no-regret method).
with r_t(y) = P(y ≻ π_t | x). Iterates are kept in log space.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from onpo_jax.tabular import dynamics
from onpo_jax.testbed import evaluation

SHADOW_METHODS = ("onpo_two_step", "onpo_extrapolate", "omd", "inpo", "online_ipo")


def _check_game(fn: str, pref, logp_sft) -> None:
  if jnp.ndim(pref) != 3 or jnp.shape(pref)[1] != jnp.shape(pref)[2]:
    raise ValueError(f"{fn}: pref must have shape [C, |Y|, |Y|], got {jnp.shape(pref)}")
  if tuple(jnp.shape(logp_sft)) != tuple(jnp.shape(pref)[:2]):
    raise ValueError(f"{fn}: logp_sft must have shape [C, |Y|] = {jnp.shape(pref)[:2]}, got "
                     f"{jnp.shape(logp_sft)}")


def step_sizes(name: str, cfg) -> dict:
  """The shadow's step sizes of method `name`, read from the config (module docstring).

  Returns:
    {'eta': η} for ONPO, {'eta': 1/η_I} for OMD, {'tau': τ, 'eta_inpo': η_I}
    for INPO, {'beta': β} for online IPO, as Python floats.
  """
  if name not in SHADOW_METHODS:
    raise ValueError(f"step_sizes: name must be one of {SHADOW_METHODS}, got {name!r}")
  if name.startswith("onpo"):
    out = {"eta": float(cfg.onpo.eta)}
  elif name == "omd":
    out = {"eta": 1.0 / float(cfg.omd.eta_inpo)}
  elif name == "inpo":
    out = {"tau": float(cfg.inpo.tau), "eta_inpo": float(cfg.inpo.eta_inpo)}
  else:
    out = {"beta": float(cfg.online_ipo.beta)}
  bad = {k: v for k, v in out.items() if not v > 0 and not (k == "tau" and v == 0)}
  if bad:
    raise ValueError(f"step_sizes: {name!r} needs positive step sizes, got {bad}")
  if name == "inpo" and not out["tau"] < out["eta_inpo"]:
    raise ValueError(f"step_sizes: inpo needs 0 <= tau < eta_inpo, got {out}")
  return out


@functools.partial(jax.jit, static_argnames=("name", "num_rounds"))
def _run(name, pref, logp_sft, sizes, num_rounds):
  if name.startswith("onpo"):
    eta = sizes["eta"]

    def body(carry, _):
      logp_aux, reward_prev = carry
      _, logp_aux_next, r = dynamics.onpo_step(pref, logp_aux, reward_prev, eta)
      # π_{t+1} ∝ π'_{t+1} exp(η m_{t+1}), with the predictor m_{t+1} = r_t.
      logp_next = jax.nn.log_softmax(logp_aux_next + eta * r, axis=-1)
      return (logp_aux_next, r), logp_next

    init = (logp_sft, jnp.zeros_like(logp_sft))
  else:
    if name == "omd":
      step = lambda lp: dynamics.omd_step(pref, lp, sizes["eta"])
    elif name == "inpo":
      step = lambda lp: dynamics.inpo_step(pref, lp, logp_sft, sizes["tau"], sizes["eta_inpo"])
    else:
      step = lambda lp: jax.nn.log_softmax(
          logp_sft + dynamics.reward(pref, lp) / sizes["beta"], axis=-1)

    def body(logp, _):
      logp_next = step(logp)
      return logp_next, logp_next

    init = logp_sft
  _, rest = jax.lax.scan(body, init, None, length=num_rounds)
  return jnp.concatenate([logp_sft[None], rest], axis=0)


def shadow_iterates(name: str, cfg, pref: jax.Array, logp_sft: jax.Array,
                    num_rounds: int) -> jax.Array:
  """Every iterate of the tabular shadow: log π_1..π_{T+1}, [T+1, C, |Y|].

  Row 0 is π_1 = π'_1 = the SFT table; row t is the policy after t rounds,
  the counterpart of the neural table after round t.

  Args:
    name: one of `SHADOW_METHODS`.
    cfg: the run config (step sizes, `step_sizes`).
    pref: [C, |Y|, |Y|] P(y ≻ y' | x_c).
    logp_sft: [C, |Y|] log π_SFT (the neural SFT policy's table).
    num_rounds: T ≥ 0.

  Returns:
    [T+1, C, |Y|] log-probabilities (each row log-sums to 0).
  """
  fn = "shadow_iterates"
  if name not in SHADOW_METHODS:
    raise ValueError(f"{fn}: name must be one of {SHADOW_METHODS}, got {name!r}")
  _check_game(fn, pref, logp_sft)
  if not (isinstance(num_rounds, int) and num_rounds >= 0):
    raise ValueError(f"{fn}: num_rounds must be an integer >= 0, got {num_rounds!r}")
  logp_sft = jax.nn.log_softmax(logp_sft, axis=-1)  # exactly normalised in this dtype
  return _run(name, pref, logp_sft, step_sizes(name, cfg), num_rounds)


def tracking_kl(logp_neural: jax.Array, logp_tabular: jax.Array) -> jax.Array:
  """Mean over prompts of KL(π_neural ‖ π_tabular): [..., C, |Y|] -> [...].

  Args:
    logp_neural: [..., C, |Y|] log-probs of the neural iterate(s).
    logp_tabular: the same shape, of the shadow.

  Returns:
    [...] KL in nats (0 when the tables agree).
  """
  if jnp.shape(logp_neural) != jnp.shape(logp_tabular) or jnp.ndim(logp_neural) < 2:
    raise ValueError(f"tracking_kl: logp_neural and logp_tabular must share a [..., C, |Y|] "
                     f"shape, got {jnp.shape(logp_neural)} and {jnp.shape(logp_tabular)}")
  pi = jnp.exp(logp_neural)
  # 0·log 0 = 0: responses the neural policy never plays contribute nothing.
  terms = jnp.where(pi > 0, pi * (logp_neural - logp_tabular), 0.0)
  return jnp.mean(jnp.sum(terms, axis=-1), axis=-1)


def iterate_gaps(pref: jax.Array, logp_iterates: jax.Array) -> dict:
  """Exact duality gaps of the iterates and of their running averages.

  The average iterate after t rounds is the uniform mixture of the first t
  policies in probability space (`tabular.dynamics.average_iterates`), the
  object of the O(1/T) rate (docs/algorithm.md §2, Theorem 2).

  Args:
    pref: [C, |Y|, |Y|].
    logp_iterates: [T, C, |Y|] log π_1..π_T (shadow or neural tables).

  Returns:
    dict of [T] arrays (means over prompts): 'gap' (DualGap(π_t)), 'avg_gap'
    (DualGap of the mixture of π_1..π_t).
  """
  fn = "iterate_gaps"
  if jnp.ndim(logp_iterates) != 3:
    raise ValueError(f"{fn}: logp_iterates must have shape [T, C, |Y|], got "
                     f"{jnp.shape(logp_iterates)}")
  _check_game(fn, pref, logp_iterates[0])
  pis = jnp.exp(logp_iterates)
  return {
      "gap": jnp.mean(dynamics.last_iterate_gaps(pref, pis), axis=-1),
      "avg_gap": jnp.mean(dynamics.average_iterate_gaps(pref, pis), axis=-1),
  }


def shadow_metrics(pref: jax.Array, logp_iterates: jax.Array, logp_sft: jax.Array) -> dict:
  """`evaluation.exact_metrics` of every iterate, plus the average-iterate gap.

  Args:
    pref: [C, |Y|, |Y|].
    logp_iterates: [T, C, |Y|].
    logp_sft: [C, |Y|] (win rates are against it).

  Returns:
    dict of [T] arrays: 'gap', 'gap_max', 'win_rate_vs_sft', 'mass', 'entropy'
    (as `exact_metrics`) and 'avg_gap'.
  """
  out = dict(jax.vmap(lambda lp: evaluation.exact_metrics(pref, lp, logp_sft))(logp_iterates))
  out["avg_gap"] = iterate_gaps(pref, logp_iterates)["avg_gap"]
  return out
