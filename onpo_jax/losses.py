"""Preference-optimisation losses over per-sequence log-probs.

Every loss is a pure function of per-sequence log-probs (see `onpo_jax.logprobs`)
and returns `(loss, metrics)`. Argument suffixes name the policy that produced a
value (docs/baselines.md §3): `policy` (π_θ, trained), `aux` (ONPO's π'),
`prev` (the previous iterate π_t), `ref` (SFT). `_w` / `_l` are the preferred /
dispreferred responses of a pair. Anchor log-probs are constants: they are wrapped
in `stop_gradient` so a caller that forgets to precompute them still gets the
right gradient.

Notation (docs/baselines.md): Δ_A(y) = lp_θ(y) − lp_A(y), L_A = Δ_A(y_w) − Δ_A(y_l).

Every pair loss takes an optional `weights` [N] (≥ 0): the loss is the weighted
mean Σ w_i ℓ_i / Σ w_i (0 when Σ w = 0), so padded pairs (weight 0, e.g. a
tournament that kept no pair) contribute nothing, and exact expectations over
pairs can be written with probability weights. Metrics are weighted the same way.

Hyperparameters use each paper's own symbol (docs/baselines.md §2):
ONPO's η; INPO's η_I (= 1/η of OMD); DPO/IPO's β; SPPO's β (= 1/η of the SPPO
paper). They are checked when concrete (Python numbers or concrete arrays).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------
# Validation and weighting helpers.


def _concrete_value(x) -> Optional[np.ndarray]:
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_param(name: str, value, *, low=None, high=None, low_inclusive=False,
                 high_inclusive=False, fn: str):
  """Raises ValueError when a concrete hyperparameter is outside its range."""
  v = _concrete_value(value)
  if v is None:
    return
  if v.shape != ():
    raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}")
  bad_low = low is not None and (v < low if low_inclusive else v <= low)
  bad_high = high is not None and (v > high if high_inclusive else v >= high)
  if bad_low or bad_high or not np.isfinite(v):
    lo = "" if low is None else f'{low} {"<=" if low_inclusive else "<"} '
    hi = "" if high is None else f' {"<=" if high_inclusive else "<"} {high}'
    raise ValueError(f"{fn}: expected {lo}{name}{hi}, got {name}={float(v)}")


def _check_same_shape(fn: str, ndim: Optional[int] = 1, **arrays):
  names = list(arrays)
  first = names[0]
  shape = jnp.shape(arrays[first])
  if ndim is not None and len(shape) != ndim:
    raise ValueError(f"{fn}: {first} must have {ndim} dim(s), got shape {shape}")
  for name in names:
    a = arrays[name]
    if jnp.shape(a) != shape:
      raise ValueError(
          f"{fn}: {name} must have shape {shape} (like {first}), got {jnp.shape(a)}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      raise ValueError(f"{fn}: {name} must be floating point, got {jnp.result_type(a)}")
  return shape


def _weights(weights, shape, dtype, fn: str) -> jax.Array:
  if weights is None:
    return jnp.ones(shape, dtype)
  if jnp.shape(weights) != tuple(shape):
    raise ValueError(f"{fn}: weights must have shape {tuple(shape)}, got {jnp.shape(weights)}")
  w = _concrete_value(weights)
  if w is not None and np.any(w < 0):
    raise ValueError(f"{fn}: weights must be >= 0 (0 masks a padded pair)")
  return jnp.asarray(weights).astype(dtype)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ w·v / Σ w, and 0 (with zero gradient, no NaN) when Σ w = 0."""
  total = jnp.sum(weights)
  safe = jnp.where(total > 0, total, 1.0)
  # where, not multiply: a non-finite value on a zero-weight pair must not leak.
  num = jnp.sum(jnp.where(weights > 0, weights * values, 0.0))
  return jnp.where(total > 0, num / safe, 0.0)


def _zero_masked(w, *arrays):
  """Replaces values of zero-weight (padded) pairs by 0 before any arithmetic.

  Masking only the final mean is not enough: a NaN/inf log-prob on a padded pair
  would still give NaN gradients through the per-pair loss.
  """
  return [jnp.where(w > 0, a, jnp.zeros_like(a)) for a in arrays]


def _dtype(*arrays):
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _sg(*arrays):
  return [jax.lax.stop_gradient(a) for a in arrays]


def log_ratio_margin(logp_policy_w, logp_policy_l, logp_anchor_w, logp_anchor_l):
  """L_A = [lp_θ(y_w) − lp_θ(y_l)] − [lp_A(y_w) − lp_A(y_l)] (g of docs/algorithm.md §3.2)."""
  return (logp_policy_w - logp_policy_l) - (logp_anchor_w - logp_anchor_l)


def _regression(margin, target, w) -> tuple[jax.Array, Metrics]:
  loss = weighted_mean(jnp.square(margin - target), w)
  metrics = {
      "loss": loss,
      "margin": weighted_mean(margin, w),
      "target": jnp.asarray(target, margin.dtype),
      "frac_past_target": weighted_mean((margin >= target).astype(margin.dtype), w),
      "accuracy": weighted_mean((margin > 0).astype(margin.dtype), w),
      "num_pairs": jnp.sum(w),
  }
  return loss, metrics


def _anchored_regression(fn, anchor, logp_policy_w, logp_policy_l, logp_anchor_w, logp_anchor_l,
                         weights, param, value, target_fn) -> tuple[jax.Array, Metrics]:
  """(L_A − target)² over pairs, shared by the ONPO, OMD and IPO losses.

  Checks run in the same order as each loss's own signature reads: shapes (named
  `logp_{anchor}_w` etc.), then the step-size `param`, then the weights; the
  target is computed only after `value` passed its check (1/(2·0) never runs).
  """
  shape = _check_same_shape(fn, logp_policy_w=logp_policy_w, logp_policy_l=logp_policy_l,
                            **{f"logp_{anchor}_w": logp_anchor_w,
                               f"logp_{anchor}_l": logp_anchor_l})
  _check_param(param, value, low=0, fn=fn)
  dt = _dtype(logp_policy_w, logp_policy_l, logp_anchor_w, logp_anchor_l)
  w = _weights(weights, shape, dt, fn)
  logp_policy_w, logp_policy_l, logp_anchor_w, logp_anchor_l = _zero_masked(
      w, logp_policy_w, logp_policy_l, *_sg(logp_anchor_w, logp_anchor_l))
  margin = log_ratio_margin(logp_policy_w, logp_policy_l, logp_anchor_w,
                            logp_anchor_l).astype(dt)
  return _regression(margin, target_fn(value), w)


# ----------------------------------------------------------------------------
# Regression losses: ONPO, OMD (INPO w/o KL), INPO, IPO.


def onpo_loss(logp_policy_w, logp_policy_l, logp_aux_w, logp_aux_l, *, eta,
              weights=None) -> tuple[jax.Array, Metrics]:
  """ONPO regression loss (arXiv 2502.16852, Algorithm 1; docs/algorithm.md §3).

      g = [lp_θ(y_w) − lp_θ(y_l)] − [lp_{π'}(y_w) − lp_{π'}(y_l)]
      loss = mean over pairs of (g − η/2)²

  Both regressions of a round use this loss with anchor π' (`aux`): π'_t for the
  auxiliary step, π'_{t+1} for the policy step. With pairs drawn from π_t and
  ordered by the oracle (λ_p), the minimiser is anchor · exp(η P(· ≻ π_t)).

  Args:
    logp_policy_w, logp_policy_l: [N] lp_θ of preferred / dispreferred responses.
    logp_aux_w, logp_aux_l: [N] lp of the same responses under the anchor π'.
    eta: ONPO step size η > 0 (target η/2; the paper uses 1/η = 0.01).
    weights: optional [N] pair weights ≥ 0 (0 = padded pair).

  Returns:
    (loss, metrics) with metrics 'margin' (mean g), 'target', 'frac_past_target',
    'accuracy' (fraction with g > 0), 'num_pairs'.
  """
  return _anchored_regression("onpo_loss", "aux", logp_policy_w, logp_policy_l, logp_aux_w,
                              logp_aux_l, weights, "eta", eta, lambda e: e / 2)


def omd_loss(logp_policy_w, logp_policy_l, logp_prev_w, logp_prev_l, *, eta_inpo,
             weights=None) -> tuple[jax.Array, Metrics]:
  """OMD step = INPO without KL (τ = 0) (arXiv 2407.00617; docs/baselines.md §4).

      loss = mean (L_{π_t} − 1/(2η_I))²

  The closed-form step is π_{t+1} ∝ π_t · exp(P(· ≻ π_t)/η_I), i.e. OMD with
  ONPO's η = 1/η_I.

  Args:
    logp_policy_w, logp_policy_l: [N] lp_θ of the pair.
    logp_prev_w, logp_prev_l: [N] lp under the previous iterate π_t.
    eta_inpo: INPO's η_I > 0 (its step size is 1/η_I).
    weights: optional [N] pair weights ≥ 0.
  """
  return _anchored_regression("omd_loss", "prev", logp_policy_w, logp_policy_l, logp_prev_w,
                              logp_prev_l, weights, "eta_inpo", eta_inpo,
                              lambda e: 1.0 / (2.0 * e))


def inpo_loss(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l, logp_prev_w,
              logp_prev_l, *, tau, eta_inpo, weights=None) -> tuple[jax.Array, Metrics]:
  """INPO loss (arXiv 2407.00617, Eq. for the practical loss; docs/baselines.md §4).

      h = [lp_θ(y_w) − lp_θ(y_l)] − (τ/η_I)[lp_ref(y_w) − lp_ref(y_l)]
          − (1 − τ/η_I)[lp_{π_t}(y_w) − lp_{π_t}(y_l)]
      loss = mean (h − 1/(2η_I))²

  Minimiser: π_{t+1} ∝ exp(P(· ≻ π_t)/η_I) · π_ref^{τ/η_I} · π_t^{1 − τ/η_I}.

  Args:
    logp_policy_w, logp_policy_l: [N] lp_θ of the pair.
    logp_ref_w, logp_ref_l: [N] lp under π_ref (SFT).
    logp_prev_w, logp_prev_l: [N] lp under π_t.
    tau: KL coefficient τ with 0 ≤ τ < η_I (the paper uses τ = η_I/3).
    eta_inpo: INPO's η_I > 0 (paper: 0.005).
    weights: optional [N] pair weights ≥ 0.
  """
  fn = "inpo_loss"
  shape = _check_same_shape(
      fn, logp_policy_w=logp_policy_w, logp_policy_l=logp_policy_l, logp_ref_w=logp_ref_w,
      logp_ref_l=logp_ref_l, logp_prev_w=logp_prev_w, logp_prev_l=logp_prev_l)
  _check_param("eta_inpo", eta_inpo, low=0, fn=fn)
  _check_param("tau", tau, low=0, low_inclusive=True, fn=fn)
  tv, ev = _concrete_value(tau), _concrete_value(eta_inpo)
  if tv is not None and ev is not None and not tv < ev:
    raise ValueError(f"{fn}: expected 0 <= tau < eta_inpo, got tau={float(tv)}, "
                     f"eta_inpo={float(ev)}")
  dt = _dtype(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l, logp_prev_w, logp_prev_l)
  w = _weights(weights, shape, dt, fn)
  (logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l, logp_prev_w,
   logp_prev_l) = _zero_masked(w, logp_policy_w, logp_policy_l, *_sg(
       logp_ref_w, logp_ref_l, logp_prev_w, logp_prev_l))
  mix = tau / eta_inpo
  h = ((logp_policy_w - logp_policy_l) - mix * (logp_ref_w - logp_ref_l)
       - (1.0 - mix) * (logp_prev_w - logp_prev_l)).astype(dt)
  return _regression(h, 1.0 / (2.0 * eta_inpo), w)


def ipo_loss(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l, *, beta,
             weights=None) -> tuple[jax.Array, Metrics]:
  """IPO loss (Azar et al., arXiv 2310.12036, Eq. 17): mean (L_ref − 1/(2β))².

  The same function is online IPO (Calandriello et al., arXiv 2403.08635): the
  loss is identical, only the data differ (fresh pairs sampled from π_θ each
  step, ordered by the oracle, instead of a fixed offline data set).

  Args:
    logp_policy_w, logp_policy_l: [N] lp_θ of the pair.
    logp_ref_w, logp_ref_l: [N] lp under π_ref.
    beta: β > 0 (target 1/(2β)).
    weights: optional [N] pair weights ≥ 0.
  """
  return _anchored_regression("ipo_loss", "ref", logp_policy_w, logp_policy_l, logp_ref_w,
                              logp_ref_l, weights, "beta", beta, lambda b: 1.0 / (2.0 * b))


online_ipo_loss = ipo_loss


# ----------------------------------------------------------------------------
# DPO.


def dpo_loss(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l, *, beta,
             label_smoothing=0.0, weights=None) -> tuple[jax.Array, Metrics]:
  """DPO loss with conservative label smoothing (Rafailov et al., arXiv 2305.18290, Eq. 7).

      loss = mean [ −(1 − ε) log σ(β L_ref) − ε log σ(−β L_ref) ]

  Args:
    logp_policy_w, logp_policy_l: [N] lp_θ of the pair.
    logp_ref_w, logp_ref_l: [N] lp under π_ref (SFT).
    beta: β > 0.
    label_smoothing: ε with 0 ≤ ε < 0.5 (probability the label is flipped).
    weights: optional [N] pair weights ≥ 0.

  Returns:
    (loss, metrics) with 'margin' (mean L_ref), 'accuracy' (L_ref > 0),
    'reward_w' / 'reward_l' (mean β Δ_ref), 'num_pairs'.
  """
  fn = "dpo_loss"
  shape = _check_same_shape(fn, logp_policy_w=logp_policy_w, logp_policy_l=logp_policy_l,
                            logp_ref_w=logp_ref_w, logp_ref_l=logp_ref_l)
  _check_param("beta", beta, low=0, fn=fn)
  _check_param("label_smoothing", label_smoothing, low=0, high=0.5, low_inclusive=True, fn=fn)
  dt = _dtype(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l)
  w = _weights(weights, shape, dt, fn)
  logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l = _zero_masked(
      w, logp_policy_w, logp_policy_l, *_sg(logp_ref_w, logp_ref_l))
  margin = log_ratio_margin(logp_policy_w, logp_policy_l, logp_ref_w, logp_ref_l).astype(dt)
  z = beta * margin
  per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  loss = weighted_mean(per_pair, w)
  metrics = {
      "loss": loss,
      "margin": weighted_mean(margin, w),
      "accuracy": weighted_mean((margin > 0).astype(dt), w),
      "reward_w": weighted_mean(beta * (logp_policy_w - logp_ref_w).astype(dt), w),
      "reward_l": weighted_mean(beta * (logp_policy_l - logp_ref_l).astype(dt), w),
      "num_pairs": jnp.sum(w),
  }
  return loss, metrics


# ----------------------------------------------------------------------------
# SPPO.


def sppo_win_rates(win_matrix: jax.Array, *, include_self: bool = True) -> jax.Array:
  """P̂_i = mean_j P(y_i ≻ y_j) over the K samples of each prompt (docs/baselines.md §5).

  Args:
    win_matrix: [P, K, K] with win_matrix[p, i, j] = P(y_i ≻ y_j | x_p) from the
      oracle, any K ≥ 1 (never a Bradley–Terry reduction).
    include_self: average over all K samples j, including j = i (whose exact value
      is 1/2), as in SPPO's estimate of P(y ≻ π_t) from K samples of π_t; False
      averages over the K − 1 others (needs K ≥ 2).

  Returns:
    [P, K] estimated win rates P̂_i.
  """
  if win_matrix.ndim != 3 or win_matrix.shape[1] != win_matrix.shape[2]:
    raise ValueError(
        f"sppo_win_rates: win_matrix must have shape [P, K, K], got {win_matrix.shape}")
  k = win_matrix.shape[-1]
  if include_self:
    return jnp.mean(win_matrix, axis=-1)
  if k < 2:
    raise ValueError("sppo_win_rates: include_self=False needs K >= 2 samples per prompt")
  off_diag = jnp.sum(win_matrix, axis=-1) - jnp.diagonal(win_matrix, axis1=-2, axis2=-1)
  return off_diag / (k - 1)


def sppo_loss(logp_policy, logp_prev, win_rate, *, beta,
              weights=None) -> tuple[jax.Array, Metrics]:
  """SPPO per-sample loss (Wu et al., arXiv 2405.00675, Eq. 4.7 in β = 1/η form).

      loss = weighted mean over samples of (Δ_{π_t}(y) − (P̂(y) − ½)/β)²

  Any shape works (e.g. [P, K]: every sample of every prompt). The pair form of
  docs/baselines.md §5 is `sppo_pair_loss`.

  Args:
    logp_policy: [...] lp_θ of each sample.
    logp_prev: [...] lp of the same samples under π_t.
    win_rate: [...] P̂(y) from `sppo_win_rates`.
    beta: SPPO's β > 0 (= 1/η of the SPPO paper).
    weights: optional [...] sample weights ≥ 0.
  """
  fn = "sppo_loss"
  shape = _check_same_shape(fn, ndim=None, logp_policy=logp_policy, logp_prev=logp_prev,
                            win_rate=win_rate)
  _check_param("beta", beta, low=0, fn=fn)
  dt = _dtype(logp_policy, logp_prev, win_rate)
  w = _weights(weights, shape, dt, fn)
  logp_policy, logp_prev, win_rate = _zero_masked(w, logp_policy, *_sg(logp_prev, win_rate))
  delta = (logp_policy - logp_prev).astype(dt)
  target = ((win_rate - 0.5) / beta).astype(dt)
  loss = weighted_mean(jnp.square(delta - target), w)
  metrics = {
      "loss": loss,
      "log_ratio": weighted_mean(delta, w),
      "target": weighted_mean(target, w),
      "win_rate": weighted_mean(win_rate.astype(dt), w),
      "num_samples": jnp.sum(w),
  }
  return loss, metrics


def sppo_pair_loss(logp_policy_w, logp_policy_l, logp_prev_w, logp_prev_l, win_rate_w,
                   win_rate_l, *, beta, weights=None) -> tuple[jax.Array, Metrics]:
  """SPPO pair form (docs/baselines.md §5): ½[(Δ_w − (P̂_w − ½)/β)² + (Δ_l − (P̂_l − ½)/β)²].

  Args:
    logp_policy_w, logp_policy_l, logp_prev_w, logp_prev_l: [N] log-probs.
    win_rate_w, win_rate_l: [N] P̂ of each response (`sppo_win_rates`).
    beta: SPPO's β > 0.
    weights: optional [N] pair weights ≥ 0.
  """
  fn = "sppo_pair_loss"
  shape = _check_same_shape(fn, logp_policy_w=logp_policy_w, logp_policy_l=logp_policy_l,
                            logp_prev_w=logp_prev_w, logp_prev_l=logp_prev_l,
                            win_rate_w=win_rate_w, win_rate_l=win_rate_l)
  w = None if weights is None else _weights(weights, shape, _dtype(logp_policy_w), fn)
  stack = lambda a, b: jnp.stack([a, b], axis=0)
  # The weighted mean over [2, N] with each pair weight used twice is ½(ℓ_w + ℓ_l).
  return sppo_loss(stack(logp_policy_w, logp_policy_l), stack(logp_prev_w, logp_prev_l),
                   stack(win_rate_w, win_rate_l), beta=beta,
                   weights=None if w is None else stack(w, w))


# ----------------------------------------------------------------------------
# Nash-MD (REINFORCE form).


def nash_md_loss(logp_policy, logp_ref, preference, *, beta,
                 weights=None) -> tuple[jax.Array, Metrics]:
  """Nash-MD policy-gradient surrogate (Munos et al., arXiv 2312.00886, §7; docs/baselines.md §6).

      loss = mean over samples of  β·sg(lp_θ(y) − lp_ref(y))·lp_θ(y) − (P(y ≻ y') − ½)·lp_θ(y)

  with y ~ π_θ and y' from the geometric mixture ∝ π_θ^{1−α} π_ref^{α}. Its
  gradient is the REINFORCE estimate of ∇[β KL(π_θ‖π_ref) − P(π_θ ≻ mixture)],
  using the sequence-level log-ratio. The value itself is a surrogate: only its
  gradient is meaningful.

  Args:
    logp_policy: [N] lp_θ(y) of the policy samples (differentiable).
    logp_ref: [N] lp_ref(y) of the same samples.
    preference: [N] P(y ≻ y') from the oracle, in [0, 1].
    beta: KL coefficient β ≥ 0.
    weights: optional [N] sample weights ≥ 0.
  """
  fn = "nash_md_loss"
  shape = _check_same_shape(fn, logp_policy=logp_policy, logp_ref=logp_ref,
                            preference=preference)
  _check_param("beta", beta, low=0, low_inclusive=True, fn=fn)
  dt = _dtype(logp_policy, logp_ref, preference)
  w = _weights(weights, shape, dt, fn)
  logp_policy, logp_ref, preference = _zero_masked(
      w, logp_policy, *_sg(logp_ref, preference))
  log_ratio = jax.lax.stop_gradient(logp_policy - logp_ref).astype(dt)
  advantage = (preference - 0.5).astype(dt)
  per_sample = (beta * log_ratio - advantage) * logp_policy.astype(dt)
  loss = weighted_mean(per_sample, w)
  metrics = {
      "loss": loss,
      "kl": weighted_mean(log_ratio, w),
      "preference": weighted_mean(preference.astype(dt), w),
      "num_samples": jnp.sum(w),
  }
  return loss, metrics
