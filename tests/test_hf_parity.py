"""Logits and greedy-generation parity with transformers' PyTorch models.

Torch is the independent peer: tiny random checkpoints of each family are
written by transformers (onpo_jax/testing/tiny_hf.py), imported with hf_io, and both
implementations run the same left-padded batch with the same position ids.

Tolerance: float32 logits from two libraries differ by rounding, which is
proportional to their magnitude, so the bound is relative to max |logit|:
tolerances.DECODER_RTOL = float32 eps × the accumulation depth of these tiny
decoders ≈ 6.7e-5 (derivation in tests/tolerances.py). Observed ratios are
~1e-7 to 1e-6; a mis-mapped tensor gives ~1e-1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from onpo_jax.testing import tiny_hf
import tolerances
from onpo_jax.models import decoder as dec
from onpo_jax.models import hf_io

PROMPT_LEN = 7
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=tiny_hf.FAMILIES)
def pair(request, tmp_path_factory):
  path = tiny_hf.make_tiny_checkpoint(
      tmp_path_factory.mktemp(request.param), request.param, seed=1)
  return request.param, hf_io.load_hf_checkpoint(path), \
      tiny_hf.load_hf_model(path)


def _left_padded(vocab, pads=(3, 0, 1), length=PROMPT_LEN, seed=0):
  rng = np.random.RandomState(seed)
  # Ids ≥ 4 keep the prompt free of pad/bos/eos ids.
  tokens = rng.randint(4, vocab, (len(pads), length)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  for i, p in enumerate(pads):
    tokens[i, :p] = 0
    mask[i, :p] = False
  pos = np.asarray(dec.positions_from_mask(jnp.asarray(mask)))
  return tokens, mask, pos


def test_logits_parity_left_padded(pair):
  family, model, hf = pair
  tokens, mask, pos = _left_padded(model.config.vocab_size)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t, p, m: nnx.merge(graphdef, s)(t, p, m)[0])
  ours = np.asarray(fwd(state, tokens, pos, mask))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens).long(),
             attention_mask=torch.tensor(mask).long(),
             position_ids=torch.tensor(pos).long()).logits.numpy()
  tolerances.assert_close_rel(ours, ref, mask=mask,
                              rtol=tolerances.DECODER_RTOL,
                              what=f"{family} logits")
  # The test can fail: logits are far from constant.
  assert np.abs(ref[mask]).max() > 1.0


def _greedy(model, tokens, mask, pos, new_tokens):
  """Minimal greedy loop: one prefill, then one-token decodes via the cache."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, t, p, m, c: nnx.merge(graphdef, s)(t, p, m, c),
                 donate_argnums=4)
  b, l = tokens.shape
  cache = dec.init_cache(cfg, b, l + new_tokens)
  logits, cache = step(state, tokens, pos, mask, cache)
  last = logits[:, -1]
  next_pos = jnp.asarray(pos[:, -1] + 1)
  done = np.zeros(b, bool)
  out, step_logits = [], []
  for _ in range(new_tokens):
    step_logits.append(np.asarray(last))
    nxt = np.asarray(jnp.argmax(last, axis=-1)).astype(np.int32)
    nxt = np.where(done, cfg.pad_token_id, nxt)
    out.append(nxt)
    done |= np.isin(nxt, cfg.eos_token_ids)
    logits, cache = step(state, jnp.asarray(nxt)[:, None], next_pos[:, None],
                         jnp.ones((b, 1), bool), cache)
    last = logits[:, -1]
    next_pos = next_pos + 1
  return np.stack(out, 1), np.stack(step_logits, 1)


def test_greedy_generation_matches_hf_generate(pair):
  family, model, hf = pair
  tokens, mask, pos = _left_padded(model.config.vocab_size, seed=1)
  ours, our_logits = _greedy(model, tokens, mask, pos, NEW_TOKENS)
  with torch.no_grad():
    res = hf.generate(
        input_ids=torch.tensor(tokens).long(),
        attention_mask=torch.tensor(mask).long(),
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0,
        pad_token_id=model.config.pad_token_id,
        eos_token_id=list(model.config.eos_token_ids),
        output_logits=True, return_dict_in_generate=True)
  ref = res.sequences[:, tokens.shape[1]:].numpy()
  # HF stops when every row is done; pad our rows the same way.
  ours = ours[:, :ref.shape[1]]
  np.testing.assert_array_equal(ours, ref, err_msg=family)
  ref_logits = np.stack([x.numpy() for x in res.logits], 1)
  # Logits of each decode step (rows still generating) match HF's.
  for t in range(ref.shape[1]):
    live = ~np.isin(ref[:, :t], model.config.eos_token_ids).any(1)
    tolerances.assert_close_rel(our_logits[live, t], ref_logits[live, t],
                                rtol=tolerances.DECODER_RTOL,
                                what=f"{family} decode step {t}")
  # The generated tokens are not trivially constant.
  assert len(np.unique(ref)) > 2
