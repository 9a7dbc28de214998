"""Preference-pair builders over K sampled responses per prompt (ONPO_SPEC.md §4).

Every builder works on response *indices* in [0, K) for each of N prompts and
asks a `compare_fn(key, i, j) -> bool [N, m]` (True where response i beats
response j, one Bernoulli oracle query per entry) for labels, so the pairing
logic is independent of how responses are represented. `oracle_compare_fn`
builds such a function from an `onpo_jax.oracle.Oracle` and a token batch.

Builders return `Pairs` (chosen/rejected indices and a 0/1 weight, all [N, M])
and the static number of oracle queries per prompt:

* `tournament` (INPO, arXiv 2407.00617 §5; the paper's practice): a first round
  of ⌊K/2⌋ pairs; winners play winners and losers play losers, round by round,
  down to an overall winner W and loser L; one more comparison W vs L, and the
  pair (W, L) is kept only if W wins it. With K a power of two this is K/2 +
  2(K/2 − 1) + 1 = 3K/2 − 1 comparisons (11 for K = 8). Other K use byes: an
  odd player out passes to the next level unplayed; after the first round the
  odd one out enters both brackets. If that leaves W == L the pair is dropped.
  Comparisons: ⌊K/2⌋ + 2(⌈K/2⌉ − 1) + 1.
* `lambda_p`: one uniformly random pair (i ≠ j) per prompt, ordered by one
  Bernoulli draw of P(y_i ≻ y_j) (the λ_p of ONPO_SPEC §1; the theory's
  assumption). 1 comparison.
* `all_pairs`: every unordered pair i < j once, each ordered by a Bernoulli
  draw. K(K − 1)/2 comparisons.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

CompareFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

PAIRINGS = ("tournament", "lambda_p", "all_pairs")


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


def tournament(compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int):
  """INPO's knockout tournament (module docstring): best-vs-worst pair per prompt.

  Args:
    compare_fn: (key, i [N, m], j [N, m]) -> [N, m] bool, True where i wins.
    key: PRNG key for the oracle draws.
    num_prompts: N.
    k: K responses per prompt, >= 2.

  Returns:
    (Pairs with M = 1, comparisons per prompt).
  """
  k = _check_k(k)
  n = int(num_prompts)
  players = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k))
  level = 0

  def next_key():
    nonlocal level
    level += 1
    return jax.random.fold_in(key, level)

  half = k // 2
  winners, losers = _play(compare_fn, next_key(), players[:, 0:2 * half:2], players[:, 1:2 * half:2])
  if k % 2:
    bye = players[:, -1:]
    winners = jnp.concatenate([winners, bye], axis=1)
    losers = jnp.concatenate([losers, bye], axis=1)
  # Both brackets have the same size, so each level is one oracle call.
  while winners.shape[1] > 1:
    m = winners.shape[1] // 2
    both_i = jnp.concatenate([winners[:, 0:2 * m:2], losers[:, 0:2 * m:2]], axis=1)
    both_j = jnp.concatenate([winners[:, 1:2 * m:2], losers[:, 1:2 * m:2]], axis=1)
    w, l = _play(compare_fn, next_key(), both_i, both_j)
    new_winners, new_losers = w[:, :m], l[:, m:]
    if winners.shape[1] % 2:
      new_winners = jnp.concatenate([new_winners, winners[:, -1:]], axis=1)
      new_losers = jnp.concatenate([new_losers, losers[:, -1:]], axis=1)
    winners, losers = new_winners, new_losers
  best, worst = winners, losers
  confirmed = compare_fn(next_key(), best, worst)
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


def build_pairs(pairing: str, compare_fn: CompareFn, key: jax.Array, num_prompts: int, k: int):
  """Dispatches to the builder named `pairing` (one of `PAIRINGS`)."""
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}; got {pairing!r}")
  return {"tournament": tournament, "lambda_p": lambda_p, "all_pairs": all_pairs}[pairing](
      compare_fn, key, num_prompts, k)


def oracle_compare_fn(oracle, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, response_mask: jax.Array) -> CompareFn:
  """A `compare_fn` querying `oracle` on K responses per prompt.

  Args:
    oracle: an `onpo_jax.oracle.Oracle`.
    prompt_tokens: [N, P] left-padded prompts.
    prompt_mask: [N, P] bool.
    responses: [N, K, R] right-padded responses.
    response_mask: [N, K, R] bool.

  Returns:
    compare_fn(key, i [N, m], j [N, m]) -> [N, m] bool (Bernoulli P(y_i ≻ y_j | x)).
  """
  from onpo_jax import oracle as oracle_lib  # Local import keeps pairs.py oracle-agnostic.

  n, _, r = responses.shape

  def compare_fn(key, i, j):
    m = i.shape[1]
    take = lambda arr, idx: jnp.take_along_axis(arr, idx[:, :, None], axis=1).reshape(n * m, r)
    rep = lambda arr: jnp.repeat(arr, m, axis=0)
    won = oracle_lib.compare(oracle, key, rep(prompt_tokens), rep(prompt_mask),
                             take(responses, i), take(response_mask, i),
                             take(responses, j), take(response_mask, j))
    return won.reshape(n, m)

  return compare_fn
