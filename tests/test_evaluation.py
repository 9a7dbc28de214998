"""Tests for onpo_jax.evaluation and onpo_jax.testbed against brute-force numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from onpo_jax.testbed import evaluation
from onpo_jax import oracles as oracle_lib
from onpo_jax import sampler as sampler_lib
from onpo_jax.testbed import env as testbed
import tolerances
from flax import nnx

V, L, P, C = 3, 2, 2, 2


@pytest.fixture(scope="module")
def tiny():
  cfg = testbed.model_config(V, 16, 32, 1, 2, 1, 8, 8)
  graphdef, params = testbed.init_policy(cfg, 0)
  # Sharpen the random init so π is far from uniform and errors would show.
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)
  prompts, mask = testbed.make_prompts(jax.random.key(1), C, P, V)
  return cfg, graphdef, params, prompts, mask, testbed.enumerate_responses(V, L)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_policy_table_matches_chain_rule_and_sums_to_one(tiny):
  _, graphdef, params, prompts, mask, ys = tiny
  model = nnx.merge(graphdef, params)
  table = np.asarray(jax.jit(lambda p: evaluation.policy_table(graphdef, p, prompts, mask, ys))(
      params))
  eager = np.asarray(evaluation.policy_table(graphdef, params, prompts, mask, ys, chunk=3))
  # Brute force: one full forward per sequence, log-softmax of the logits at the
  # position *before* each response token, summed.
  ref = np.zeros((C, len(ys)))
  max_logit = 0.0
  for c in range(C):
    for i, y in enumerate(ys):
      tok = np.concatenate([prompts[c], y])[None]
      logits, _ = model(jnp.asarray(tok), jnp.arange(P + L)[None], jnp.ones((1, P + L), bool))
      lp = _np_log_softmax(np.asarray(logits[0], np.float64))
      ref[c, i] = sum(lp[P + t - 1, y[t]] for t in range(L))
      max_logit = max(max_logit, float(np.abs(np.asarray(logits)).max()))
  # f32 forward passes (weights × 8) in another batching than the brute force:
  # rounding proportional to |logit| + |log-prob| per token, summed over the L
  # response tokens, bounded by tolerances.LOGPROB_RTOL (eps × the depth of the
  # forward and the log-sum-exp) relative to that scale.
  scale = L * max_logit + np.abs(ref).max()
  tolerances.assert_close_rel(table, ref, rtol=tolerances.LOGPROB_RTOL, scale=scale,
                              what="policy_table (jit)")
  tolerances.assert_close_rel(eager, ref, rtol=tolerances.LOGPROB_RTOL, scale=scale,
                              what="policy_table (eager, chunk 3)")
  # Vocabulary = response vocabulary: the enumerated distribution is complete.
  # Σ exp(table) moves by at most max |δ table| (a probability-weighted mean).
  tolerances.assert_close_rel(np.exp(table).sum(-1), np.ones(C), rtol=tolerances.LOGPROB_RTOL,
                              scale=scale, what="Σ π = 1")


def test_sampler_matches_exact_table(tiny):
  cfg, graphdef, params, prompts, mask, ys = tiny
  table = np.asarray(evaluation.policy_table(graphdef, params, prompts, mask, ys))
  sampler = sampler_lib.Sampler(graphdef, sampler_lib.SamplingConfig(
      max_new_tokens=L, eos_ids=(), prompt_buckets=(P,)), model_config=cfg)
  n = 3000
  out = sampler(params, np.repeat(prompts[:1], n, 0), np.repeat(mask[:1], n, 0),
                jax.random.key(5))
  toks = np.asarray(out.response_tokens)
  assert toks.min() >= 0 and toks.max() < V
  idx = np.asarray(testbed.response_index(toks, V))
  np.testing.assert_array_equal(ys[idx], toks)
  counts = np.bincount(idx, minlength=len(ys))
  expected = np.exp(table[0].astype(np.float64))
  expected *= n / expected.sum()
  # Fixed seed: a correct sampler passes with overwhelming probability.
  assert stats.chisquare(counts, expected).pvalue > 1e-3


def _np_gap(pref, pi):
  """Brute force: max over pure π1 of J(π1, π) − min over pure π2 of J(π, π2)."""
  gaps = []
  for c in range(pref.shape[0]):
    n = pref.shape[1]
    best = max(sum(pref[c, i, j] * pi[c, j] for j in range(n)) for i in range(n))
    worst = min(sum(pi[c, i] * pref[c, i, j] for i in range(n)) for j in range(n))
    gaps.append(best - worst)
  return np.array(gaps)


def _game(seed, dtype):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(C, 5, 5)) * 2
  pref = 1 / (1 + np.exp(-(z - z.transpose(0, 2, 1))))
  lp = _np_log_softmax(rng.normal(size=(C, 5)) * 2)
  lp_sft = _np_log_softmax(rng.normal(size=(C, 5)))
  return [jnp.asarray(x, dtype) for x in (pref, lp, lp_sft)]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
def test_exact_metrics_vs_numpy(use_jit, x64):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    pref, lp, lp_sft = _game(0, dtype)
    f = jax.jit(evaluation.exact_metrics) if use_jit else evaluation.exact_metrics
    got = jax.device_get(f(pref, lp, lp_sft))
    p64, pi, pi_sft = (np.asarray(pref, np.float64), np.exp(np.asarray(lp, np.float64)),
                       np.exp(np.asarray(lp_sft, np.float64)))
    gaps = _np_gap(p64, pi)
    win = np.mean([pi[c] @ p64[c] @ pi_sft[c] for c in range(C)])
    # f64: rounding only; f32: sums of 5 products of O(1) numbers.
    tol = 1e-12 if x64 else 2e-6
    np.testing.assert_allclose(got["gap"], gaps.mean(), atol=tol)
    np.testing.assert_allclose(got["gap_max"], gaps.max(), atol=tol)
    np.testing.assert_allclose(got["win_rate_vs_sft"], win, atol=tol)
    np.testing.assert_allclose(got["mass"], 1.0, atol=tol)
    np.testing.assert_allclose(got["entropy"], np.mean(-(pi * np.log(pi)).sum(-1)), atol=tol)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("x64", [False, True])
def test_win_rate_matrix_vs_numpy(use_jit, x64):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    pref, lp, lp_sft = _game(1, dtype)
    tables = jnp.stack([lp, lp_sft, jnp.log(jnp.full_like(lp, 0.2))])
    f = jax.jit(evaluation.win_rate_matrix) if use_jit else evaluation.win_rate_matrix
    w = np.asarray(f(pref, tables))
    p64 = np.asarray(pref, np.float64)
    pis = np.exp(np.asarray(tables, np.float64))
    ref = np.array([[np.mean([pis[a, c] @ p64[c] @ pis[b, c] for c in range(C)])
                     for b in range(3)] for a in range(3)])
    tol = 1e-12 if x64 else 2e-6
    np.testing.assert_allclose(w, ref, atol=tol)
    np.testing.assert_allclose(w + w.T, np.ones((3, 3)), atol=tol)


def test_nash_reference_has_zero_gap():
  o = oracle_lib.make_synthetic_oracle(jax.random.key(0), vocab_size=V, max_prompt_length=P,
                                       max_response_length=L, cyclic=1.0, strength=4.0)
  prompts, mask = testbed.make_prompts(jax.random.key(1), C, P, V)
  ys = testbed.enumerate_responses(V, L)
  pref = np.asarray(oracle_lib.preference_matrix(o, prompts, mask, ys, np.ones(ys.shape, bool)),
                    np.float64)
  ref = evaluation.nash_reference(pref)
  # LP solutions are exact to the solver's tolerance (~1e-9).
  assert abs(ref["gap"]) < 1e-6
  np.testing.assert_allclose(ref["value"], 0.5, atol=1e-7)
  # Nash never loses in expectation to any pure response.
  assert (np.einsum("ci,cij->cj", ref["pi"], pref) >= 0.5 - 1e-7).all()
  # A uniform policy on this cyclic game is not Nash: positive gap (the check bites).
  assert _np_gap(pref, np.full(pref.shape[:2], 1 / pref.shape[1])).mean() > 1e-3


def test_testbed_helpers():
  ys = testbed.enumerate_responses(3, 3)
  assert ys.shape == (27, 3)
  np.testing.assert_array_equal(np.asarray(testbed.response_index(ys, 3)), np.arange(27))
  prompts, mask = testbed.make_prompts(jax.random.key(0), 6, 2, 3)
  assert len({tuple(p) for p in prompts}) == 6 and mask.all()
  with pytest.raises(ValueError, match="num_prompts"):
    testbed.make_prompts(jax.random.key(0), 10, 2, 3)
  lp = np.asarray(testbed.start_logprobs(jax.random.key(0), 4, ys, 3, 0.5), np.float64)
  np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
  # Neither uniform nor identical across prompts.
  assert np.ptp(lp, axis=-1).min() > 0.5
  assert not np.allclose(lp[0], lp[1])
  with pytest.raises(ValueError, match="temperature"):
    testbed.start_logprobs(jax.random.key(0), 4, ys, 3, 0.0)
