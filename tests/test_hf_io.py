"""HF checkpoint import/export, sharded indexes, errors, tokenizer loading.

Logits compared with transformers are float32 from two libraries whose CPU
kernels sum in different orders, so their difference is rounding, which grows
with the logits' magnitude: it is bounded relative to max |logit| by
tolerances.DECODER_RTOL (float32 eps × the accumulation depth of the tiny
decoders, ≈ 6.7e-5; see tests/tolerances.py). An absolute 1e-4 was flaky: the
export test scales the weights by 8, its logits reach ~1e2, and 1e-4 was then
~1e-6 relative (observed 1.1e-4 on another 2-core machine). A mis-mapped tensor
moves the logits by ~1e-1 relative. Round trips are compared exactly.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from onpo_jax.testing import tiny_hf
import tolerances
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec
from onpo_jax.models import hf_io
from onpo_jax.models import tokenizer as tok_lib


def _params(model):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def _logits(model, tokens, mask):
  pos = dec.positions_from_mask(jnp.asarray(mask))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, pos, mask)[0])
  return np.asarray(fwd(state)), np.asarray(pos)


def _hf_logits(hf, tokens, mask, pos):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(tokens).long(),
              attention_mask=torch.tensor(mask).long(),
              position_ids=torch.tensor(pos).long()).logits.numpy()


def _batch(vocab):
  rng = np.random.RandomState(0)
  tokens = rng.randint(4, vocab, (2, 6)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[0, :2] = False
  tokens[0, :2] = 0
  return tokens, mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny_hf.make_tiny_checkpoint(tmp_path_factory.mktemp("llama"),
                                      "llama", seed=3)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, model_type):
  cfg = config_lib.DecoderConfig.tiny(
      model_type=model_type, vocab_size=96,
      attention_bias=model_type == "qwen2",
      tie_word_embeddings=model_type == "qwen2")
  model = dec.Decoder(cfg, rngs=nnx.Rngs(
      params=jax.random.key(0, impl="unsafe_rbg")))
  # Scale the 0.02-std init up (and make norms / biases non-trivial) so a
  # mis-mapped tensor shows in the logits.
  rng = np.random.RandomState(1)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: x * 8 + 0.3 * rng.randn(*x.shape).astype(np.float32), state))
  out = hf_io.save_hf_checkpoint(model, tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors"]
  hf = tiny_hf.load_hf_model(out)
  assert type(hf).__name__ == {"llama": "LlamaForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[model_type]
  tokens, mask = _batch(96)
  ours, pos = _logits(model, tokens, mask)
  ref = _hf_logits(hf, tokens, mask, pos)
  tolerances.assert_close_rel(ours, ref, mask=mask,
                              rtol=tolerances.DECODER_RTOL,
                              what=f"export {model_type} vs transformers")
  assert np.abs(ref[mask]).max() > 1.0


def test_import_export_import_is_bit_identical(tmp_path, ckpt):
  first = hf_io.load_hf_checkpoint(ckpt)
  out = hf_io.save_hf_checkpoint(first, tmp_path / "rt")
  second = hf_io.load_hf_checkpoint(out)
  a, b = _params(first), _params(second)
  assert a.keys() == b.keys() and len(a) == 2 + 2 * 9 + 1
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  # The exported tensors are the original checkpoint's, byte for byte.
  orig = load_file(os.path.join(ckpt, "model.safetensors"))
  again = load_file(os.path.join(out, "model.safetensors"))
  assert orig.keys() == again.keys()
  for k in orig:
    assert np.array_equal(orig[k], again[k]), k
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert config_lib.DecoderConfig.from_hf(cfg) == first.config


def test_sharded_index_import_and_export(tmp_path, ckpt):
  sharded = tiny_hf.make_tiny_checkpoint(tmp_path / "sharded", "llama",
                                         seed=3, max_shard_size="20KB")
  files = os.listdir(sharded)
  assert hf_io.INDEX_FILE in files and hf_io.SINGLE_FILE not in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  single, from_index = (_params(hf_io.load_hf_checkpoint(p))
                        for p in (ckpt, sharded))
  for k in single:
    assert np.array_equal(single[k], from_index[k]), k
  # Our own sharded export is read back by us and by transformers.
  model = hf_io.load_hf_checkpoint(sharded)
  out = hf_io.save_hf_checkpoint(model, tmp_path / "out", max_shard_size=20000)
  index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
  assert len(set(index["weight_map"].values())) > 1
  back = _params(hf_io.load_hf_checkpoint(out))
  for k in single:
    assert np.array_equal(single[k], back[k]), k
  tokens, mask = _batch(96)
  ours, pos = _logits(model, tokens, mask)
  ref = _hf_logits(tiny_hf.load_hf_model(out), tokens, mask, pos)
  tolerances.assert_close_rel(ours, ref, mask=mask,
                              rtol=tolerances.DECODER_RTOL,
                              what="sharded export vs transformers")


def test_generation_config_and_eos_ids(tmp_path):
  path = tiny_hf.make_tiny_checkpoint(tmp_path / "l31", "llama3.1")
  model = hf_io.load_hf_checkpoint(path)
  assert model.config.eos_token_ids == (2, 3)
  assert dict(model.config.rope_scaling)["rope_type"] == "llama3"
  out = hf_io.save_hf_checkpoint(model, tmp_path / "out")
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["eos_token_id"] == [2, 3] and gen["bos_token_id"] == 1
  assert hf_io.load_hf_checkpoint(out).config == model.config
  # A transformers config object reads the same as its directory.
  assert config_lib.DecoderConfig.from_hf(
      tiny_hf.hf_config("llama3.1")) == model.config


def test_dtypes(tmp_path, ckpt):
  f32 = _params(hf_io.load_hf_checkpoint(ckpt))
  bf16 = _params(hf_io.load_hf_checkpoint(ckpt, param_dtype="bfloat16"))
  for k in f32:
    assert bf16[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16[k], f32[k].astype(ml_dtypes.bfloat16))
  # A bfloat16 checkpoint upcasts exactly into float32 parameters.
  path = tiny_hf.make_tiny_checkpoint(tmp_path / "bf", "llama", seed=3,
                                      dtype="bfloat16")
  up = _params(hf_io.load_hf_checkpoint(path))
  for k in f32:
    assert up[k].dtype == np.float32
    np.testing.assert_array_equal(up[k], bf16[k].astype(np.float32))


def _rewrite(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  for f in os.listdir(src):
    if f != hf_io.SINGLE_FILE:
      with open(os.path.join(src, f), "rb") as a, \
          open(os.path.join(dst, f), "wb") as b:
        b.write(a.read())
  tensors = load_file(os.path.join(src, hf_io.SINGLE_FILE))
  edit(tensors)
  save_file(tensors, os.path.join(dst, hf_io.SINGLE_FILE),
            metadata={"format": "pt"})
  return dst


def test_import_errors(tmp_path, ckpt):
  name = "model.layers.1.mlp.up_proj.weight"
  missing = _rewrite(ckpt, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj"):
    hf_io.load_hf_checkpoint(missing)

  def bad_shape(t):
    t[name] = t[name][:-1]
  wrong = _rewrite(ckpt, tmp_path / "wrong", bad_shape)
  with pytest.raises(ValueError, match=r"up_proj.weight.*shape \(47, 32\)"):
    hf_io.load_hf_checkpoint(wrong)

  def extra(t):
    t["model.layers.1.mlp.extra.weight"] = np.zeros(2, np.float32)
  unexpected = _rewrite(ckpt, tmp_path / "extra", extra)
  with pytest.raises(ValueError, match="extra.weight"):
    hf_io.load_hf_checkpoint(unexpected)

  sharded = tiny_hf.make_tiny_checkpoint(tmp_path / "sh", "llama",
                                         max_shard_size="20KB")
  index = json.load(open(os.path.join(sharded, hf_io.INDEX_FILE)))
  shard = index["weight_map"][name]
  os.remove(os.path.join(sharded, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    hf_io.load_hf_checkpoint(sharded)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_hf_checkpoint(empty)


def test_tokenizer_and_chat_template(tmp_path):
  path = tiny_hf.make_tiny_tokenizer(tmp_path / "tok", ["hello", "world"])
  tok = tok_lib.load_tokenizer(path)
  assert tok.padding_side == "left" and tok.pad_token_id == 0
  ids = tok_lib.chat_prompt_ids(tok, [{"role": "user",
                                       "content": "hello world"}])
  vocab = tok.get_vocab()
  assert ids == [vocab["<|user|>"], vocab["hello"], vocab["world"],
                 vocab["<eot>"], vocab["<|assistant|>"]]
  cfg = config_lib.DecoderConfig.tiny(eos_token_ids=(3,))
  assert tok_lib.eos_token_ids(tok, cfg) == (3, 2)
  batch = tok(["hello", "hello world"], padding=True)
  assert batch["attention_mask"][0] == [0, 1]  # left padded
  sized = tok_lib.load_tokenizer(tiny_hf.make_tiny_tokenizer(tmp_path / "n",
                                                              20))
  assert len(sized) == 20
  with pytest.raises(FileNotFoundError, match="not a directory"):
    tok_lib.load_tokenizer(tmp_path / "nope")
