"""Plain-numpy references for log-probs, losses and tabular ONPO/INPO dynamics.

Written independently of `onpo_jax` (loops and explicit formulas, float64), so the
tests compare two implementations, not one implementation with itself.
"""

import math

import numpy as np


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def sequence_logprobs(logits, tokens, response_mask, reduction="sum"):
  """Loop over (b, t): token t of sequence b is scored by logits[b, t - 1]."""
  b_size, length, _ = logits.shape
  out = np.zeros(b_size)
  for b in range(b_size):
    total, count = 0.0, 0
    for t in range(1, length):
      if response_mask[b, t]:
        total += log_softmax(logits[b, t - 1])[tokens[b, t]]
        count += 1
    out[b] = total if reduction == "sum" else (total / count if count else 0.0)
  return out


def masked_entropy(logits, response_mask):
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(1, logits.shape[1]):
      if response_mask[b, t]:
        lp = log_softmax(logits[b, t - 1])
        total += -np.sum(np.exp(lp) * lp)
        count += 1
  return total / max(count, 1)


def _wmean(values, weights):
  weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
  s = weights.sum()
  return float((weights * values).sum() / s) if s > 0 else 0.0


def onpo_loss(pw, pl, aw, al, eta, weights=None):
  g = (np.asarray(pw) - pl) - (np.asarray(aw) - al)
  return _wmean((g - eta / 2.0) ** 2, weights)


def omd_loss(pw, pl, prev_w, prev_l, eta_inpo, weights=None):
  g = (np.asarray(pw) - pl) - (np.asarray(prev_w) - prev_l)
  return _wmean((g - 1.0 / (2.0 * eta_inpo)) ** 2, weights)


def inpo_loss(pw, pl, rw, rl, prev_w, prev_l, tau, eta_inpo, weights=None):
  a = tau / eta_inpo
  h = (np.asarray(pw) - pl) - a * (np.asarray(rw) - rl) - (1 - a) * (np.asarray(prev_w) - prev_l)
  return _wmean((h - 1.0 / (2.0 * eta_inpo)) ** 2, weights)


def ipo_loss(pw, pl, rw, rl, beta, weights=None):
  g = (np.asarray(pw) - pl) - (np.asarray(rw) - rl)
  return _wmean((g - 1.0 / (2.0 * beta)) ** 2, weights)


def dpo_loss(pw, pl, rw, rl, beta, eps, weights=None):
  z = beta * ((np.asarray(pw) - pl) - (np.asarray(rw) - rl))
  per = [-(1 - eps) * math.log(1 / (1 + math.exp(-v))) - eps * math.log(1 / (1 + math.exp(v)))
         for v in z]
  return _wmean(np.array(per), weights)


def sppo_win_rates(win, include_self=True):
  p, k, _ = win.shape
  out = np.zeros((p, k))
  for a in range(p):
    for i in range(k):
      js = [j for j in range(k) if include_self or j != i]
      out[a, i] = sum(win[a, i, j] for j in js) / len(js)
  return out


def sppo_pair_loss(pw, pl, prev_w, prev_l, win_w, win_l, beta, weights=None):
  lw = ((np.asarray(pw) - prev_w) - (np.asarray(win_w) - 0.5) / beta) ** 2
  ll = ((np.asarray(pl) - prev_l) - (np.asarray(win_l) - 0.5) / beta) ** 2
  return _wmean(0.5 * (lw + ll), weights)


def nash_md_loss(lp, lp_ref, pref, beta, weights=None):
  lp = np.asarray(lp)
  return _wmean(beta * (lp - lp_ref) * lp - (np.asarray(pref) - 0.5) * lp, weights)


def nash_md_grad(lp, lp_ref, pref, beta, weights=None):
  """d loss / d lp_θ with the log-ratio held fixed (the REINFORCE gradient)."""
  w = np.ones_like(lp) if weights is None else np.asarray(weights, np.float64)
  return w * (beta * (np.asarray(lp) - lp_ref) - (np.asarray(pref) - 0.5)) / w.sum()


# Tabular dynamics, docs/algorithm.md §2, in probability space per prompt.


def normalize(p):
  return p / p.sum(axis=-1, keepdims=True)


def win_rate_vs(pmat, pi):
  """r(y) = P(y ≻ π) = Σ_y' P(y ≻ y') π(y'), per prompt: pmat [P, Y, Y], pi [P, Y]."""
  return np.einsum("pij,pj->pi", pmat, pi)


def onpo_tabular_round(pi_aux, pi, pmat, eta):
  """One ONPO round: π'_{t+1} ∝ π'_t e^{η r_t}, π_{t+1} ∝ π'_{t+1} e^{η r_t}."""
  r = win_rate_vs(pmat, pi)
  new_aux = normalize(pi_aux * np.exp(eta * r))
  return new_aux, normalize(new_aux * np.exp(eta * r))


def inpo_tabular_step(pi, pi_ref, pmat, tau, eta_inpo):
  """π_{t+1} ∝ exp(P(y ≻ π_t)/η_I) π_ref^{τ/η_I} π_t^{1 − τ/η_I}."""
  r = win_rate_vs(pmat, pi)
  a = tau / eta_inpo
  return normalize(np.exp(r / eta_inpo) * pi_ref ** a * pi ** (1 - a))


def random_preference(rng, prompts, n):
  """Random general (possibly intransitive) preference: P + Pᵀ = 1, diag ½."""
  u = rng.uniform(size=(prompts, n, n))
  upper = np.triu(u, 1)
  return upper + np.transpose(np.triu(1 - u, 1), (0, 2, 1)) + 0.5 * np.eye(n)
