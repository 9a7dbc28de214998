"""Preference-pair builders over K sampled responses per prompt (docs/algorithm.md §4).

Every builder works on response *indices* in [0, K) for each of N prompts and
asks a `compare_fn(key, i, j) -> bool [N, m]` (True where response i beats
response j, one Bernoulli oracle query per entry) for labels, so the pairing
logic is independent of how responses are represented. `oracle_compare_fn`
builds such a function from an `onpo_jax.oracles.Oracle` and a token batch: a
`PreferenceCompare`, which also gives the builders the probability behind each
label, so that a builder can compare deterministically where the published
pipelines do (`COMPARISON_MODES`).

Builders return `Pairs` (chosen/rejected indices and a 0/1 weight, all [N, M])
and the static number of oracle queries per prompt:

* `tournament` (INPO, arXiv 2407.00617 §5; the paper's practice): a first round
  of ⌊K/2⌋ pairs; winners play winners and losers play losers, round by round,
  down to an overall winner W and loser L; one more comparison W vs L, and the
  pair (W, L) is kept only if W wins it. With K a power of two this is K/2 +
  2(K/2 − 1) + 1 = 3K/2 − 1 comparisons (11 for K = 8). Other K use byes: an
  odd player out passes to the next level unplayed; after the first round the
  odd one out enters both brackets. If that leaves W == L the pair is dropped.
  Comparisons: ⌊K/2⌋ + 2(⌈K/2⌉ − 1) + 1. Deterministic by default (mode
  "deterministic", as INPO's and RLHFlow's annotation scripts compare with the
  judge's probability): a game goes to i when P(y_i ≻ y_j) ≥ ½ (a tie to the
  first of the two), and the final check keeps (W, L) only when P(W ≻ L) > ½.
  Mode "bernoulli" draws every game and the final check instead.
* `lambda_p`: one uniformly random pair (i ≠ j) per prompt, ordered by one
  Bernoulli draw of P(y_i ≻ y_j) (the λ_p of docs/algorithm.md §1.2; the theory's
  assumption). 1 comparison.
* `all_pairs`: every unordered pair i < j once, each ordered by a Bernoulli
  draw. K(K − 1)/2 comparisons.

`lambda_p` and `all_pairs` always draw: the λ_p distribution of a pair is the
Bernoulli label (docs/algorithm.md §4.2, §4.3).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

CompareFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (i [N, m], j [N, m]) -> [N, m] P(y_i ≻ y_j | x).
PreferenceFn = Callable[[jax.Array, jax.Array], jax.Array]

PAIRINGS = ("tournament", "lambda_p", "all_pairs")
# "deterministic": i wins iff P(y_i ≻ y_j) ≥ ½ (a tie goes to i, the first);
# "bernoulli": i wins with probability P(y_i ≻ y_j), one draw per comparison.
COMPARISON_MODES = ("deterministic", "bernoulli")


class Pairs(NamedTuple):
  """Ordered preference pairs per prompt.

  Attributes:
    chosen: [N, M] int32 index of y_w among the K responses of the prompt.
    rejected: [N, M] int32 index of y_l.
    weight: [N, M] float32, 1 for a kept pair, 0 for a dropped one.
  """

  chosen: jax.Array
  rejected: jax.Array
  weight: jax.Array


class PreferenceCompare:
  """A `CompareFn` backed by the probabilities P(y_i ≻ y_j | x) of a `PreferenceFn`.

  Called as a `CompareFn` it draws one Bernoulli label per entry: i wins where
  u < P with u ~ U[0, 1) from `key` (as `onpo_jax.oracles.compare`). Builders
  that compare otherwise call `wins`.
  """

  def __init__(self, preference_fn: PreferenceFn):
    self.preference_fn = preference_fn

  def __call__(self, key: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    return self.wins(key, i, j, "bernoulli")

  def wins(self, key: jax.Array, i: jax.Array, j: jax.Array, mode: str = "bernoulli",
           tie_to_first: bool = True) -> jax.Array:
    """[N, m] bool, True where y_i beats y_j.

    Args:
      key: PRNG key (used by "bernoulli" only).
      i, j: [N, m] response indices.
      mode: one of `COMPARISON_MODES`.
      tie_to_first: "deterministic" only: whether P == ½ exactly counts as a win
        of i.
    """
    _check_mode(mode)
    p = self.preference_fn(i, j)
    if mode == "bernoulli":
      return jax.random.uniform(key, p.shape, dtype=p.dtype) < p
    return p >= 0.5 if tie_to_first else p > 0.5


def _check_mode(mode: str) -> str:
  if mode not in COMPARISON_MODES:
    raise ValueError(f"mode must be one of {COMPARISON_MODES}; got {mode!r}")
  return mode


def _check_k(k: int, name: str = "k") -> int:
  if int(k) != k or k < 2:
    raise ValueError(f"{name} (responses per prompt) must be an integer >= 2; got {k}")
  return int(k)


def tournament_num_comparisons(k: int) -> int:
  """Oracle queries per prompt of `tournament` with K responses."""
  k = _check_k(k)
  return k // 2 + 2 * ((k + 1) // 2 - 1) + 1


def _play(compare_fn: CompareFn, key: jax.Array, i: jax.Array, j: jax.Array):
  """One batch of games: returns (winners, losers), each shaped like i."""
  i_wins = compare_fn(key, i, j)
  return jnp.where(i_wins, i, j), jnp.where(i_wins, j, i)


def tournament(compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int,
               mode: str = "deterministic"):
  """INPO's knockout tournament (module docstring): best-vs-worst pair per prompt.

  Args:
    compare_fn: (key, i [N, m], j [N, m]) -> [N, m] bool, True where i wins. A
      `PreferenceCompare` (e.g. from `oracle_compare_fn`) is compared as `mode`
      says; any other compare_fn is used as given in every game and the final
      check.
    key: PRNG key for the oracle draws.
    num_prompts: N.
    k: K responses per prompt, >= 2.
    mode: one of `COMPARISON_MODES`; "deterministic" (the published pipelines)
      gives the same pairs for every key: a game goes to the first response on a
      tie, and the final check keeps (W, L) only if P(W ≻ L) > ½ (INPO's
      annotation script drops a pair whose check is a tie).

  Returns:
    (Pairs with M = 1, comparisons per prompt).
  """
  k = _check_k(k)
  _check_mode(mode)
  if isinstance(compare_fn, PreferenceCompare):
    game = lambda key, i, j: compare_fn.wins(key, i, j, mode, tie_to_first=True)
    final = lambda key, i, j: compare_fn.wins(key, i, j, mode, tie_to_first=False)
  else:
    game = final = compare_fn
  n = int(num_prompts)
  players = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k))
  level = 0

  def next_key():
    nonlocal level
    level += 1
    return jax.random.fold_in(key, level)

  half = k // 2
  winners, losers = _play(game, next_key(), players[:, 0:2 * half:2], players[:, 1:2 * half:2])
  if k % 2:
    bye = players[:, -1:]
    winners = jnp.concatenate([winners, bye], axis=1)
    losers = jnp.concatenate([losers, bye], axis=1)
  # Both brackets have the same size, so each level is one oracle call.
  while winners.shape[1] > 1:
    m = winners.shape[1] // 2
    both_i = jnp.concatenate([winners[:, 0:2 * m:2], losers[:, 0:2 * m:2]], axis=1)
    both_j = jnp.concatenate([winners[:, 1:2 * m:2], losers[:, 1:2 * m:2]], axis=1)
    w, l = _play(game, next_key(), both_i, both_j)
    new_winners, new_losers = w[:, :m], l[:, m:]
    if winners.shape[1] % 2:
      new_winners = jnp.concatenate([new_winners, winners[:, -1:]], axis=1)
      new_losers = jnp.concatenate([new_losers, losers[:, -1:]], axis=1)
    winners, losers = new_winners, new_losers
  best, worst = winners, losers
  confirmed = final(next_key(), best, worst)
  weight = (confirmed & (best != worst)).astype(jnp.float32)
  return Pairs(chosen=best, rejected=worst, weight=weight), tournament_num_comparisons(k)


def lambda_p(compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int):
  """λ_p pairs: one random pair per prompt ordered by a Bernoulli draw of P.

  Args:
    compare_fn: as in `tournament`.
    key: PRNG key (pair choice and oracle draw).
    num_prompts: N.
    k: K responses per prompt, >= 2.

  Returns:
    (Pairs with M = 1 and all weights 1, 1 comparison per prompt).
  """
  k = _check_k(k)
  k_i, k_j, k_cmp = jax.random.split(key, 3)
  i = jax.random.randint(k_i, (num_prompts, 1), 0, k, dtype=jnp.int32)
  # j uniform over the K − 1 other responses.
  j = (i + 1 + jax.random.randint(k_j, (num_prompts, 1), 0, k - 1, dtype=jnp.int32)) % k
  w, l = _play(compare_fn, k_cmp, i, j)
  return Pairs(chosen=w, rejected=l, weight=jnp.ones(w.shape, jnp.float32)), 1


def all_pairs(compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int):
  """Every unordered pair once, ordered by one Bernoulli draw each.

  Args:
    compare_fn: as in `tournament`.
    key: PRNG key for the oracle draws.
    num_prompts: N.
    k: K responses per prompt, >= 2.

  Returns:
    (Pairs with M = K(K−1)/2, K(K−1)/2 comparisons per prompt).
  """
  k = _check_k(k)
  ii, jj = jnp.triu_indices(k, 1)
  i = jnp.broadcast_to(ii.astype(jnp.int32), (num_prompts, ii.shape[0]))
  j = jnp.broadcast_to(jj.astype(jnp.int32), (num_prompts, jj.shape[0]))
  w, l = _play(compare_fn, key, i, j)
  return Pairs(chosen=w, rejected=l, weight=jnp.ones(w.shape, jnp.float32)), int(ii.shape[0])


def num_pairs_per_prompt(pairing: str, k: int) -> int:
  """M, the number of pairs per prompt a builder returns."""
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}; got {pairing!r}")
  return k * (k - 1) // 2 if pairing == "all_pairs" else 1


def build_pairs(pairing: str, compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int,
                *, tournament_mode: str = "deterministic"):
  """Dispatches to the builder named `pairing` (one of `PAIRINGS`).

  Args:
    pairing: the builder.
    compare_fn, key, num_prompts, k: as in the builders.
    tournament_mode: `tournament`'s `mode` (`COMPARISON_MODES`); `lambda_p` and
      `all_pairs` always draw Bernoulli labels.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}; got {pairing!r}")
  _check_mode(tournament_mode)
  if pairing == "tournament":
    return tournament(compare_fn, key, num_prompts, k, mode=tournament_mode)
  return {"lambda_p": lambda_p, "all_pairs": all_pairs}[pairing](compare_fn, key, num_prompts, k)


def oracle_preference_fn(oracle, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                         responses: jax.Array, response_mask: jax.Array) -> PreferenceFn:
  """P(y_i ≻ y_j | x) from `oracle` on K responses per prompt.

  Args:
    oracle: an `onpo_jax.oracles.Oracle`.
    prompt_tokens: [N, P] left-padded prompts.
    prompt_mask: [N, P] bool.
    responses: [N, K, R] right-padded responses.
    response_mask: [N, K, R] bool.

  Returns:
    preference_fn(i [N, m], j [N, m]) -> [N, m] probabilities, one batched
    oracle call per use.
  """
  n, _, r = responses.shape

  def preference_fn(i, j):
    m = i.shape[1]
    take = lambda arr, idx: jnp.take_along_axis(arr, idx[:, :, None], axis=1).reshape(n * m, r)
    rep = lambda arr: jnp.repeat(arr, m, axis=0)
    p = oracle.preference_prob(rep(prompt_tokens), rep(prompt_mask), take(responses, i),
                               take(response_mask, i), take(responses, j), take(response_mask, j))
    return jnp.asarray(p).reshape(n, m)

  return preference_fn


def oracle_compare_fn(oracle, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, response_mask: jax.Array) -> PreferenceCompare:
  """A `compare_fn` querying `oracle` on K responses per prompt.

  Args:
    oracle: an `onpo_jax.oracles.Oracle`.
    prompt_tokens: [N, P] left-padded prompts.
    prompt_mask: [N, P] bool.
    responses: [N, K, R] right-padded responses.
    response_mask: [N, K, R] bool.

  Returns:
    A `PreferenceCompare`: called as compare_fn(key, i [N, m], j [N, m]) it
    returns [N, m] bool Bernoulli(P(y_i ≻ y_j | x)) labels; `tournament` reads
    its probabilities to compare deterministically.
  """
  return PreferenceCompare(oracle_preference_fn(oracle, prompt_tokens, prompt_mask, responses,
                                                response_mask))
