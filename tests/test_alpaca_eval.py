"""Tests for onpo_jax.alpaca_eval: AlpacaEval schema, files, oracle win rates and CIs."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from onpo_jax.llm import alpaca_eval


def _np_win_rate(p, level):
  """Independent reference: mean, sample-sd standard error, normal quantile from scipy."""
  p = np.asarray(p, np.float64)
  n = len(p)
  mean = p.sum() / n
  sd = math.sqrt(((p - mean) ** 2).sum() / (n - 1))
  se = sd / math.sqrt(n)
  z = scipy.stats.norm.ppf(1 - (1 - level) / 2)
  return mean, se, max(0.0, mean - z * se), min(1.0, mean + z * se)


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_win_rate_matches_reference(level):
  p = np.random.default_rng(0).uniform(size=37)
  wr = alpaca_eval.win_rate(p, level)
  # Both sides are float64 sums of 37 values: 1e-12 covers the summation order.
  np.testing.assert_allclose([wr.win_rate, wr.stderr, wr.ci_low, wr.ci_high],
                             _np_win_rate(p, level), rtol=1e-12, atol=1e-12)
  assert wr.num_prompts == 37 and wr.confidence == level


def test_win_rate_ties_and_clipping():
  # All ties: exactly ½ with zero width; all wins: clipped at 1.
  wr = alpaca_eval.win_rate(np.full(10, 0.5))
  assert wr.win_rate == 0.5 and wr.stderr == 0.0 and wr.ci_low == wr.ci_high == 0.5
  wr = alpaca_eval.win_rate([1.0, 1.0, 0.0])
  assert wr.ci_high <= 1.0 and wr.ci_low >= 0.0
  one = alpaca_eval.win_rate([0.7])
  assert one.win_rate == 0.7 and math.isnan(one.stderr) and (one.ci_low, one.ci_high) == (0, 1)


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ([[0.5]], "1-D"), ([1.5], r"\[0, 1\]"),
                                        ([float("nan")], r"\[0, 1\]")])
def test_win_rate_rejects_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    alpaca_eval.win_rate(bad)
  with pytest.raises(ValueError, match="confidence"):
    alpaca_eval.win_rate([0.5, 0.5], confidence=1.0)


def test_records_round_trip_and_schema(tmp_path):
  recs = alpaca_eval.make_records(["q1", "q2"], ["a1", ""], "onpo-round3", ["helpful_base", None])
  assert recs == [{"instruction": "q1", "output": "a1", "generator": "onpo-round3",
                   "dataset": "helpful_base"},
                  {"instruction": "q2", "output": "", "generator": "onpo-round3"}]
  path = alpaca_eval.write_outputs(str(tmp_path / "out.json"), recs)
  assert json.load(open(path, encoding="utf-8")) == recs
  assert alpaca_eval.read_outputs(path) == recs


@pytest.mark.parametrize("records, match", [
    ({"instruction": "q"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    (["q"], "record 0: expected an object"),
    ([{"instruction": "q", "output": "a"}], "record 0: missing field 'generator'"),
    ([{"instruction": "q", "output": 3, "generator": "g"}], "field 'output' must be a string"),
    ([{"instruction": " ", "output": "a", "generator": "g"}], "'instruction' must be non-empty"),
    ([{"instruction": "q", "output": "a", "generator": "g", "score": 1}], "unexpected fields"),
    ([{"instruction": "q", "output": "a", "generator": "g", "dataset": 1}], "'dataset'"),
])
def test_validate_rejects(records, match):
  with pytest.raises(ValueError, match=match):
    alpaca_eval.validate_outputs(records)


def test_read_instructions_json_and_jsonl(tmp_path):
  js = tmp_path / "eval.json"
  js.write_text(json.dumps([{"instruction": "a", "dataset": "d", "output": "ref"},
                            {"instruction": "b"}]))
  assert alpaca_eval.read_instructions(str(js)) == (["a", "b"], ["d", None])
  jl = tmp_path / "eval.jsonl"
  jl.write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n')
  assert alpaca_eval.read_instructions(str(jl)) == (["a", "b"], [None, None])
  # A prompt file's "prompt" stands for the instruction (the bundled prompt sets).
  pl = tmp_path / "prompts.jsonl"
  pl.write_text('{"prompt": "a", "constraints": []}\n{"instruction": "b", "prompt": "x"}\n')
  assert alpaca_eval.read_instructions(str(pl)) == (["a", "b"], [None, None])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "a"}\n{"text": "b"}\n')
  with pytest.raises(ValueError, match="record 1 needs a non-empty string 'instruction'"):
    alpaca_eval.read_instructions(str(bad))


class _CountingOracle:
  """P(a ≻ b) = σ(len(a) − len(b)) over masked tokens; records call shapes."""
  vocab_size = 10

  def __init__(self):
    self.shapes = []

  def preference_prob(self, pt, pm, a, am, b, bm):
    self.shapes.append(np.shape(a))
    d = np.asarray(am).sum(1) - np.asarray(bm).sum(1)
    return 1 / (1 + np.exp(-d))


def test_oracle_preferences_micro_batches_and_pads():
  oracle = _CountingOracle()
  a_tok, a_mask = alpaca_eval.right_pad([[1, 2, 3], [4], [5, 6], [7, 8, 9], [1]], 4)
  b_tok, b_mask = alpaca_eval.right_pad([[1], [2, 3], [5, 6], [7], [1, 2, 3, 4, 5]], 4)
  assert b_mask.sum(1).tolist() == [1, 2, 2, 1, 4]  # cut at 4 tokens
  pt, pm = np.ones((5, 2), np.int32), np.ones((5, 2), bool)
  got = alpaca_eval.oracle_preferences(oracle, pt, pm, a_tok, a_mask, b_tok, b_mask,
                                       micro_batch_size=2)
  d = np.array([2, -1, 0, 2, -3], np.float64)
  np.testing.assert_allclose(got, 1 / (1 + np.exp(-d)), rtol=1e-15)
  # Row 2 compares [5, 6] with itself: ½ without a query. The other four rows make
  # two blocks of 2; a block is never smaller than micro_batch_size.
  assert oracle.shapes == [(2, 4)] * 2
  oracle.shapes.clear()
  got = alpaca_eval.oracle_preferences(oracle, pt, pm, a_tok, a_mask, b_tok, b_mask,
                                       micro_batch_size=3)
  np.testing.assert_allclose(got, 1 / (1 + np.exp(-d)), rtol=1e-15)
  assert oracle.shapes == [(3, 4)] * 2  # 4 rows asked, the last block padded
  with pytest.raises(ValueError, match="a_mask must be"):
    alpaca_eval.oracle_preferences(oracle, pt, pm, a_tok, a_mask[:3], b_tok, b_mask)


def test_same_responses_skip_the_oracle():
  oracle = _CountingOracle()
  a_tok, a_mask = alpaca_eval.right_pad([[1, 2], [3], [4, 5, 6]], 3)
  # Same real tokens in a wider array with other pad values: still the same responses.
  b_tok = np.array([[1, 2, 9, 9], [3, 7, 7, 7], [4, 5, 6, 0]], np.int32)
  b_mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], bool)
  assert alpaca_eval.same_responses(a_tok, a_mask, b_tok, b_mask).tolist() == [True] * 3
  pt, pm = np.ones((3, 2), np.int32), np.ones((3, 2), bool)
  got = alpaca_eval.oracle_preferences(oracle, pt, pm, a_tok, a_mask, b_tok, b_mask)
  assert got.tolist() == [0.5] * 3 and oracle.shapes == []
  b_mask[1, 1] = True  # [3, 7] differs from [3]
  assert alpaca_eval.same_responses(a_tok, a_mask, b_tok, b_mask).tolist() == [True, False, True]
