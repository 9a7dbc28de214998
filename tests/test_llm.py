"""Tests for onpo_jax.llm: the `llm` experiment on tiny local checkpoints.

Pure pieces (schedule, masked sequences, accumulation, fingerprints) are checked
against independent numpy references; the shrunk paper configs run one full
round on CPU with tiny random checkpoints of the paper's architecture families
(Llama, Mistral); the exported HF directory is loaded with transformers and its
logits compared with ours.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from configs import llm_common
from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import config as llm_config
from onpo_jax.llm import evaluation
from onpo_jax.llm import export
from onpo_jax.llm import job
from onpo_jax.llm import optim
from onpo_jax.models import hf_io
from onpo_jax.models import sharding
from onpo_jax.selfplay import examples
from onpo_jax.selfplay import fingerprint
from onpo_jax.testing import tiny_hf
import tolerances

WORDS = ("A B hello world what is two plus three sky blue red green yes no maybe the a of to "
         "and in it you that for on are with as be at this have from or one had by word but "
         "not all were we when your can said there use an each which she do how their if").split()


def _paper(name, arg="tiny"):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("llm")
  import transformers
  tok_dir = tiny_hf.make_tiny_tokenizer(str(root / "tok"), WORDS)
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  paths = {}
  for name, family, seed in (("llama", "llama", 1), ("mistral", "mistral", 2), ("judge", "llama", 3)):
    # One layer: compile time dominates these tests and scales with depth.
    paths[name] = tiny_hf.make_tiny_checkpoint(str(root / name), family, seed=seed, vocab_size=96,
                                               num_hidden_layers=1)
    tok.save_pretrained(paths[name])
  prompts = root / "prompts.jsonl"
  with open(prompts, "w") as f:
    for i in range(8):
      f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(WORDS[3 * i:3 * i + 4])}) + "\n")
  evals = root / "eval.json"
  evals.write_text(json.dumps([{"instruction": "what is two plus three", "dataset": "toy"},
                               {"instruction": "is the sky blue"}, {"instruction": "hello"}]))
  return dict(root=root, tok=tok, prompts=str(prompts), eval=str(evals), **paths)


def _tiny(name, assets, family):
  c = _paper(name)
  c.policy.path = assets[family]
  c.judge.path = assets["judge"]
  c.data.source = "files"
  c.data.paths = assets["prompts"]
  return c


# ---------------------------------------------------------------- pure pieces


def _np_cosine(s, peak, w, t):
  if s < w:
    return peak * s / w
  return peak * 0.5 * (1 + np.cos(np.pi * min(1.0, (s - w) / (t - w))))


# (w, T): the paper-like case, no warm-up (what short regressions get), one update.
@pytest.mark.parametrize("warmup, total", [(3, 100), (0, 100), (0, 1)])
@pytest.mark.parametrize("use_jit", [False, True])
def test_warmup_cosine_matches_numpy(use_jit, warmup, total):
  fn = optim.warmup_cosine(peak=5e-7, warmup_steps=warmup, total_steps=total)
  fn = jax.jit(fn) if use_jit else fn
  for s in (0, 1, 2, 3, 4, 50, 99, 100, 150):
    # float32 arithmetic on values of size 5e-7: 1e-6 relative.
    np.testing.assert_allclose(float(fn(s)), _np_cosine(s, 5e-7, warmup, total), rtol=1e-6,
                               atol=1e-14)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.warmup_cosine(peak=1.0, warmup_steps=5, total_steps=5)


def test_full_sequences_never_score_pads():
  pt = np.array([[0, 5, 6], [7, 8, 9]])
  pm = np.array([[False, True, True], [True, True, True]])
  resp = np.array([[11, 2, 13], [14, 15, 16]])  # row 0 ends at EOS = 2
  rmask = np.array([[True, True, False], [True, True, True]])
  tok, attn, scored = examples.full_sequences(pt, pm, resp, rmask, pad_id=0)
  np.testing.assert_array_equal(tok, [[0, 5, 6, 11, 2, 0], [7, 8, 9, 14, 15, 16]])
  np.testing.assert_array_equal(attn, np.concatenate([pm, rmask], 1))
  np.testing.assert_array_equal(scored, [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
  with pytest.raises(ValueError, match="responses/response_mask"):
    examples.full_sequences(pt, pm, resp, rmask[:, :2], pad_id=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_accumulated_update_equals_full_batch_adam(dtype):
  """Two micro-batches then one AdamW update == the numpy first Adam step on the mean."""
  with jax.enable_x64(dtype == jnp.float64):
    c = _paper("llama3_8b_onpo")
    c.selfplay.lr_schedule = "constant"
    c.selfplay.max_grad_norm = 10.0
    c.selfplay.global_batch_size, c.selfplay.minibatch_size = 4, 2
    opt = optim.make_inner_optimizer(c, num_updates=1)
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(3, 2)), dtype)}
    g1, g2 = ({"w": jnp.asarray(rng.normal(size=(3, 2)), dtype)} for _ in range(2))
    state = opt.init(p)
    u1, state = jax.jit(opt.update)(g1, state, p)
    np.testing.assert_array_equal(u1["w"], 0.0)  # no update before the global batch is complete
    u2, state = jax.jit(opt.update)(g2, state, p)
    g = (np.asarray(g1["w"], np.float64) + np.asarray(g2["w"], np.float64)) / 2
    scale = min(1.0, 10.0 / np.linalg.norm(g))
    g = g * scale
    # Adam's first step with bias correction: m̂ = g, v̂ = g².
    want = -c.selfplay.learning_rate * g / (np.abs(g) + 1e-8)
    # float32: optax forms the bias correction 1 − β2^t in float32, where
    # β2 = 0.999 rounds to 0.99900001 (1.3e-5 relative in 1 − β2, 6.5e-6 after the
    # square root), hence 1e-5; float64: rounding only.
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(np.asarray(u2["w"], np.float64), want, rtol=tol, atol=0)
    assert u2["w"].dtype == dtype


def test_device_fingerprint_is_sharding_invariant_and_bit_sensitive():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
  tree = {"a": x, "b": x.astype(jnp.bfloat16)}
  mesh = sharding.make_mesh((2, 4, 1))
  sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data", "fsdp")))
  fp = fingerprint.fingerprint(tree)
  np.testing.assert_array_equal(fp, fingerprint.fingerprint(sharded))
  bumped = dict(tree, a=tree["a"].at[3, 5].set(jnp.nextafter(tree["a"][3, 5], jnp.inf)))
  assert not np.array_equal(fp, fingerprint.fingerprint(bumped))
  swapped = dict(tree, a=tree["a"][::-1])  # same values, other places
  assert not np.array_equal(fp, fingerprint.fingerprint(swapped))


def _numpy_fingerprint(leaves):
  """Σ u_j and Σ u_j·(j + 1)·(2i + 1) mod 2^32 over leaves i, u = the bits as uint32."""
  total, weighted = 0, 0
  for i, x in enumerate(leaves):
    x = np.asarray(x)
    u = x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.itemsize]) if (
        x.dtype.kind == "f" or x.dtype.name == "bfloat16") else x
    u = [int(v) % 2**32 for v in u.ravel()]
    total += sum(u)
    weighted += sum(v * (j + 1) * (2 * i + 1) for j, v in enumerate(u))
  return np.asarray([total % 2**32, weighted % 2**32], np.int64)


def test_device_fingerprint_matches_numpy_and_tells_same_shaped_leaves_apart():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  tree = {"a": a, "b": a.astype(jnp.bfloat16), "c": c, "d": jnp.arange(5, dtype=jnp.int32)}
  np.testing.assert_array_equal(fingerprint.fingerprint(tree),
                                _numpy_fingerprint(jax.tree.leaves(tree)))
  # Two leaves of one shape exchanged: same bits overall, other leaf indices.
  assert not np.array_equal(fingerprint.fingerprint(tree),
                            fingerprint.fingerprint(dict(tree, a=c, c=a)))


def test_validate_config_names_the_field(assets):
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.policy.path = ""
  with pytest.raises(ValueError, match="config.policy.path"):
    llm_config.validate_config(c)
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.selfplay.global_batch_size = 3
  with pytest.raises(ValueError, match="global_batch_size=3 must be a positive multiple"):
    llm_config.validate_config(c)
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.selfplay.prompts_per_round = 6
  with pytest.raises(ValueError, match="not a multiple of selfplay.global_batch_size"):
    llm_config.validate_config(c)
  # A ConfigDict keeps a field's type; a config built from a dict need not.
  d = _tiny("llama3_8b_onpo", assets, "llama").to_dict()
  d["check_memory"] = 1
  with pytest.raises(ValueError, match="config.check_memory must be True or False; got 1"):
    llm_config.validate_config(ml_collections.ConfigDict(d))
  with pytest.raises(ValueError, match="mesh variant"):
    _paper("llama3_8b_onpo", "v9-1024")


@pytest.mark.parametrize("section, match", [
    (dict(kind="rm"), r"config\.eval\.judges\.extra\.kind must be one of"),
    (dict(kind="pairwise"), r"config\.eval\.judges\.extra\.path must be a local path"),
    (dict(kind="verifiable", preset="mine"), r"config\.eval\.judges\.extra\.preset"),
    (dict(kind="verifiable", micro_batch_size=0),
     r"config\.eval\.judges\.extra\.micro_batch_size"),
])
def test_validate_config_names_the_evaluation_judge_field(assets, section, match):
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.eval.judges.extra = llm_common.judge_section(**section)
  with pytest.raises(ValueError, match=match):
    llm_config.validate_config(c)


@pytest.mark.parametrize("content, match", [
    (b'{"id": "a", "prompt": "hello"}\n\xff\xfe\n', r"bad\.jsonl:2"),
    (b'{"id": "a", "prompt": "hello"}\n', r"has 1 usable prompts; .* needs 4"),
])
def test_bad_prompt_files_are_named_before_the_workdir_exists(assets, tmp_path, content, match):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(content)
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.data.paths = str(bad)
  with pytest.raises(ValueError, match=match):
    job.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_evaluation_judges_need_an_evaluation_file(assets):
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.eval.judges.extra = llm_common.judge_section(kind="verifiable")
  c.eval.prompt_file = ""
  with pytest.raises(ValueError, match=r"config\.eval\.prompt_file must be a local path when "
                                       r"eval\.judges is set"):
    llm_config.validate_config(c)
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.eval.show_examples = -1
  with pytest.raises(ValueError, match=r"config\.eval\.show_examples must be an int >= 0"):
    llm_config.validate_config(c)
  with pytest.raises(ValueError, match=r"judge_section: unknown fields \['knd'\]"):
    llm_common.judge_section(knd="verifiable")


# ---------------------------------------------------------------------- export


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_transformers_gives_same_logits(assets, tmp_path, dtype):
  mesh = sharding.make_mesh((2, 2, 2))
  model = hf_io.load_hf_checkpoint(assets["llama"], mesh=mesh)
  graphdef, params = nnx.split(model)
  # Move away from the checkpoint so a stale export cannot pass.
  params = jax.tree.map(lambda x: x * 1.1 + 0.01, params)
  out = export.export_policy(graphdef, params, str(tmp_path / "export"), dtype=dtype,
                             max_shard_size="20KB", tokenizer=assets["tok"])
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == dtype
  hf = tiny_hf.load_hf_model(out)
  ids = np.array([[1, 9, 23, 40, 7, 3, 55, 2]])
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  ours_params = jax.tree.map(lambda x: x.astype(dtype).astype(jnp.float32), params)
  ours = nnx.merge(graphdef, ours_params)
  pos = jnp.arange(ids.shape[1])[None]
  got, _ = ours(jnp.asarray(ids, jnp.int32), pos, jnp.ones(ids.shape, bool))
  # Same (rounded) weights in float32 on both sides: summation order only, i.e.
  # rounding proportional to the logits' magnitude, bounded relative to
  # max |logit| by tolerances.DECODER_RTOL (eps × the tiny decoder's
  # accumulation depth, ≈ 6.7e-5; was rtol = atol = 1e-4 elementwise).
  tolerances.assert_close_rel(got, want, rtol=tolerances.DECODER_RTOL,
                              what=f"{dtype} export vs transformers")


# ------------------------------------------------------------ one full round


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("check_memory", [True, False])
def test_a_plan_beyond_the_device_stops_before_any_model_loads(assets, tmp_path, monkeypatch,
                                                               check_memory):
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.check_memory = check_memory
  monkeypatch.setattr(job.memory_lib, "device_capacity", lambda: (1024, "a made-up device"))

  def load(*args, **kwargs):
    raise RuntimeError("a model was loaded")
  monkeypatch.setattr(job, "build_oracle", load)
  if check_memory:
    with pytest.raises(job.memory_lib.MemoryPlanError,
                       match=r"exceeds the 0\.00 GiB of one device \(a made-up device\)"):
      job.run(c, str(tmp_path / "run"))
  else:  # the run goes on to load the judge
    with pytest.raises(RuntimeError, match="a model was loaded"):
      job.run(c, str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run" / "checkpoints") == []  # nothing saved


def test_llama_configs_run_one_round(assets, tmp_path):
  """The shrunk llama3_8b_{onpo,inpo,idpo} configs, side by side in one run."""
  c = _tiny("llama3_8b_onpo", assets, "llama")
  c.selfplay.methods = ("onpo_two_step", "inpo", "dpo")  # the three configs' methods
  c.eval.prompt_file = assets["eval"]
  c.eval.max_prompts = 2  # the evaluation path is also checked across processes (test_multihost)
  c.ref.offload = True  # π_ref (INPO and DPO anchor) in pinned host memory between uses
  c.mesh.shape = (2, 2, 2)
  workdir = str(tmp_path / "run")
  summary = job.run(c, workdir)
  rows = _metrics(workdir)
  assert [r["unit"] for r in rows] == [1, 2, 3]
  for name, r in zip(c.selfplay.methods, rows):
    loss_keys = [k for k in r if k.endswith("/loss")]
    assert loss_keys and all(np.isfinite(r[k]) for k in loss_keys)
    assert r[f"{name}/oracle_queries"] == 4 * 5  # 4 prompts x tournament of K = 4
    assert 0 <= r[f"{name}/eval/ci_low"] <= r[f"{name}/eval/win_rate"] <= r[f"{name}/eval/ci_high"] <= 1
    recs = alpaca_eval.read_outputs(os.path.join(workdir, "alpaca_eval", f"{name}_round1.json"))
    assert [x["instruction"] for x in recs] == ["what is two plus three", "is the sky blue"]
    assert {x["generator"] for x in recs} == {f"{name}-round1"} and recs[0]["dataset"] == "toy"
  assert "onpo_two_step/aux/loss" in rows[0] and "onpo_two_step/policy/loss" in rows[0]
  alpaca_eval.read_outputs(os.path.join(workdir, "alpaca_eval", "sft.json"))
  for name in c.selfplay.methods:
    assert tiny_hf.load_hf_model(summary["export"][name]) is not None
  plan = json.load(open(os.path.join(workdir, "memory.json")))
  # π_ref is offloaded, so the plan holds no device bytes for it.
  assert plan["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2} and plan["ref_params"] == 0
  assert plan["optimizer"] > 0 and plan["kv_cache"] > 0
  assert plan["gradients"] == plan["policy_params"]
  # Each method's compiled train step, read after its first round: the donated
  # state (a device's shard of the parameters and optimizer state) written in place.
  compiled = plan["train_step_compiled"]
  assert set(compiled) == set(c.selfplay.methods)
  for name, m in compiled.items():
    assert m["aliased"] >= plan["policy_params"] and m["temporaries"] > 0, name
    assert m["arguments"] > m["aliased"] and m["peak"] > m["arguments"], name


def test_mistral_config_runs_one_round(assets, tmp_path):
  c = _tiny("mistral_7b_onpo", assets, "mistral")
  c.judge.offload = True  # the judge in pinned host memory between calls
  c.selfplay.minibatch_size = 4  # no accumulation (tested with the llama configs)
  c.mesh.shape = (1, 2, 2)
  workdir = str(tmp_path / "run")
  summary = job.run(c, workdir)
  (row,) = _metrics(workdir)
  assert np.isfinite(row["onpo_two_step/policy/loss"])
  assert json.load(open(os.path.join(summary["export"]["onpo_two_step"], "config.json")))[
      "model_type"] == "mistral"


def test_example_lines_cut_long_texts_and_show_newlines():
  lines = evaluation.example_lines(["Say hi.", "Write a poem.", "unused"],
                                   ["Hello!", "Roses\n\nare red " + "x" * 100],
                                   ["  Hi there.  ", "ok"], 2, width=20)
  assert lines == ["  example 1: Say hi.", "    before: Hello!", "    after:  Hi there.",
                   "  example 2: Write a poem.", "    before: Roses ⏎ are red xxx…",
                   "    after:  ok"]
  assert evaluation.example_lines(["a"], ["b"], ["c"], 0) == []
