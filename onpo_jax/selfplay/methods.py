"""The method table: each method's loss, anchors and training data, and typed batches.

A method is a row of `METHODS` (docs/baselines.md has the formulas):

  name              data      anchors       loss (onpo_jax.losses)
  onpo_two_step     pairs     aux           onpo_loss, two regressions per round
  onpo_extrapolate  pairs     aux           onpo_loss, one regression + extrapolation
  omd               pairs     prev          omd_loss (INPO without KL)
  inpo              pairs     ref, prev     inpo_loss
  sppo              samples   prev          sppo_loss on per-sample win rates P̂
  dpo               pairs     ref           dpo_loss on best-vs-worst (tournament) pairs
  online_ipo        pairs     ref           online_ipo_loss on fresh λ_p pairs (pinned)
  nash_md           mixture   ref           nash_md_loss vs a mixture opponent

Losses take per-sequence log-probs as typed tuples (`PairLogps` for pair
methods, a plain [B] array for the others) so that the same loss serves a
sampled minibatch and an exact expectation over enumerated responses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Union

import jax

from onpo_jax import losses
from onpo_jax import pairs as pairs_lib
from onpo_jax.infra import checks


class PairBatch(NamedTuple):
  """Training pairs: full sequences (prompt + response) of the chosen (w) and rejected (l) side.

  Attributes:
    tok_w, attn_w, resp_w: [B, S] tokens, attention mask, scored-token mask of y_w.
    tok_l, attn_l, resp_l: the same for y_l.
    weight: [B] pair weights (0 = padding or a dropped pair).
  """

  tok_w: jax.Array
  attn_w: jax.Array
  resp_w: jax.Array
  tok_l: jax.Array
  attn_l: jax.Array
  resp_l: jax.Array
  weight: jax.Array


class SampleBatch(NamedTuple):
  """Single responses with a per-sample target.

  Attributes:
    tok, attn, resp: [B, S] tokens, attention mask, scored-token mask.
    target: [B] SPPO's win rate P̂(y ≻ π_t) or Nash-MD's P(y ≻ y'_mixture).
    weight: [B] sample weights.
  """

  tok: jax.Array
  attn: jax.Array
  resp: jax.Array
  target: jax.Array
  weight: jax.Array


Batch = Union[PairBatch, SampleBatch]


class PairLogps(NamedTuple):
  """Per-sequence log-probs of both sides of each pair: w [B], l [B]."""

  w: jax.Array
  l: jax.Array


Logps = Union[PairLogps, jax.Array]
# loss(config, logp_policy, {anchor name: logp_anchor}, target, weights) -> (loss, metrics)
LossFn = Callable[[Any, Logps, dict, Any, jax.Array], tuple]


def _onpo(cfg, lp: PairLogps, anchors, target, w):
  del target
  aux = anchors["aux"]
  return losses.onpo_loss(lp.w, lp.l, aux.w, aux.l, eta=cfg.onpo.eta, weights=w)


def _omd(cfg, lp: PairLogps, anchors, target, w):
  del target
  prev = anchors["prev"]
  return losses.omd_loss(lp.w, lp.l, prev.w, prev.l, eta_inpo=cfg.omd.eta_inpo, weights=w)


def _inpo(cfg, lp: PairLogps, anchors, target, w):
  del target
  ref, prev = anchors["ref"], anchors["prev"]
  return losses.inpo_loss(lp.w, lp.l, ref.w, ref.l, prev.w, prev.l, tau=cfg.inpo.tau,
                          eta_inpo=cfg.inpo.eta_inpo, weights=w)


def _dpo(cfg, lp: PairLogps, anchors, target, w):
  del target
  ref = anchors["ref"]
  return losses.dpo_loss(lp.w, lp.l, ref.w, ref.l, beta=cfg.dpo.beta,
                         label_smoothing=cfg.dpo.label_smoothing, weights=w)


def _online_ipo(cfg, lp: PairLogps, anchors, target, w):
  del target
  ref = anchors["ref"]
  return losses.online_ipo_loss(lp.w, lp.l, ref.w, ref.l, beta=cfg.online_ipo.beta, weights=w)


def _sppo(cfg, lp, anchors, win_rate, w):
  return losses.sppo_loss(lp, anchors["prev"], win_rate, beta=cfg.sppo.beta, weights=w)


def _nash_md(cfg, lp, anchors, preference, w):
  return losses.nash_md_loss(lp, anchors["ref"], preference, beta=cfg.nash_md.beta, weights=w)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What a method trains on and against which anchors.

  Attributes:
    loss: `LossFn` of the method.
    data: 'pairs' (PairBatch), 'samples' (SampleBatch with SPPO win rates) or
      'mixture' (SampleBatch with Nash-MD preferences vs mixture opponents).
    anchors: anchor names among 'aux' (ONPO's π'), 'prev' (π_t), 'ref' (SFT).
    variant: `onpo_step` variant ('two_step' | 'extrapolate'); None = a
      single regression with a fresh inner optimizer each round.
    fixed_pairing: the pairing this method is defined with, overriding
      `config.selfplay.pairing` (None = the configured one).
  """

  loss: LossFn
  data: str
  anchors: tuple[str, ...]
  variant: str | None = None
  fixed_pairing: str | None = None

  @property
  def phases(self) -> tuple[str, ...]:
    """Regressions of one round, by name: ('aux', 'policy'), ('aux',) or ('policy',)."""
    return {"two_step": ("aux", "policy"), "extrapolate": ("aux",)}.get(self.variant,
                                                                         ("policy",))


METHODS = {
    "onpo_two_step": MethodSpec(_onpo, "pairs", ("aux",), variant="two_step"),
    "onpo_extrapolate": MethodSpec(_onpo, "pairs", ("aux",), variant="extrapolate"),
    "omd": MethodSpec(_omd, "pairs", ("prev",)),
    "inpo": MethodSpec(_inpo, "pairs", ("ref", "prev")),
    "sppo": MethodSpec(_sppo, "samples", ("prev",)),
    # Iterative DPO trains on best-vs-worst of K (docs/baselines.md).
    "dpo": MethodSpec(_dpo, "pairs", ("ref",), fixed_pairing="tournament"),
    # Online IPO is defined on fresh λ_p pairs from the current policy (docs/baselines.md).
    "online_ipo": MethodSpec(_online_ipo, "pairs", ("ref",), fixed_pairing="lambda_p"),
    "nash_md": MethodSpec(_nash_md, "mixture", ("ref",)),
}


def pairing(name: str, configured: str) -> str:
  """The pairing method `name` trains on, given `config.selfplay.pairing`."""
  return METHODS[name].fixed_pairing or configured


# Counts and seeds reach JAX as int32 (shapes, loop bounds, PRNG keys): a larger
# value overflows or, for a PRNG seed, silently wraps onto another seed.
INT_MAX = 2**31 - 1
LOGP_REDUCTIONS = ("sum", "mean")
INIT_FROM = ("anchor", "policy")


def is_int(value: Any, minimum: int = 0) -> bool:
  """Whether `value` is an int in [minimum, INT_MAX], not a bool (`checks.is_int`)."""
  return checks.is_int(value, minimum, INT_MAX)


def is_names(value: Any) -> bool:
  """Whether `value` is a tuple or list of strings (a config's list of choices)."""
  return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


def validate_selfplay(sp, need, *, num_samples_expected: str = "K >= 2") -> None:
  """Checks of the `selfplay` section shared by every job.

  Types are checked before ranges, so that a wrong type is named by `need`
  rather than failing in a comparison.

  Args:
    sp: the `selfplay` config section.
    need: the job's `need(ok, field, expected, got)`, raising ValueError in the
      job's wording when `ok` is false.
    num_samples_expected: what the message says `selfplay.num_samples` must be.
  """
  need(is_int(sp.num_samples, 2), "selfplay.num_samples", num_samples_expected, sp.num_samples)
  need(is_names(sp.methods) and len(sp.methods) >= 1
       and len(set(sp.methods)) == len(sp.methods), "selfplay.methods",
       "a non-empty tuple of method names without duplicates", sp.methods)
  for m in sp.methods:
    need(m in METHODS, "selfplay.methods", f"names among {sorted(METHODS)}", m)
  need(sp.pairing in pairs_lib.PAIRINGS, "selfplay.pairing", f"one of {pairs_lib.PAIRINGS}",
       sp.pairing)
  mode = sp.get("tournament_mode", "deterministic")
  need(mode in pairs_lib.COMPARISON_MODES, "selfplay.tournament_mode",
       f"one of {pairs_lib.COMPARISON_MODES}", mode)
  for field in ("num_rounds", "prompts_per_round", "epochs", "minibatch_size"):
    need(is_int(sp[field], 1), f"selfplay.{field}", "an integer >= 1 (below 2**31)", sp[field])
  for field in ("learning_rate", "temperature"):
    need(checks.is_real(sp[field]) and sp[field] > 0, f"selfplay.{field}", "a finite number > 0",
         sp[field])
  need(sp.logp_reduction in LOGP_REDUCTIONS, "selfplay.logp_reduction",
       f"one of {LOGP_REDUCTIONS}", sp.logp_reduction)
  need(sp.init_from in INIT_FROM, "selfplay.init_from", f"one of {INIT_FROM}", sp.init_from)


def validate_method_params(config, need) -> None:
  """Checks of the methods' hyperparameter sections (`onpo`, `omd`, `inpo`, `sppo`,
  `dpo`, `online_ipo`, `nash_md`), which every job's config has.

  Args:
    config: the job's config.
    need: the job's `need(ok, field, expected, got)` (see `validate_selfplay`).
  """
  for field in ("onpo.eta", "omd.eta_inpo", "inpo.eta_inpo", "sppo.beta", "dpo.beta",
                "online_ipo.beta"):
    section, key = field.split(".")
    value = config[section][key]
    need(checks.is_real(value) and value > 0, field, "a finite number > 0", value)
  tau, eta_inpo = config.inpo.tau, config.inpo.eta_inpo
  need(checks.is_real(tau) and 0 <= tau < eta_inpo, "inpo.tau",
       f"0 <= τ < inpo.eta_inpo = {eta_inpo}", tau)
  smoothing = config.dpo.label_smoothing
  need(checks.is_real(smoothing) and 0 <= smoothing < 0.5, "dpo.label_smoothing", "ε in [0, 0.5)",
       smoothing)
  alpha, beta = config.nash_md.alpha, config.nash_md.beta
  need(checks.is_real(alpha) and 0 <= alpha <= 1, "nash_md.alpha", "α in [0, 1]", alpha)
  need(checks.is_real(beta) and beta >= 0, "nash_md.beta", "β >= 0 (finite)", beta)
