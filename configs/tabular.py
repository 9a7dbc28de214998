r"""Tabular ONPO vs baselines on an exact preference game (ONPO, arXiv 2502.16852).

Run:
    python -m experiments.run --config=configs/tabular.py --workdir=runs/tabular
CPU smoke test (seconds):
    python -m experiments.run --config=configs/tabular.py:tiny --workdir=runs/tabular_tiny

Step sizes follow the theory with D = log n (= max KL(π‖π_1) for uniform π_1):
ONPO η = min(1/2, √D) (Theorem 2), OMD η = √(D/T) re-tuned per horizon T
(Theorem 1). INPO's η_I is the inverse of a step size (docs/algorithm.md §2.4).
"""

import math

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the tabular config; `arg='tiny'` shrinks it for CPU tests."""
  tiny = common.parse_arg(arg, tiny=False).tiny
  c = ml_collections.ConfigDict()
  c.experiment = "tabular"  # Dispatch key in onpo_jax.main.EXPERIMENTS.
  c.seed = 0  # PRNG seed of the game.
  c.dtype = "float64"  # Gaps reach 1e-4 at T = 1e4; float64 keeps them exact.
  c.game = "random"  # P: one of onpo_jax.tabular.games.GAMES.
  c.game_params = ml_collections.ConfigDict()  # Extra kwargs of the game (e.g. strength).
  # π_1 (= π'_1 = π_ref): 'uniform' as in the theory (D = log n), or 'random', a
  # Dirichlet(1) draw per context (needed on RPS, whose uniform policy is already Nash).
  c.init = "uniform"
  c.num_actions = 4 if tiny else 6  # n = |Y|, responses per prompt.
  c.num_contexts = 2 if tiny else 4  # C, prompts x (each has its own game).
  c.num_rounds = 200 if tiny else 10_000  # T, rounds of self-play.
  c.num_eval_points = 10 if tiny else 25  # Log-spaced T values that are logged.
  # Rates are asymptotic: slopes of log gap vs log T are fitted over T ≥ this.
  c.fit_min_rounds = 10 if tiny else 100
  c.methods = ("onpo", "omd", "inpo", "nash_md", "extragradient")  # Dynamics to run.

  d = math.log(c.num_actions)  # D = log n.
  c.onpo = ml_collections.ConfigDict()
  c.onpo.eta = min(0.5, math.sqrt(d))  # η of ONPO, Theorem 2.
  c.omd = ml_collections.ConfigDict()
  c.omd.horizon_tuned = True  # η = √(D/T) for each logged T (Theorem 1); else fixed `eta`.
  c.omd.eta = math.sqrt(d / c.num_rounds)  # η used when horizon_tuned is False.
  c.inpo = ml_collections.ConfigDict()
  c.inpo.eta_inpo = 2.0  # η_I, INPO's KL-to-π_t weight; step size 1/η_I.
  c.inpo.tau = 0.01  # τ, KL-to-π_ref weight (π_ref = π_1 = uniform); needs τ ≤ η_I.
  c.nash_md = ml_collections.ConfigDict()
  c.nash_md.eta = 0.5  # η, Nash-MD step size (Munos et al. 2023).
  c.nash_md.tau = 0.01  # τ, KL-to-π_ref weight; mixture weight β = ητ.
  c.extragradient = ml_collections.ConfigDict()
  c.extragradient.eta = 0.5  # η of the mirror-prox (EGPO-style) step.
  c.extragradient.tau = 0.0  # τ, KL-to-π_ref weight; 0 targets the unregularised Nash.
  return c
