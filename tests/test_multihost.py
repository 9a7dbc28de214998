"""Two JAX processes on localhost (gloo CPU collectives) give the same run as one.

The 2-process run goes through the real entry point (`experiments.run` with
`--config.distributed.*`, which calls `jax.distributed.initialize`), one CPU
device per process, so the policy is sharded over both processes (fsdp = 2).
The reference is the same config in this process on 2 of its 8 fake devices
(the same fsdp = 2 sharding). Metrics, AlpacaEval outputs and the exported
checkpoint must agree, only process 0 may have written the shared files, and
each process must have judged only its share of the rows.
"""

import importlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import backend
from onpo_jax.llm import job
from onpo_jax.testing import tiny_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "A B hello world what is two plus three sky blue red green yes no maybe the a of".split()
# Each process reduces over its own devices in another order than the single
# process does (the judge runs on each host's devices): float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  import transformers
  root = tmp_path_factory.mktemp("multihost")
  tok = transformers.AutoTokenizer.from_pretrained(
      tiny_hf.make_tiny_tokenizer(str(root / "tok"), WORDS))
  paths = {}
  for name, seed in (("policy", 1), ("judge", 3)):
    paths[name] = tiny_hf.make_tiny_checkpoint(str(root / name), "llama", seed=seed,
                                               vocab_size=96, num_hidden_layers=1)
    tok.save_pretrained(paths[name])
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 3])}) + "\n"
                             for i in range(8)))
  evals = root / "eval.json"
  evals.write_text(json.dumps([{"instruction": "is the sky blue"}, {"instruction": "hello"}]))
  overrides = {"policy.path": paths["policy"], "judge.path": paths["judge"],
               "data.source": "files", "data.paths": str(prompts),
               "eval.prompt_file": str(evals), "selfplay.pairing": "lambda_p"}
  return dict(root=root, overrides=overrides)


def _config(overrides):
  c = importlib.import_module("configs.llama3_8b_onpo").get_config("tiny")
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class _RowOracle:
  """P(a ≻ b) from each row's own tokens; records the rows it was asked about."""

  vocab_size = 96

  def __init__(self):
    self.seen = []

  def preference_prob(self, pt, pm, at, am, bt, bm):
    self.seen.append(pt[:, 0].copy())
    return (1.0 + np.tanh(0.1 * (at * am).sum(1) - 0.1 * (bt * bm).sum(1) + pt[:, 0])) / 2

  def pop_truncation_counts(self):
    return {"truncated_comparisons": 1, "truncated_inputs": 2}


def _pair_rows(rows):
  rng = np.random.default_rng(rows)
  pt = np.stack([np.arange(rows), rng.integers(0, 96, rows)], 1)  # column 0 = row id
  a, b = rng.integers(0, 96, (2, rows, 3))
  ones = np.ones((rows, 3), bool)
  return pt, np.ones_like(pt, bool), a, ones, b, ones


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("rows", [1, 5, 6, 7])
def test_each_process_judges_its_shard_and_gets_every_row(monkeypatch, count, rows):
  """`ScopedOracle` as process p of `count`: the other processes' shares come from the gather."""
  args = _pair_rows(rows)
  expected = _RowOracle().preference_prob(*args)
  monkeypatch.setattr(backend.jax, "process_count", lambda: count)
  for p in range(count):
    monkeypatch.setattr(backend.jax, "process_index", lambda p=p: p)
    # Process q judged rows q, q + count, ...; padding rows repeat row 0.
    shares = [np.arange(q, -(-rows // count) * count, count) for q in range(count)]
    others = [expected[np.where(s < rows, s, 0)] for s in shares]

    def gather(x, others=others, p=p):
      np.testing.assert_array_equal(x, others[p])  # this process's own result goes in
      return np.stack(others)

    monkeypatch.setattr(backend.multihost_utils, "process_allgather", gather)
    oracle = _RowOracle()
    scoped = backend.ScopedOracle(oracle, None, ())
    np.testing.assert_array_equal(scoped.preference_prob(*args), expected)
    (seen,) = oracle.seen
    np.testing.assert_array_equal(seen, np.where(shares[p] < rows, shares[p], 0))
    assert scoped.rows_judged == -(-rows // count)

    def gather_counts(x, p=p):  # the other processes judged one row more, cut as many
      return np.stack([x if q == p else x + [1, 0, 0] for q in range(count)])

    monkeypatch.setattr(backend.multihost_utils, "process_allgather", gather_counts)
    assert scoped.pop_counts() == {"truncated_comparisons": count, "truncated_inputs": 2 * count,
                                   "rows_judged_per_process": -(-rows // count) + 1}
    assert scoped.rows_judged == 0


def test_two_processes_match_one(assets):
  workdir2 = str(assets["root"] / "two")
  port = _free_port()
  flags = [f"--config.{k}={v}" for k, v in assets["overrides"].items()]
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "experiments.run", "--config=configs/llama3_8b_onpo.py:tiny",
           f"--workdir={workdir2}", "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=localhost:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
           *flags]
    log = open(os.path.join(str(assets["root"]), f"proc{pid}.log"), "w")
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                  log))

  # The reference runs here meanwhile, on 2 of the 8 fake devices (fsdp = 2).
  c = _config(assets["overrides"])
  c.mesh.shape = (1, 2, 1)
  workdir1 = str(assets["root"] / "one")
  summary1 = job.run(c, workdir1)

  for p, log in procs:
    try:
      rc = p.wait(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
      log.close()
    if rc != 0:
      tail = open(log.name).read()[-3000:]
      pytest.fail(f"process exited with {rc}:\n{tail}")

  one, two = _metrics(workdir1), _metrics(workdir2)
  assert len(two) == len(one) == 1  # process 1 wrote no second copy of the metrics
  # Each process judged its half of every batch (a batch of odd size: one padding row).
  shares = [k for k in one[0] if k.endswith("rows_judged_per_process")]
  assert "onpo_two_step/judge/rows_judged_per_process" in shares
  for k in shares:
    assert one[0][k] / 2 <= two[0][k] < one[0][k], (k, one[0][k], two[0][k])
  keys = [k for k in one[0] if not k.endswith("_per_s") and k not in shares]
  assert sorted(keys) == sorted(k for k in two[0] if not k.endswith("_per_s") and k not in shares)
  np.testing.assert_allclose([two[0][k] for k in keys], [one[0][k] for k in keys],
                             rtol=RTOL, atol=ATOL, err_msg=str(keys))
  assert one[0]["onpo_two_step/eval/num_prompts"] == 2
  for name in ("sft.json", "onpo_two_step_round1.json"):
    recs = alpaca_eval.read_outputs(os.path.join(workdir2, "alpaca_eval", name))
    assert recs == alpaca_eval.read_outputs(os.path.join(workdir1, "alpaca_eval", name))
  w1 = load_file(os.path.join(summary1["export"]["onpo_two_step"], "model.safetensors"))
  w2 = load_file(os.path.join(workdir2, "export", "onpo_two_step", "model.safetensors"))
  assert sorted(w1) == sorted(w2)
  for k in w1:
    np.testing.assert_allclose(w2[k], w1[k], rtol=RTOL, atol=ATOL, err_msg=k)
  summary2 = json.load(open(os.path.join(workdir2, "summary.json")))
  assert summary2["process_count"] == 2 and summary2["mesh"] == [1, 2, 1]
  leftovers = [f for _, _, fs in os.walk(workdir2) for f in fs if f.endswith(".tmp")]
  assert not leftovers
