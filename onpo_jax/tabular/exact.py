"""Exact quantities of a tabular preference game: win rates, values, duality gaps, Nash.

Notation (ONPO, arXiv 2502.16852; docs/algorithm.md §1): P[c, y, y'] =
P(y ≻ y' | x_c), policies π[c, y]; P(y ≻ π) = E_{y'~π} P(y ≻ y') and
J(π1, π2) = E P(y1 ≻ y2). All functions except `nash_lp` are jittable and
batched over the leading context axis; averages over contexts (E_x with a
uniform prompt distribution) are left to the caller.
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def _check_game(p: jax.Array) -> None:
  if p.ndim != 3 or p.shape[1] != p.shape[2]:
    raise ValueError(f"preference matrix P must have shape [C, n, n], got {p.shape}")


def _check_policy(p: jax.Array, pi: jax.Array, name: str) -> None:
  if pi.shape != p.shape[:2]:
    raise ValueError(f"{name} must have shape [C, n] = {p.shape[:2]}, got {pi.shape}")


def win_rate_vs_policy(p: jax.Array, pi: jax.Array) -> jax.Array:
  """P(y ≻ π | x) for every action y: ONPO's reward r_t (docs/algorithm.md §1.1).

  Args:
    p: [C, n, n] preference matrix.
    pi: [C, n] policy.

  Returns:
    [C, n] win rates.
  """
  _check_game(p)
  _check_policy(p, pi, "pi")
  return jnp.einsum("cij,cj->ci", p, pi)


def preference_value(p: jax.Array, pi1: jax.Array, pi2: jax.Array) -> jax.Array:
  """J(π1, π2) = E_{y1~π1, y2~π2} P(y1 ≻ y2) per context (docs/algorithm.md §1.3).

  Args:
    p: [C, n, n].
    pi1: [C, n] row player's policy.
    pi2: [C, n] column player's policy.

  Returns:
    [C] values.
  """
  _check_game(p)
  _check_policy(p, pi1, "pi1")
  _check_policy(p, pi2, "pi2")
  return jnp.einsum("ci,cij,cj->c", pi1, p, pi2)


def duality_gap(p: jax.Array, pi: jax.Array) -> jax.Array:
  """Unregularised duality gap per context.

  DualGap(π) = max_{π1} J(π1, π) − min_{π2} J(π, π2) (ONPO, arXiv 2502.16852,
  duality gap definition). Both optima are attained at pure strategies and
  J(π, y) = 1 − P(y ≻ π), so per context the gap is 2·max_y P(y ≻ π) − 1
  (docs/algorithm.md §1.4). The paper's E_x-gap is the mean of the result.

  Args:
    p: [C, n, n].
    pi: [C, n].

  Returns:
    [C] gaps, ≥ 0 and = 0 exactly at a Nash equilibrium.
  """
  return 2.0 * jnp.max(win_rate_vs_policy(p, pi), axis=-1) - 1.0


def kl_divergence(pi: jax.Array, pi_ref: jax.Array) -> jax.Array:
  """KL(π ‖ π_ref) over the last axis, with 0·log 0 = 0."""
  if pi.shape != pi_ref.shape:
    raise ValueError(f"pi and pi_ref must have equal shapes, got {pi.shape} and {pi_ref.shape}")
  safe_pi = jnp.where(pi > 0, pi, 1.0)
  return jnp.sum(jnp.where(pi > 0, pi * (jnp.log(safe_pi) - jnp.log(pi_ref)), 0.0), axis=-1)


def kl_duality_gap(p: jax.Array, pi: jax.Array, pi_ref: jax.Array, tau) -> jax.Array:
  """Duality gap of INPO's KL-regularised game, per context.

  J_τ(π1, π2) = E P(y1 ≻ y2) − τ KL(π1‖π_ref) + τ KL(π2‖π_ref) (INPO,
  arXiv 2407.00617; docs/algorithm.md §1.3). The inner optima are Gibbs policies,
  giving the closed form of docs/algorithm.md §1.4:
    2τ·log Σ_y π_ref(y) exp(P(y ≻ π)/τ) + 2τ·KL(π‖π_ref) − 1,
  evaluated with a log-sum-exp so that small τ does not overflow.

  Args:
    p: [C, n, n].
    pi: [C, n].
    pi_ref: [C, n] reference policy (strictly positive).
    tau: τ > 0.

  Returns:
    [C] gaps.
  """
  _check_game(p)
  _check_policy(p, pi_ref, "pi_ref")
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f"tau must be > 0 for the KL-regularised gap, got {tau}")
  r = win_rate_vs_policy(p, pi)
  lse = jax.nn.logsumexp(jnp.log(pi_ref) + r / tau, axis=-1)
  return 2.0 * tau * lse + 2.0 * tau * kl_divergence(pi, pi_ref) - 1.0


def nash_lp(p) -> tuple[np.ndarray, np.ndarray]:
  """Exact Nash equilibrium of each context's game by linear programming.

  Solves max_{π, v} v s.t. J(π, y') = Σ_y π(y) P(y ≻ y') ≥ v for every pure
  y', Σ π = 1, π ≥ 0 (von Neumann's minimax LP). For a symmetric game
  (P + Pᵀ = 1) the value is 1/2 (docs/algorithm.md §1.3).

  Args:
    p: numpy-convertible [C, n, n] preference matrix (not traced).

  Returns:
    (pi, value): [C, n] Nash policies and [C] game values, float64 numpy.

  Raises:
    ValueError: on a bad shape; RuntimeError if the LP solver fails.
  """
  p = np.asarray(p, dtype=np.float64)
  if p.ndim != 3 or p.shape[1] != p.shape[2]:
    raise ValueError(f"preference matrix P must have shape [C, n, n], got {p.shape}")
  num_contexts, n, _ = p.shape
  pis, values = np.zeros((num_contexts, n)), np.zeros(num_contexts)
  cost = np.zeros(n + 1)
  cost[-1] = -1.0  # linprog minimises; maximise v.
  a_eq = np.concatenate([np.ones((1, n)), np.zeros((1, 1))], axis=1)
  bounds = [(0.0, None)] * n + [(None, None)]
  for c in range(num_contexts):
    # v − Σ_y π(y) P(y, y') ≤ 0 for every column y'.
    a_ub = np.concatenate([-p[c].T, np.ones((n, 1))], axis=1)
    res = scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0],
                                 bounds=bounds, method="highs")
    if res.status != 0:
      raise RuntimeError(f"nash_lp: linprog failed on context {c}: {res.message}")
    pi = np.clip(res.x[:n], 0.0, None)
    pis[c] = pi / pi.sum()
    values[c] = res.x[-1]
  return pis, values
