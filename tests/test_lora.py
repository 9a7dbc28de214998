"""LoRA adapters over a frozen decoder: merge, gradients, onpo_step, PEFT export, memory.

Independent references: a float64 numpy merge bounded by Higham's γ_n; the
chain rule through the merged kernels and central finite differences, both in
float64; `onpo_step` on a plain list of arrays; PEFT's own LoRA layers (torch)
loading our adapter files and transformers loading the merged export; byte
counts by hand and bytes allocated on a fake 8-device mesh.
"""

import dataclasses
import functools
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import tolerances
from onpo_jax import losses
from onpo_jax.llm import export
from onpo_jax.llm import memory
from onpo_jax.models import decoder as dec
from onpo_jax.models import hf_io
from onpo_jax.models import lora
from onpo_jax.models import lora_io
from onpo_jax.models import sharding
from onpo_jax.models.config import DecoderConfig
from onpo_jax.onpo_step import onpo_anchor_params, onpo_begin_phase, onpo_end_phase, onpo_step
from onpo_jax.testing import tiny_hf

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
            head_dim=8)
# Every projection, a per-module rank and α, so the per-module scale α/r is exercised.
CFG = lora.LoraConfig(rank=4, alpha=8.0, rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0})
# PEFT adds (x A) B to x W for each projection, where we multiply x by W + s·a@b:
# each side rounds one more r-term product and one more sum per projection.
# Along a logit's path a layer has 4 projections in series (q/k/v, o, gate/up,
# down), so on top of the decoder's depth (tests/tolerances.py) come
# 2 layers × 4 × 2 sides × (r + 1) = 80 terms: 640 · eps ≈ 7.6e-5 of max |logit|.
LORA_RTOL = (tolerances.DECODER_DEPTH + 2 * 4 * 2 * (CFG.rank + 1)) * tolerances.F32_EPS


def _model(dtype="float32", seed=0, **overrides):
  cfg = DecoderConfig.tiny(**{**TINY, "param_dtype": dtype, "dtype": dtype, **overrides})
  return nnx.split(dec.Decoder(cfg, rngs=nnx.Rngs(params=seed)))


def _trained(adapters, seed=1, scale=0.3):
  """Adapters with b ≠ 0, as after training, so that a@b matters."""
  keys = jax.random.split(jax.random.key(seed), len(adapters))
  return {k: {"a": f["a"], "b": scale * jax.random.normal(kk, f["b"].shape, f["b"].dtype)}
          for kk, (k, f) in zip(keys, sorted(adapters.items()))}


def _batch(rows=3, length=7, seed=0, vocab=96):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(4, vocab, (rows, length)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  for i in range(rows):
    mask[i, :i] = False  # left padding of 0, 1, 2 ... slots
    tokens[i, :i] = 0
  return tokens, mask, np.asarray(dec.positions_from_mask(jnp.asarray(mask)))


@pytest.fixture(scope="module")
def tiny():
  return _model()


# ------------------------------------------------------------ merge and init


def test_fresh_adapters_leave_the_model_exactly_unchanged(tiny):
  graphdef, base = tiny
  ad = lora.init_adapters(base, CFG, jax.random.key(0))
  assert len(ad) == 2 * 7 and ad["layers.0.attn.o"]["a"].shape == (4, 8, 4)
  assert ad["layers.1.attn.k"]["a"].shape == (32, 2) and ad["layers.1.attn.k"]["b"].shape == (2, 2, 8)
  for key, f in ad.items():
    fan_in = math.prod(f["a"].shape[:-1])
    a = np.asarray(f["a"])
    # PEFT's Kaiming-uniform: U(±1/√in), std = 1/√(3·in); b = 0.
    assert np.abs(a).max() <= 1 / math.sqrt(fan_in) and not np.any(np.asarray(f["b"]))
    assert abs(a.std() * math.sqrt(3 * fan_in) - 1) < 0.25, key
  # a@0 = 0 and W + 0 = W: the merged state is the base, bit for bit, so one
  # compiled forward pass gives the same logits.
  merged = jax.jit(functools.partial(lora.merge, config=CFG))(base, ad)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)
  tokens, mask, pos = _batch()
  fwd = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, pos, mask)[0])
  np.testing.assert_array_equal(fwd(merged), fwd(base))
  # Merged inside the forward's program XLA may fuse the (zero) update into the
  # matmuls and sum in another order: float32 rounding only.
  fused = jax.jit(lambda a: nnx.merge(graphdef, lora.merge(base, a, CFG))(tokens, pos, mask)[0])
  tolerances.assert_close_rel(fused(ad), fwd(base), rtol=tolerances.DECODER_RTOL,
                              what="merge fused into the forward")


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merge_matches_a_float64_numpy_reference(dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    _, base = _model(dtype)
    cfg = dataclasses.replace(CFG, dtype=dtype)
    ad = _trained(lora.init_adapters(base, cfg, jax.random.key(0)))
    fn = functools.partial(lora.merge, config=cfg)
    merged = lora.flat_params((jax.jit(fn) if jit else fn)(base, ad))
    targets = lora.targets(base, cfg)
    eps = np.finfo(dtype).eps
    checked = 0
    for path, w in lora.flat_params(base).items():
      got = np.asarray(merged[path])
      assert got.dtype == w.dtype
      t = targets.get(lora.key_of(path))
      if t is None:
        np.testing.assert_array_equal(got, w)
        continue
      a = np.asarray(ad[t.key]["a"], np.float64).reshape(-1, t.rank)
      b = np.asarray(ad[t.key]["b"], np.float64).reshape(t.rank, -1)
      w64 = np.asarray(w, np.float64).reshape(a.shape[0], b.shape[1])
      ref = w64 + t.scale * a @ b
      # Higham: an r-term product, the scaling and the sum each round by at most
      # γ_{r+2}·(|W| + s|a||b|) ≤ (r + 2)·eps·(...).
      bound = (t.rank + 2) * eps * (np.abs(w64) + t.scale * np.abs(a) @ np.abs(b))
      err = np.abs(got.reshape(ref.shape) - ref)
      assert np.all(err <= bound), (t.key, float((err / bound).max()))
      assert np.abs(ref - w64).max() > 1e3 * bound.max()  # the update is far above the bound
      checked += 1
    assert checked == 14


def test_adapter_gradients_are_the_chain_rule_and_match_finite_differences():
  with jax.enable_x64(True):
    graphdef, base = _model("float64")
    cfg = dataclasses.replace(CFG, dtype="float64")
    ad = _trained(lora.init_adapters(base, cfg, jax.random.key(0)))
    tokens, mask, pos = _batch()
    weights = np.random.RandomState(1).normal(size=tokens.shape)

    def loss_of(params):
      lp = nnx.merge(graphdef, params).token_logprobs(tokens, pos, mask)
      return jnp.sum(lp * weights)

    loss = lambda b, a: loss_of(lora.merge(b, a, cfg))
    loss_ad = jax.jit(functools.partial(loss, base))
    g_base, grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, ad)
    g_w = lora.flat_params(jax.grad(loss_of)(lora.merge(base, ad, cfg)))
    # Both sides are float64 with the accumulations of the decoder's backward pass.
    rtol = tolerances.DECODER_GRAD_DEPTH * np.finfo(np.float64).eps
    for key, t in lora.targets(base, cfg).items():
      a = np.asarray(ad[key]["a"]).reshape(-1, t.rank)
      b = np.asarray(ad[key]["b"]).reshape(t.rank, -1)
      g = np.asarray(g_w[t.path]).reshape(a.shape[0], b.shape[1])
      tolerances.assert_close_rel(np.asarray(grads[key]["a"]).reshape(a.shape),
                                  t.scale * g @ b.T, rtol=rtol, what=f"d/da {key}")
      tolerances.assert_close_rel(np.asarray(grads[key]["b"]).reshape(b.shape),
                                  t.scale * a.T @ g, rtol=rtol, what=f"d/db {key}")
    # The base is frozen: no gradient reaches any of its leaves.
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(g_base))
    # Central differences along a random direction. Their error is truncation
    # h²·|L'''|/6 plus rounding ≈ (rounding of L)/h; measured along this v the
    # first is 3.4e-6 relative at h = 1e-5 (falling as h²), so at h = 1e-7 it is
    # 3.4e-10 and the rounding, ~1e-13 absolute in L ≈ 10, adds ~1e-6 / 28 ≈ 4e-8
    # at most; observed 7e-10 in all.
    keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(ad)))
    v = jax.tree.unflatten(jax.tree.structure(ad), [
        jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, jax.tree.leaves(ad))])
    h = 1e-7
    fd = (loss_ad(jax.tree.map(lambda x, d: x + h * d, ad, v))
          - loss_ad(jax.tree.map(lambda x, d: x - h * d, ad, v))) / (2 * h)
    exact = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
    assert abs(float(fd) - exact) <= 1e-7 * abs(exact), (float(fd), exact)
    assert abs(exact) > 1.0  # a direction the loss really changes along


# ---------------------------------------------------------------- onpo_step


def test_onpo_step_runs_unchanged_on_an_adapter_tree(tiny):
  """One ONPO round (auxiliary then policy regression) on adapters equals the same
  round on a plain list of arrays of the same shapes, bit for bit."""
  graphdef, base = tiny
  base_copy = jax.tree.map(np.array, base)
  tok_w, mask_w, pos_w = _batch(seed=1)
  tok_l, mask_l, pos_l = _batch(seed=2)
  resp = np.zeros(tok_w.shape, bool)
  resp[:, 4:] = True

  def seq_logps(adapters):
    model = nnx.merge(graphdef, lora.merge(base, adapters, CFG))
    return tuple((model.token_logprobs(t, p, m) * resp).sum(-1)
                 for t, m, p in ((tok_w, mask_w, pos_w), (tok_l, mask_l, pos_l)))

  opt = onpo_step(optax.adam(3e-2), variant="two_step")

  def one_round(tree, to_adapters):
    logps = jax.jit(lambda tr: seq_logps(to_adapters(tr)))

    @jax.jit
    def train_step(tr, state, anchor):
      loss_fn = lambda x: losses.onpo_loss(*logps(x), *anchor, eta=2.0)[0]
      loss, grad = jax.value_and_grad(loss_fn)(tr)
      updates, state = opt.update(grad, state, tr)
      return optax.apply_updates(tr, updates), state, loss

    begin = jax.jit(functools.partial(onpo_begin_phase, opt))
    end = jax.jit(functools.partial(onpo_end_phase, opt))
    state = jax.jit(opt.init)(tree)
    anchors, loss_curve = [], []
    for _ in range(2):
      tree, state = begin(tree, state)
      anchors.append(logps(onpo_anchor_params(state)))  # once per regression
      for _ in range(4):
        tree, state, loss = train_step(tree, state, anchors[-1])
        loss_curve.append(float(loss))
      tree, state = end(tree, state)
    return tree, state, anchors, loss_curve

  ad0 = lora.init_adapters(base, CFG, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(ad0)
  tree_a, state_a, anchors_a, curve_a = one_round(ad0, lambda t: t)
  tree_p, state_p, anchors_p, curve_p = one_round(list(leaves), treedef.unflatten)
  assert curve_a == curve_p
  for x, y in zip(jax.tree.leaves((tree_a, state_a)), jax.tree.leaves((tree_p, state_p))):
    np.testing.assert_array_equal(x, y)
  # π'_1 = π_1: the fresh adapters (b = 0, the base's log-probs); after the
  # auxiliary regression π'_2 differs.
  first = jax.jit(seq_logps)(ad0)
  np.testing.assert_array_equal(np.asarray(anchors_a[0]), np.asarray(first))
  base_logps = np.asarray(jax.jit(lambda: seq_logps(None))())
  # Sums of ≤ 7 log-probs, each rounded as tolerances.LOGPROB_RTOL states.
  tolerances.assert_close_rel(np.asarray(first), base_logps, what="π'_1 = base",
                              rtol=7 * tolerances.LOGPROB_RTOL)
  assert np.abs(np.asarray(anchors_a[1]) - base_logps).max() > 1e-3
  assert curve_a[3] < curve_a[0] and int(state_a.round) == 1
  assert all(np.any(np.asarray(f["b"])) for f in tree_a.values())
  # Only adapters moved.
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy)):
    np.testing.assert_array_equal(x, y)


# -------------------------------------------------------------------- export


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_pair(request, tmp_path_factory):
  path = tiny_hf.make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param,
                                      seed=1)
  graphdef, base = nnx.split(hf_io.load_hf_checkpoint(path))
  ad = _trained(lora.init_adapters(base, CFG, jax.random.key(3)), scale=0.2)
  return request.param, path, graphdef, base, ad


def _hf_logits(model, tokens, mask, pos):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask).long(),
                 position_ids=torch.tensor(pos).long()).logits.numpy()


def test_peft_export_loads_in_peft_with_our_logits(hf_pair, tmp_path):
  peft = pytest.importorskip("peft")
  family, path, graphdef, base, ad = hf_pair
  out = export.export_peft_adapters(ad, CFG, str(tmp_path / "adapter"),
                                    base_model_name_or_path=path)
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    cfg = json.load(f)
  assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (4, 8.0, {"k_proj": 2})
  model = peft.PeftModel.from_pretrained(tiny_hf.load_hf_model(path), out,
                                         local_files_only=True)
  # PEFT holds exactly our factors (lora_A = aᵀ, lora_B = bᵀ with heads flattened).
  q = model.base_model.model.model.layers[1].self_attn.o_proj
  np.testing.assert_array_equal(q.lora_A["default"].weight.detach().numpy(),
                                np.asarray(ad["layers.1.attn.o"]["a"]).reshape(32, 4).T)
  assert q.scaling["default"] == 3.0 / 4
  tokens, mask, pos = _batch()
  ours = jax.jit(lambda: nnx.merge(graphdef, lora.merge(base, ad, CFG))(tokens, pos, mask)[0])()
  ref = _hf_logits(model, tokens, mask, pos)
  tolerances.assert_close_rel(ours, ref, mask=mask, rtol=LORA_RTOL, what=f"{family} peft logits")
  # The adapters matter far beyond the bound: the base's logits are elsewhere.
  base_logits = nnx.merge(graphdef, base)(tokens, pos, mask)[0]
  assert tolerances.max_rel_error(base_logits, ref, mask)[0] > 100 * LORA_RTOL
  # Read back onto the same base: the same tree and config, exactly.
  back, back_cfg = export.load_peft_adapters(out, base)
  assert back_cfg == CFG
  for k in ad:
    for f in "ab":
      np.testing.assert_array_equal(back[k][f], ad[k][f])


def test_merged_export_loads_in_transformers_with_our_logits(hf_pair, tmp_path):
  family, _, graphdef, base, ad = hf_pair
  out = export.export_merged_policy(graphdef, base, ad, CFG, str(tmp_path / "merged"),
                                    dtype="float32", max_shard_size=None)
  tokens, mask, pos = _batch(seed=4)
  ours = nnx.merge(graphdef, lora.merge(base, ad, CFG))(tokens, pos, mask)[0]
  ref = _hf_logits(tiny_hf.load_hf_model(out), tokens, mask, pos)
  # A plain HF checkpoint: tests/test_hf_parity.py's bound.
  tolerances.assert_close_rel(ours, ref, mask=mask, rtol=tolerances.DECODER_RTOL,
                              what=f"{family} merged export logits")


# ---------------------------------------------------------------- bad input


def test_bad_settings_are_named_before_any_weight_exists():
  # An abstract base: the checks read shapes only.
  abstract = nnx.split(nnx.eval_shape(
      lambda: dec.Decoder(DecoderConfig.tiny(**TINY), rngs=nnx.Rngs(params=0))))[1]
  with pytest.raises(lora.LoraConfigError, match=(
      r"config.lora.target_modules: 'qq_proj' is not a projection of this model; it has "
      r"q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")):
    lora.targets(abstract, lora.LoraConfig(target_modules=("q_proj", "qq_proj")))
  for bad in (0, -2, 1.5, True):
    with pytest.raises(lora.LoraConfigError, match=r"config.lora.rank: expected an int >= 1"):
      lora.LoraConfig(rank=bad)
  # k_proj maps 32 -> 2 heads × 8 = 16.
  with pytest.raises(lora.LoraConfigError,
                     match=r"config.lora.rank: r=17 exceeds min\(in, out\) = 16 of k_proj"):
    lora.init_adapters(abstract, lora.LoraConfig(rank=17), jax.random.key(0))
  lora.targets(abstract, lora.LoraConfig(rank=16))  # the largest rank allowed
  with pytest.raises(lora.LoraConfigError, match=r"config.lora.rank_pattern\['v_proj'\]: r=20"):
    lora.targets(abstract, lora.LoraConfig(rank=4, rank_pattern={"v_proj": 20}))
  with pytest.raises(lora.LoraConfigError, match=r"config.lora.rank_pattern: \['lm_head'\]"):
    lora.LoraConfig(rank_pattern={"lm_head": 2})
  with pytest.raises(lora.LoraConfigError, match=r"config.lora.dropout"):
    lora.LoraConfig(dropout=0.1)
  for bad in (0, float("inf"), float("nan"), True):
    with pytest.raises(lora.LoraConfigError, match=r"config.lora.alpha: expected a finite number"):
      lora.LoraConfig(alpha=bad)
  assert lora.LoraConfig(target_modules="all-linear").target_modules == lora.ALL_LINEAR


def test_adapters_onto_another_base_are_refused(tiny):
  _, base = tiny
  ad = _trained(lora.init_adapters(base, CFG, jax.random.key(0)))
  fingerprint = lora_io.base_fingerprint(base)
  # The same weights on a sharded mesh: the fingerprint reads values, not layouts.
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = jax.device_put(base, sharding.state_shardings(base, mesh))
  assert lora_io.base_fingerprint(sharded) == fingerprint
  lora_io.check_base_fingerprint(sharded, fingerprint)
  _, other = _model(seed=5)
  with pytest.raises(lora.BaseMismatchError, match="same architecture and dtypes, different"):
    lora_io.check_base_fingerprint(other, fingerprint)
  with pytest.raises(lora.BaseMismatchError, match="shapes or dtypes differ"):
    lora_io.check_base_fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base),
                                   fingerprint)
  _, wider = _model(intermediate_size=64)
  with pytest.raises(lora.BaseMismatchError, match=(r"adapters\['layers.0.mlp.gate'\]\['b'\] has shape \(4, 48\); this base with "
                     r"rank 4 needs \(4, 64\)")):
    lora.merge(wider, ad, CFG)
  with pytest.raises(lora.LoraConfigError, match="made for other target modules"):
    lora.merge(base, ad, dataclasses.replace(CFG, target_modules=("q_proj",), rank_pattern={},
                                             alpha_pattern={}))


def test_peft_files_that_do_not_fit_are_refused(tiny, tmp_path):
  _, base = tiny
  ad = lora.init_adapters(base, CFG, jax.random.key(0))
  out = export.export_peft_adapters(ad, CFG, str(tmp_path / "a"))
  _, wider = _model(intermediate_size=64)
  with pytest.raises(lora.BaseMismatchError, match="gate_proj.lora_B.weight"):
    export.load_peft_adapters(out, wider)
  cfg = lora_io.peft_adapter_config(CFG)
  with pytest.raises(lora.LoraConfigError, match="use_dora=True is not supported"):
    lora_io.lora_config_from_peft({**cfg, "use_dora": True})
  with pytest.raises(lora.LoraConfigError, match="is a regex"):
    lora_io.lora_config_from_peft({**cfg, "target_modules": ".*proj"})
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    export.load_peft_adapters(str(tmp_path), base)


# -------------------------------------------------------------------- memory

MESH1 = {"data": 1, "fsdp": 1, "tensor": 1}


def test_lora_memory_equals_a_hand_count():
  cfg = DecoderConfig.tiny(**TINY)
  d, v, f, layers = 32, 96, 48, 2
  q = d * 4 * 8  # [D, H, d]; o is its transpose
  kv = d * 2 * 8  # [D, Hkv, d]
  kernels = 2 * q + 2 * kv + 3 * d * f
  base = 2 * v * d + d + layers * (2 * d + kernels)
  # r·(in + out): q, k (r = 2), v, o, gate, up, down.
  adapters = layers * (4 * (d + 32) + 2 * (d + 16) + 4 * (d + 16) + 4 * (32 + d)
                       + 2 * 4 * (d + f) + 4 * (f + d))
  est = memory.estimate(cfg, onpo_step(optax.adam(1e-3)), MESH1, lora=CFG,
                        base_dtype="bfloat16", kv_batch_size=2, kv_length=8,
                        ref_config=cfg, judge_config=cfg.replace(param_dtype="bfloat16"))
  assert est.num_params == base and est.num_adapter_params == adapters
  assert est.policy_params == 2 * base  # the frozen base in bfloat16
  assert est.adapter_params == 4 * adapters  # float32
  assert est.merged_params == 2 * layers * kernels
  # Adam's mu and nu and onpo_step's π' copy of the adapters; Adam's count and
  # onpo_step's round, phase and step are int32 scalars.
  assert est.optimizer == 3 * 4 * adapters + 4 * 4
  assert est.ref_params == 0  # π_ref is the base itself
  assert est.judge_params == 2 * base
  # k and v [layers, B, S, Hkv, d] float32, the mask [B, S] bool, the index int32.
  assert est.kv_cache == 2 * layers * 2 * 8 * 2 * 8 * 4 + 2 * 8 + 4
  assert est.gradients == 4 * adapters  # of the adapters only, float32
  assert est.total == (est.policy_params + est.adapter_params + est.merged_params
                       + est.optimizer + est.gradients + est.judge_params + est.kv_cache)


def test_lora_memory_equals_bytes_allocated_on_a_sharded_mesh():
  mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
  cfg = DecoderConfig.tiny(**TINY)
  mesh = sharding.make_mesh((2, 2, 2))
  model = sharding.create_sharded_model(cfg, mesh)
  base = nnx.state(model, nnx.Param)
  shardings = lora.adapter_shardings(base, CFG, mesh, sharding.DEFAULT_RULES)
  ad = jax.device_put(lora.init_adapters(base, CFG, jax.random.key(0)), shardings)
  assert ad["layers.0.attn.q"]["b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  opt = onpo_step(optax.adam(1e-3))
  state = opt.init(ad)
  est = memory.estimate(cfg, opt, mesh_shape, lora=CFG)
  dev = jax.devices()[0]

  def on_device0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)

  assert est.adapter_params == on_device0(ad)
  assert est.optimizer == on_device0(state)
  assert est.policy_params == on_device0(base)


def _paper(name, arg):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_llama3_8b_onpo_lora_fits_one_accelerator_where_full_fine_tuning_does_not():
  """ONPO with the judge resident, one device (an 80 GB GPU or a 95 GB TPU v5p chip)."""
  plans = memory.lora_comparison(_paper("llama3_8b_onpo", ""), (1, 1, 1), ranks=(16, 64),
                                 backend="gpu")
  gib = memory.GIB
  print("\nLlama-3-8B ONPO + judge, one device, GiB (activations not counted):")
  for name, est in plans.items():
    fits = {cap: est.total <= cap * 1e9 for cap in (80, 95)}
    print(f"  {name:9s} total {est.total / gib:6.2f}  base/policy {est.policy_params / gib:5.2f}"
          f"  adapters {est.adapter_params / gib:4.2f}  merged {est.merged_params / gib:5.2f}"
          f"  optimizer {est.optimizer / gib:6.2f}  judge {est.judge_params / gib:5.2f}"
          f"  kv {est.kv_cache / gib:5.2f}  fits 80 GB {fits[80]}, 95 GB {fits[95]}")
  full, r16, r64 = plans["full"], plans["lora_r16"], plans["lora_r64"]
  assert r16.total < r64.total < full.total
  assert full.total > 95e9 and r64.total < 80e9
  # rank-16 adapters on all 7 projections of 32 layers: 16·(in + out) summed.
  per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + 3 * (4096 + 14336))
  assert r16.num_adapter_params == 32 * per_layer == 41_943_040
  assert r16.policy_params == 2 * full.num_params  # the bfloat16 base
  assert r16.ref_params == 0 and full.ref_params == 0


def test_smollm2_lora_plan_from_the_gguf_metadata():
  c = importlib.import_module("configs.smollm2").get_config("tiny")
  plan = memory.estimate_memory(c, (1, 1, 1), lora=lora.LoraConfig(rank=16), base_dtype="float32")
  assert plan.num_adapter_params > 0 and plan.policy_params == 4 * plan.num_params
