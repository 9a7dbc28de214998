"""LoRA in the `llm` job: adapters over one frozen base through the engine, checkpoints, export.

The `:lora,tiny` paper config runs ONPO and iterative DPO for two rounds on a
tiny Llama checkpoint over a (1, 2, 2) mesh. Checked: what the checkpoints hold
(only adapter-shaped arrays and the base's fingerprint), the PEFT export read by
`peft` onto the transformers base against the merged HF export, an interrupted
and resumed run against the uninterrupted one, a resume onto other base weights
(refused, nothing lost), the base entering the train step as an argument, and
the adapters' gradient through the engine's train step against the chain rule
of the full model's gradient.
"""

import functools
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

from onpo_jax.llm import adapted as adapted_lib
from onpo_jax.llm import backend as backend_lib
from onpo_jax.llm import job
from onpo_jax.models import hf_io
from onpo_jax.models import lora
from onpo_jax.models import lora_io
from onpo_jax.selfplay import engine as engine_lib
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.selfplay.methods import PairLogps
from onpo_jax.testing import tiny_hf
from test_llm import assets  # noqa: F401  (the module fixture: tiny checkpoints, prompts)
import tolerances

RANK = 16  # llm_common.use_lora
# PEFT adds (x A) B per projection where we multiply by W + s·a@b: one more
# r-term product and sum per projection and side, 4 projections in series per
# layer, 1 layer (test_lora.py derives the same bound for its 2-layer model).
PEFT_RTOL = (tolerances.DECODER_DEPTH + 4 * 2 * (RANK + 1)) * tolerances.F32_EPS
TIMING = ("tokens_per_s",)


def _config(paths, policy_path=None):
  c = importlib.import_module("configs.llama3_8b_onpo").get_config("lora,tiny")
  c.policy.path = policy_path or paths["llama"]
  c.judge.path = paths["judge"]
  c.data.source = "files"
  c.data.paths = paths["prompts"]
  c.selfplay.methods = ("onpo_two_step", "dpo")
  c.selfplay.num_rounds = 2
  c.eval.prompt_file = paths["eval"]
  c.eval.max_prompts = 2
  c.mesh.shape = (1, 2, 2)
  return c


def _numbers(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.loads(f.read().replace(workdir, "<workdir>"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
            for line in f if line.strip()]
  return summary, rows


@pytest.fixture(scope="module")
def clean_run(assets, tmp_path_factory):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("lora_clean") / "run")
  return workdir, job.run(_config(assets), workdir)


def test_the_lora_config_differs_from_full_fine_tuning_only_in_lora_and_the_rate():
  from configs import llama3_8b_onpo  # pylint: disable=g-import-not-at-top
  full, with_lora = (llama3_8b_onpo.get_config(a).to_dict() for a in ("", "lora"))
  assert with_lora["lora"] == dict(full["lora"], enabled=True)
  assert with_lora["selfplay"]["learning_rate"] == 10 * full["selfplay"]["learning_rate"]
  for d in (full, with_lora):
    d.pop("lora")
    d["selfplay"].pop("learning_rate")
  assert with_lora == full


def test_checkpoints_hold_only_adapters_and_the_base_fingerprint(assets, clean_run):  # noqa: F811
  workdir, summary = clean_run
  step = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  tree = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "arrays"))
  tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(tree)]
  arrays = [s for s in shapes if s]
  # Factors a (in..., r) and b (r, out...), their Adam moments and π' copies;
  # counters are scalars. No kernel, embedding or norm of the base.
  assert arrays and all(s[0] == RANK or s[-1] == RANK for s in arrays), sorted(set(arrays))
  graphdef, base = nnx.split(hf_io.load_hf_checkpoint(assets["llama"]))
  n_adapter = lora.num_adapter_params(base, adapted_lib.lora_config(_config(assets).lora))
  n_saved = sum(int(np.prod(s)) for s in arrays)
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  # ONPO: θ, π', Adam μ and ν, the gradient accumulator of optax.MultiSteps (5
  # copies); DPO: the same without π' (4).
  assert n_saved == 9 * n_adapter < 6 * n_base, (n_saved, n_adapter, n_base)
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    meta = json.load(f)
  assert meta["lora_base_fingerprint"] == lora_io.base_fingerprint(base)
  assert summary["memory"]["num_adapter_params"] == n_adapter
  del graphdef


def test_peft_export_in_peft_equals_the_merged_export_in_transformers(assets, clean_run):  # noqa: F811
  peft = pytest.importorskip("peft")
  _, summary = clean_run
  tokens = np.array([[5, 9, 14, 3, 22, 7, 41], [0, 0, 12, 19, 4, 33, 8]])
  mask = (np.arange(7) >= np.array([[0], [2]])).astype(np.int64)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)

  def logits(model):
    with torch.no_grad():
      return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos)).logits.numpy()

  for name in ("onpo_two_step", "dpo"):
    adapter_dir = summary["export_adapters"][name]
    merged = logits(tiny_hf.load_hf_model(summary["export"][name]))
    model = peft.PeftModel.from_pretrained(tiny_hf.load_hf_model(assets["llama"]), adapter_dir,
                                           local_files_only=True)
    tolerances.assert_close_rel(logits(model), merged, mask=mask, rtol=PEFT_RTOL,
                                what=f"{name}: peft(base, adapters) vs merged export")
    # The adapters were trained: b moved from 0 and the model from the base.
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert float(b.abs().max()) > 0
    base_logits = logits(tiny_hf.load_hf_model(assets["llama"]))
    assert tolerances.max_rel_error(base_logits, merged, mask)[0] > 100 * PEFT_RTOL


def test_interrupted_lora_run_resumes_to_the_same_results(assets, clean_run, tmp_path,  # noqa: F811
                                                         monkeypatch):
  clean_dir, _ = clean_run
  policy = shutil.copytree(assets["llama"], str(tmp_path / "policy"))
  config = _config(assets, policy)
  workdir = str(tmp_path / "run")
  real, calls = engine_lib.Engine.run_round, []

  def stop_at_unit_3(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("stopped in unit 3")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(engine_lib.Engine, "run_round", stop_at_unit_3)
  with pytest.raises(KeyboardInterrupt):
    job.run(config, workdir)
  monkeypatch.setattr(engine_lib.Engine, "run_round", real)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert max(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == 2

  # Other weights at the same path: the adapters' base is gone; refused, nothing lost.
  saved = {n: open(os.path.join(checkpoints, "2", "meta", "metadata")).read() for n in ("meta",)}
  tiny_hf.make_tiny_checkpoint(policy, "llama", seed=7, vocab_size=96, num_hidden_layers=1)
  with pytest.raises(lora.BaseMismatchError, match="config.policy.path="):
    job.run(config, str(workdir))
  assert open(os.path.join(checkpoints, "2", "meta", "metadata")).read() == saved["meta"]
  shutil.rmtree(policy)
  shutil.copytree(assets["llama"], policy)

  job.run(config, workdir)
  got_summary, got_rows = _numbers(workdir)
  want_summary, want_rows = _numbers(clean_dir)
  for s in (got_summary, want_summary):  # the policy path differs; nothing else may
    s.pop("export"), s.pop("export_adapters")
  assert got_rows == want_rows
  assert got_summary == want_summary
  with open(os.path.join(workdir, "export", "dpo", "adapter", "adapter_model.safetensors"),
            "rb") as f, open(os.path.join(clean_dir, "export", "dpo", "adapter",
                                          "adapter_model.safetensors"), "rb") as g:
    assert f.read() == g.read()


def test_bad_lora_settings_are_named_before_the_workdir_exists(assets, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "run")
  c = _config(assets)
  c.lora.rank = 10_000
  with pytest.raises(lora.LoraConfigError, match=r"config\.lora\.rank: r=10000 exceeds"):
    job.run(c, workdir)
  c = _config(assets)
  c.ref.offload = True
  with pytest.raises(ValueError, match=r"config\.ref\.offload must be False when lora\.enabled"):
    job.run(c, workdir)
  c = _config(assets)
  c.lora.target_modules = ("q_proj", "lm_head")
  with pytest.raises(ValueError, match=r"config\.lora\.target_modules must be 'all-linear'"):
    job.run(c, workdir)
  assert not os.path.exists(workdir)


# ------------------------------------------------------ the engine's train step


@pytest.fixture(scope="module")
def lora_engine(assets):  # noqa: F811
  config = _config(assets)
  config.mesh.shape = (1, 1, 1)
  graphdef, base = nnx.split(hf_io.load_hf_checkpoint(assets["llama"]))
  policy, adapters = adapted_lib.adapted_params(config, base)
  # Trained adapters (b ≠ 0), so that both factors get a gradient.
  adapters = {k: {"a": f["a"], "b": 0.1 * jax.random.normal(jax.random.key(i), f["b"].shape)}
              for i, (k, f) in enumerate(sorted(adapters.items()))}

  def make(adapted):
    return backend_lib.LLMBackend(graphdef, nnx.merge(graphdef, base).config, None, config,
                                  eos_ids=(2,), pad_id=0, adapted=adapted)

  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(3, 96, (4, 9)), jnp.int32)
  attn = jnp.ones((4, 9), jnp.int32)
  resp = jnp.asarray(np.arange(9) >= 4, jnp.float32) * attn
  batch = PairBatch(tok[:2], attn[:2], resp[:2], tok[2:], attn[2:], resp[2:], jnp.ones(2))
  anchors = {"ref": PairLogps(jnp.array([-30.0, -31.0]), jnp.array([-29.0, -33.0]))}
  return dict(config=config, graphdef=graphdef, base=base, policy=policy, adapters=adapters,
              lora_backend=make(policy), full_backend=make(None), batch=batch, anchors=anchors)


def _dpo_loss(engine, params, frozen, batch, anchors):
  """The loss of the engine's DPO train step (its `loss_fn`), as a function of params."""
  from onpo_jax.selfplay.methods import METHODS  # pylint: disable=g-import-not-at-top
  lp = engine_lib._policy_logps(engine.backend, params, batch, frozen)
  return METHODS["dpo"].loss(engine.config, lp, anchors, None, batch.weight)[0]


def test_the_base_is_an_argument_of_the_train_step_never_a_constant(lora_engine):
  e = lora_engine
  engine = engine_lib.Engine(e["lora_backend"], e["config"])
  state = engine.init_state("dpo", e["adapters"])
  args = (state["params"], state["opt_state"], e["batch"], e["anchors"], jnp.arange(2),
          jnp.ones(2, bool), jnp.float32(1.0))
  closed = jax.make_jaxpr(functools.partial(engine._train_step_impl, "dpo"))(*args,
                                                                             frozen=e["base"])
  biggest_const = max((np.size(c) for c in closed.consts), default=0)
  smallest_kernel = min(np.size(x) for x in jax.tree.leaves(e["base"]) if np.ndim(x) >= 2)
  assert biggest_const < smallest_kernel
  base_leaves = len(jax.tree.leaves(e["base"]))
  assert len(closed.jaxpr.invars) >= base_leaves + 2 * len(jax.tree.leaves(e["adapters"]))
  # The jitted step runs and moves only the adapters.
  params, _, metrics = engine._train_step["dpo"](*args, frozen=e["base"])
  assert np.isfinite(float(metrics["loss"]))
  assert jax.tree.structure(params) == jax.tree.structure(e["adapters"])


def test_adapter_gradients_through_the_train_step_are_the_chain_rule(lora_engine):
  """dL/da = s·G bᵀ and dL/db = s·aᵀ G with G = dL/dW of the merged model (Hu et al. eq. 3).

  G comes from the full-weight backend's pass over the merged weights; the
  adapters' gradients from the LoRA backend, the base as the frozen argument.
  Both backward passes are the same float32 computation (DECODER_GRAD_DEPTH);
  the r-term product adds r roundings of s·|G|·|b| (or |a|).
  """
  e = lora_engine
  lora_engine_ = engine_lib.Engine(e["lora_backend"], e["config"])
  full_engine = engine_lib.Engine(e["full_backend"], e["config"])
  cfg, base, ad = e["policy"].lora, e["base"], e["adapters"]
  loss = lambda p, f: _dpo_loss(lora_engine_, p, f, e["batch"], e["anchors"])
  grads = jax.jit(jax.grad(loss))(ad, base)
  full_loss = lambda p: _dpo_loss(full_engine, p, None, e["batch"], e["anchors"])
  full = lora.flat_params(jax.jit(jax.grad(full_loss))(e["policy"].materialize(ad)))
  depth = (tolerances.DECODER_GRAD_DEPTH + RANK) * tolerances.F32_EPS
  targets = lora.targets(base, cfg)
  assert len(targets) == 7  # one layer, every projection
  for key, t in targets.items():
    g = np.asarray(full[t.path], np.float64).reshape(int(np.prod(t.in_shape)), -1)
    a = np.asarray(ad[key]["a"], np.float64).reshape(-1, t.rank)
    b = np.asarray(ad[key]["b"], np.float64).reshape(t.rank, -1)
    for name, got, want, size in (
        ("a", grads[key]["a"], t.scale * g @ b.T, t.scale * np.abs(g) @ np.abs(b).T),
        ("b", grads[key]["b"], t.scale * a.T @ g, t.scale * np.abs(a).T @ np.abs(g))):
      got = np.asarray(got, np.float64).reshape(want.shape)
      assert np.abs(want).max() > 0, f"{key} {name}: a zero gradient checks nothing"
      np.testing.assert_array_less(np.abs(got - want), depth * size.max() + 1e-30,
                                   err_msg=f"{key} {name}")


def test_sequence_logprobs_score_only_the_response_slots(lora_engine):
  """The backend unembeds only the response slots and refuses a response token before them.

  Rows are [prompt bucket | max_new_tokens slots]: the sum over response
  tokens equals the one from every position's log-prob (the same float32
  math on fewer rows, LOGPROB_RTOL of |logit| + |log-prob| per summed token),
  and a row marking a prompt slot as response gets NaN, which the engine's
  loss check stops on.
  """
  from onpo_jax import logprobs  # pylint: disable=g-import-not-at-top
  from onpo_jax.models.decoder import positions_from_mask  # pylint: disable=g-import-not-at-top
  e = lora_engine
  backend, params = e["full_backend"], e["policy"].materialize(e["adapters"])
  tok, attn, resp = e["batch"].tok_w, e["batch"].attn_w, e["batch"].resp_w
  first = tok.shape[1] - backend.response_len
  assert first > 1 and not np.any(np.asarray(resp)[:, :first])
  model = nnx.merge(backend.graphdef, params)
  logits, _ = model(tok, positions_from_mask(attn), attn)
  every = model.token_logprobs(tok, positions_from_mask(attn), attn)
  want = logprobs.reduce_logprobs(every, resp, backend.reduction)
  got = backend._seq_logps(params, tok, attn, resp)
  scale = tolerances.logprob_scale(logits, every) * float(np.asarray(resp).sum(1).max())
  tolerances.assert_close_rel(got, want, rtol=tolerances.LOGPROB_RTOL, scale=scale,
                              what="response-slot log-probs")
  bad = backend._seq_logps(params, tok, attn, resp.at[0, first - 1].set(1.0))
  assert np.isnan(float(bad[0])) and float(bad[1]) == float(got[1])
