"""Tests for onpo_jax.oracles.judge / .reward_model / .text: pair-pm LM judge and BT RM oracles.

The peer for parity is transformers' PyTorch implementation on tiny random
checkpoints built offline (onpo_jax/testing/tiny_hf.py); each reference row is run alone,
unpadded, so padding, micro-batching and positions are all exercised on our side.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from onpo_jax.oracles import judge
from onpo_jax.oracles import reward_model
from onpo_jax.oracles import text
from onpo_jax import oracles as oracle_lib
from onpo_jax.models import sharding
from onpo_jax.testing import tiny_hf
import tolerances

WORDS = "A B hello world what is two plus three sky blue red green yes no maybe".split()
# Rewards and choice logits are float32 outputs of the same tiny weights under
# XLA and PyTorch: they differ by rounding, bounded relative to their magnitude by
# tolerances.DECODER_RTOL (eps × the decoders' accumulation depth ≈ 6.7e-5; the
# score head is one more hidden-size dot product, like the unembedding).
# Probabilities are σ(Δ) (or ½(σ(Δ₁) + 1 − σ(Δ₂))) of a difference Δ of two such
# logits / rewards: |δp| ≤ ¼·|δΔ| ≤ ¼ · 2·DECODER_RTOL · max|logit|, so they are
# bounded by DECODER_RTOL / 2 relative to max |logit| (or max |reward|) of the
# torch reference, recorded in _TORCH_MAGNITUDES. Observed: ~1e-7 of the scale for
# probabilities and ~6e-7 for rewards; a wrong label, side or tensor moves
# probabilities by 1e-2 or more.
PROB_RTOL = tolerances.DECODER_RTOL / 2
REWARD_RTOL = tolerances.DECODER_RTOL
_TORCH_MAGNITUDES = []  # max |logit| / |reward| of each torch reference call


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("judge")
  judge_tok = transformers.AutoTokenizer.from_pretrained(
      tiny_hf.make_tiny_tokenizer(str(root / "judge_tok"), WORDS))
  # A different vocabulary order, so the text path must really re-tokenise.
  policy_tok = transformers.AutoTokenizer.from_pretrained(
      tiny_hf.make_tiny_tokenizer(str(root / "policy_tok"), WORDS[::-1]))
  ckpt = tiny_hf.make_tiny_checkpoint(str(root / "judge"), "llama", seed=3)
  return dict(root=root, judge_tok=judge_tok, policy_tok=policy_tok, ckpt=ckpt,
              hf_judge=tiny_hf.load_hf_model(ckpt))


PROMPTS = ["what is two plus three", "sky", "hello world", "is sky blue"]
RESP_A = ["yes", "red green blue", "hello", "no maybe"]
RESP_B = ["no", "blue", "world hello world", "no maybe"]  # last pair identical


def _policy_batch(tok, prompts, resp_a, resp_b, p_len=8, r_len=5):
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  n = len(prompts)
  pt, pm = np.zeros((n, p_len), np.int32), np.zeros((n, p_len), bool)
  out = [pt, pm]
  for i, p in enumerate(prompts):
    ids = enc(p)
    pt[i, p_len - len(ids):], pm[i, p_len - len(ids):] = ids, True
  for resps in (resp_a, resp_b):
    t, m = np.zeros((n, r_len), np.int32), np.zeros((n, r_len), bool)
    for i, r in enumerate(resps):
      ids = enc(r) + [tok.eos_token_id]  # EOS is special: decoding drops it
      t[i, :len(ids)], m[i, :len(ids)] = ids, True
    out += [t, m]
  return [jnp.asarray(x) for x in out]


def _torch_last_logits(model, ids):
  with torch.no_grad():
    out = model(torch.tensor([ids])).logits[0, -1].double().numpy()
  _TORCH_MAGNITUDES.append(float(np.abs(out).max()))
  return out


def _reference_judge(hf_model, tok, context, first, second):
  """Independent pair-pm computation with the PyTorch model, one row at a time."""
  a_id, b_id = tok.convert_tokens_to_ids(["A", "B"])

  def p_first_label(x, y):
    text = f"[CONTEXT] {context} [RESPONSE A] {x} [RESPONSE B] {y} \n"
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)
    logits = _torch_last_logits(hf_model, tok(chat, add_special_tokens=False)["input_ids"])
    e = np.exp(logits[[a_id, b_id]] - logits[[a_id, b_id]].max())
    return e[0] / e.sum()

  return 0.5 * (p_first_label(first, second) + 1.0 - p_first_label(second, first))


def _judge(assets, **kw):
  # The generic format: the reference below asks with a generation prompt and keeps BOS.
  kw = dict(dict(micro_batch_size=3, pad_multiple=8, preset="plain"), **kw)
  return judge.load_pairwise_judge(assets["ckpt"], assets["policy_tok"],
                                   tokenizer_path=str(assets["root"] / "judge_tok"), **kw)


def test_judge_matches_transformers(assets):
  oracle = _judge(assets)
  batch = _policy_batch(assets["policy_tok"], PROMPTS, RESP_A, RESP_B)
  got = np.asarray(oracle.preference_prob(*batch))
  assert got.dtype == np.float32 and got.shape == (4,)
  _TORCH_MAGNITUDES.clear()
  want = [_reference_judge(assets["hf_judge"], assets["judge_tok"], c, a, b)
          for c, a, b in zip(PROMPTS, RESP_A, RESP_B)]
  tolerances.assert_close_rel(got, want, rtol=PROB_RTOL, scale=max(_TORCH_MAGNITUDES),
                              what="pair-pm judge probabilities / max|logit|")
  assert got[3] == 0.5
  assert np.ptp(got[:3]) > 1e-3  # the tiny judge really discriminates
  assert oracle.num_truncated == 0


def test_judge_order_averaging_is_exactly_symmetric(assets):
  oracle = _judge(assets)
  pt, pm, at, am, bt, bm = _policy_batch(assets["policy_tok"], PROMPTS, RESP_A, RESP_B)
  p_ab = np.asarray(oracle.preference_prob(pt, pm, at, am, bt, bm))
  compiled = judge._choice_logits._cache_size()  # pylint: disable=protected-access
  p_ba = np.asarray(oracle.preference_prob(pt, pm, bt, bm, at, am))
  # Same bucketed length and micro-batch shape: the swapped call must not recompile.
  assert judge._choice_logits._cache_size() == compiled  # pylint: disable=protected-access
  np.testing.assert_array_equal(p_ab + p_ba, np.ones(4, np.float32))
  p_aa = np.asarray(oracle.preference_prob(pt, pm, at, am, at, am))
  np.testing.assert_array_equal(p_aa, np.full(4, 0.5, np.float32))
  key = jax.random.key(0)
  np.testing.assert_array_equal(oracle_lib.compare(oracle, key, pt, pm, at, am, bt, bm),
                                oracle_lib.compare(oracle, key, pt, pm, at, am, bt, bm))


def test_judge_truncates_long_inputs_and_counts(assets):
  oracle = _judge(assets, max_length=12)
  batch = _policy_batch(assets["policy_tok"], PROMPTS, RESP_A, RESP_B)
  p = np.asarray(oracle.preference_prob(*batch))
  assert oracle.num_truncated == 8 and np.all((p >= 0) & (p <= 1))


def test_judge_bad_inputs(assets):
  with pytest.raises(ValueError, match=r"encodes label 'A B' as 2 tokens"):
    _judge(assets, labels=("A B", "B"))
  with pytest.raises(ValueError, match="expected two distinct known tokens"):
    _judge(assets, labels=("zzz", "B"))
  with pytest.raises(ValueError, match=r"template must contain exactly the fields"):
    _judge(assets, template="{context} {response_a}")
  oracle = _judge(assets)
  pt, pm, at, am, bt, bm = _policy_batch(assets["policy_tok"], PROMPTS, RESP_A, RESP_B)
  with pytest.raises(ValueError, match=r"b_tokens and b_mask must both be \[N=4, R\]"):
    oracle.preference_prob(pt, pm, at, am, bt[:2], bm[:2])


def test_decode_contexts_and_context_fn(assets):
  tok = assets["policy_tok"]
  chat = tok.apply_chat_template([{"role": "user", "content": "is sky blue"}], tokenize=False,
                                 add_generation_prompt=True)
  ids = np.asarray([[0, 0] + tok(chat, add_special_tokens=False)["input_ids"]], np.int32)
  mask = ids != 0
  assert text.decode_contexts(tok, ids, mask) == ["is sky blue"]
  full = text.decode_contexts(tok, ids, mask, context_fn=lambda t: t)
  assert full[0].split() == chat.split()  # markup kept for the caller's rewrite
  assert text.decode_contexts(tok, ids, mask, context_fn=len) == [len(full[0])]


# ------------------------------------------------------------ pure functions


def _np_order_averaged(lfs, lsf):
  p_fs = 1.0 / (1.0 + np.exp(lfs[:, 1] - lfs[:, 0]))
  p_sf = 1.0 / (1.0 + np.exp(lsf[:, 1] - lsf[:, 0]))
  return 0.5 * (p_fs + 1.0 - p_sf)


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["f32", "f64"])
def dtype(request):
  with jax.enable_x64(request.param == jnp.float64):
    yield request.param


# Tolerances: a few ulps of the dtype (sigmoid/softmax of O(1) logits).
_TOL = {jnp.float32: 2e-7, jnp.float64: 1e-15}


@pytest.mark.parametrize("use_jit", [False, True])
def test_order_averaged_preference_reference(dtype, use_jit):
  rng = np.random.default_rng(0)
  lfs, lsf = rng.normal(size=(7, 2)) * 3, rng.normal(size=(7, 2)) * 3
  fn = jax.jit(judge.order_averaged_preference) if use_jit else judge.order_averaged_preference
  got = fn(jnp.asarray(lfs, dtype), jnp.asarray(lsf, dtype))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), _np_order_averaged(lfs, lsf),
                             rtol=0, atol=4 * _TOL[dtype])
  swapped = fn(jnp.asarray(lsf, dtype), jnp.asarray(lfs, dtype))
  np.testing.assert_array_equal(np.asarray(got + swapped), np.ones(7))
  with pytest.raises(ValueError, match="choice_logits_sf must have shape"):
    judge.order_averaged_preference(jnp.zeros((3, 2), dtype), jnp.zeros((2, 2), dtype))


@pytest.mark.parametrize("use_jit", [False, True])
def test_bt_preference_reference(dtype, use_jit):
  rng = np.random.default_rng(1)
  ra, rb = rng.normal(size=9) * 4, rng.normal(size=9) * 4
  fn = jax.jit(reward_model.bt_preference) if use_jit else reward_model.bt_preference
  got = fn(jnp.asarray(ra, dtype), jnp.asarray(rb, dtype))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), 1 / (1 + np.exp(rb - ra)),
                             rtol=0, atol=4 * _TOL[dtype])
  back = fn(jnp.asarray(rb, dtype), jnp.asarray(ra, dtype))
  np.testing.assert_array_equal(np.asarray(got + back), np.ones(9))


@pytest.mark.parametrize("use_jit", [False, True])
def test_to_caller_order_and_last_real_index(use_jit):
  q = jnp.asarray([0.9, 0.3, 0.7], jnp.float32)
  f = jax.jit(text.to_caller_order) if use_jit else text.to_caller_order
  got = f(q, jnp.asarray([True, False, False]), jnp.asarray([False, False, True]))
  np.testing.assert_array_equal(got, np.asarray([0.9, 1 - np.float32(0.3), 0.5], np.float32))
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0]], bool)
  g = jax.jit(reward_model.last_real_index) if use_jit else reward_model.last_real_index
  want = [max(np.nonzero(r)[0]) for r in mask]  # independent reference
  np.testing.assert_array_equal(g(jnp.asarray(mask)), want)


# ------------------------------------------------------------- reward model


def _save_seq_cls(path, seed=5):
  config = tiny_hf.hf_config("llama", num_labels=1)
  torch.manual_seed(seed)
  model = transformers.LlamaForSequenceClassification(config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
  model.save_pretrained(path)
  return transformers.LlamaForSequenceClassification.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def reward_assets(assets):
  path = str(assets["root"] / "rm")
  hf_rm = _save_seq_cls(path)
  return dict(path=path, hf_rm=hf_rm, rm=reward_model.load_reward_model(path))


def _torch_reward(hf_rm, ids):
  with torch.no_grad():
    out = float(hf_rm(torch.tensor([ids])).logits[0, 0])
  _TORCH_MAGNITUDES.append(abs(out))
  return out


def test_reward_model_matches_sequence_classification(reward_assets):
  hf_rm, rm = reward_assets["hf_rm"], reward_assets["rm"]
  rows = [[5, 9, 12, 40], [7, 8], [30, 31, 32, 33, 34, 35], [11]]
  want = [_torch_reward(hf_rm, r) for r in rows]
  length = 7
  for side in ("left", "right"):
    tokens, mask = np.zeros((4, length), np.int32), np.zeros((4, length), bool)
    for i, r in enumerate(rows):
      sl = slice(length - len(r), None) if side == "left" else slice(0, len(r))
      tokens[i, sl], mask[i, sl] = r, True
    got = np.asarray(rm(jnp.asarray(tokens), jnp.asarray(mask)))
    tolerances.assert_close_rel(got, want, rtol=REWARD_RTOL, what=f"rewards ({side} padded)")
  assert np.ptp(want) > 1e-2
  # Sharded over the 8 fake devices (data, fsdp, tensor) = (2, 2, 2): same rewards.
  mesh = sharding.make_mesh((2, 2, 2))
  rm_sharded = reward_model.load_reward_model(reward_assets["path"], mesh=mesh)
  for arr in (rm_sharded.decoder.layers[0].attn.q[...], rm_sharded.score[...]):
    assert any(axis is not None for axis in arr.sharding.spec), arr.sharding  # really split
  got = np.asarray(rm_sharded(jnp.asarray(tokens), jnp.asarray(mask)))
  tolerances.assert_close_rel(got, want, rtol=REWARD_RTOL, what="rewards (sharded)")


def test_reward_oracle_token_and_text_paths(assets, reward_assets):
  hf_rm, rm = reward_assets["hf_rm"], reward_assets["rm"]
  tok = assets["policy_tok"]
  pt, pm, at, am, bt, bm = _policy_batch(tok, PROMPTS, RESP_A, RESP_B)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))

  token_oracle = reward_model.RewardModelOracle(rm, micro_batch_size=3)
  got = np.asarray(token_oracle.preference_prob(pt, pm, at, am, bt, bm))
  real = lambda t, m, i: np.asarray(t[i])[np.asarray(m[i])].tolist()
  _TORCH_MAGNITUDES.clear()
  want = [sig(_torch_reward(hf_rm, real(pt, pm, i) + real(at, am, i))
              - _torch_reward(hf_rm, real(pt, pm, i) + real(bt, bm, i))) for i in range(4)]
  tolerances.assert_close_rel(got, want, rtol=PROB_RTOL, scale=max(_TORCH_MAGNITUDES),
                              what="reward-oracle probabilities (tokens) / max|reward|")
  back = np.asarray(token_oracle.preference_prob(pt, pm, bt, bm, at, am))
  np.testing.assert_array_equal(got + back, np.ones(4, np.float32))
  assert got[3] == 0.5

  rm_tok = assets["judge_tok"]
  text_oracle = reward_model.RewardModelOracle(rm, rm_tok, tok, micro_batch_size=3, pad_multiple=8)
  got = np.asarray(text_oracle.preference_prob(pt, pm, at, am, bt, bm))

  def ref_reward(context, response):
    chat = rm_tok.apply_chat_template(
        [{"role": "user", "content": context}, {"role": "assistant", "content": response}],
        tokenize=False)
    return _torch_reward(hf_rm, rm_tok(chat, add_special_tokens=False)["input_ids"])

  _TORCH_MAGNITUDES.clear()
  want = [sig(ref_reward(c, a) - ref_reward(c, b)) for c, a, b in zip(PROMPTS, RESP_A, RESP_B)]
  tolerances.assert_close_rel(got, want, rtol=PROB_RTOL, scale=max(_TORCH_MAGNITUDES),
                              what="reward-oracle probabilities (text) / max|reward|")


def test_load_reward_model_errors(assets, reward_assets):
  # A causal-LM checkpoint has no score head.
  with pytest.raises(KeyError, match="tensor 'score.weight' not found"):
    reward_model.load_reward_model(assets["ckpt"])
  with pytest.raises(ValueError, match="give both tokenizer and policy_tokenizer"):
    reward_model.RewardModelOracle(reward_assets["rm"], assets["judge_tok"])
