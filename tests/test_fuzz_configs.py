"""Fuzzed config fields: a wrong value is named before the job writes anything.

Every leaf field of the testbed job's config (`configs/default.py`, checked by
`onpo_jax.testbed.job.validate_config`) and of the llm job's config
(`configs/llm_common.py`, checked by `onpo_jax.llm.config.validate_config`) has
an entry in `specs_of_testbed` / `specs_of_llm` below saying which values it takes on
its own (the other fields at their defaults). A field whose entry is `STR` is
*neutral*: free text (a name, a template, a cache directory) that no string can
make invalid, so only its type is checked. Path fields must name an existing
file or directory. A config field without an entry fails
`test_every_field_has_a_spec`, so a new field gets its checks written down.

The properties, for one field set to a generated value:
  * a value its spec rejects (wrong type, out of range, NaN, ±inf, beyond int32,
    not among the choices, a missing path) makes validation raise ValueError or
    FileNotFoundError, exactly those types, whose message names `config.<field>`;
  * a value its spec accepts passes, or fails on a field it constrains with a
    named error (e.g. `model.vocab_size` that `oracle.vocab_size` must equal);
  * through the real entry points (`onpo_jax.main.run`, which the CLI calls,
    and `experiments.run.main` with `--config.<field>=...` overrides), a
    rejected config leaves a new workdir absent and a workdir with an earlier
    run byte for byte as it was: validation runs before the workdir is created.

`test_*_every_field_every_wrong_value` sweeps every field with every value of
`WRONG_VALUES` deterministically; the hypothesis tests add random values
(derandomized; `pytest --hypothesis-show-statistics` counts them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import sys
from typing import Any, Callable
from unittest import mock

import ml_collections
import numpy as np
import pytest
from absl import flags
from hypothesis import event, given, strategies as st

from configs import common
from configs import default as testbed_configs
from configs import llm_common
from onpo_jax import main as onpo_main
from onpo_jax import pairs as pairs_lib
from onpo_jax.infra import run_record
from onpo_jax.llm import config as llm_config
from onpo_jax.models import lora
from onpo_jax.selfplay import loop as loop_lib
from onpo_jax.selfplay import methods as methods_lib
from onpo_jax.testbed import exact_part
from onpo_jax.testbed import job as testbed_job
from onpo_jax.testbed import shadow
from fuzzing import fuzz

INT_MAX = 2**31 - 1
# ------------------------------------------------------------------ field specs


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one field accepts, and values to try on it.

  Attributes:
    accepts: whether the field takes this value (the others at their defaults;
      cross-field constraints aside).
    good: a strategy of accepted values.
    bad: values of plausible types that it rejects (beyond `WRONG_VALUES`).
  """
  accepts: Callable[[Any], bool]
  good: st.SearchStrategy
  bad: tuple = ()


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return False
  try:
    return math.isfinite(v)
  except OverflowError:
    return False


def INT(lo: int) -> Spec:  # noqa: N802 - spec constructors read as types
  return Spec(lambda v: _int(v) and lo <= v <= INT_MAX,
              st.integers(lo, lo + 64) | st.just(INT_MAX),
              (lo - 1, lo - 100, INT_MAX + 1, float(lo), lo + 0.5, str(lo)))


def REAL(lo: float, hi: float = math.inf, *, lo_open: bool = False,  # noqa: N802
         hi_open: bool = False) -> Spec:
  def accepts(v):
    return (_real(v) and (lo < v if lo_open else lo <= v)
            and (v < hi if hi_open else v <= hi))
  finite_hi = hi if hi < math.inf else 1e6
  good = st.floats(lo, finite_hi, exclude_min=lo_open, exclude_max=hi_open,
                   allow_nan=False, allow_infinity=False)
  bad = (lo - 1.0, math.nan, math.inf, -math.inf, str(lo + 0.5))
  return Spec(accepts, good, bad + ((lo,) if lo_open else ()) + ((hi,) if hi_open else ())
              + ((hi + 1.0,) if hi < math.inf else ()))


POSITIVE = REAL(0.0, lo_open=True)
NONNEG = REAL(0.0)
UNIT_CLOSED = REAL(0.0, 1.0)
BOOL = Spec(lambda v: isinstance(v, bool), st.booleans(), (0, 1, "True", "false"))
# Neutral: any string (a name, a template, a directory to create).
STR = Spec(lambda v: isinstance(v, str), st.text(max_size=30), (b"bytes",))
NONEMPTY_STR = Spec(lambda v: isinstance(v, str) and bool(v), st.text(min_size=1, max_size=20),
                    ("",))
HF_CONFIG = Spec(lambda v: v is None or isinstance(v, ml_collections.ConfigDict),
                 st.just(None), ("vocab_size=3", 3, [("vocab_size", 3)]))


def CHOICE(options) -> Spec:  # noqa: N802
  options = tuple(options)
  return Spec(lambda v: isinstance(v, str) and v in options, st.sampled_from(options),
              ("", "nope", options[0].upper() + "_", " " + options[0], (options[0],)))


def CONST(value) -> Spec:  # noqa: N802
  return Spec(lambda v: v == value and type(v) is type(value), st.just(value), ("other",))


def NAMES(options, *, min_size: int = 1) -> Spec:  # noqa: N802
  """A tuple (or list) of distinct names among `options`."""
  options = tuple(options)
  return Spec(
      lambda v: (isinstance(v, (tuple, list)) and min_size <= len(v)
                 and all(isinstance(m, str) and m in options for m in v)
                 and len(set(v)) == len(v)),
      st.lists(st.sampled_from(options), min_size=min_size, max_size=len(options),
               unique=True).map(tuple),
      (options[0], (), (options[0], options[0]), ("nope",), (options[0], 3), [None]))


def REALS(lo: float, hi: float) -> Spec:  # noqa: N802
  """A tuple of distinct numbers in (lo, hi] (exact.eta_grid; empty = no sweep)."""
  return Spec(
      lambda v: (isinstance(v, (tuple, list)) and all(_real(e) and lo < e <= hi for e in v)
                 and len(set(v)) == len(v)),
      st.lists(st.floats(lo, hi, exclude_min=True), max_size=4, unique=True).map(tuple),
      ((1.0, 1.0), (0.0,), (-1.0,), (hi + 1,), (math.nan,), (True,), ("1",), 1.0))


def INTS(lo: int) -> Spec:  # noqa: N802
  return Spec(
      lambda v: (isinstance(v, (tuple, list)) and len(v) >= 1
                 and all(_int(b) and lo <= b <= INT_MAX for b in v)),
      st.lists(st.integers(lo, 4096), min_size=1, max_size=4).map(tuple),
      ((), (0,), (24, -1), (24.0,), ("24",), 24))


MESH_SHAPE = Spec(
    lambda v: (isinstance(v, (tuple, list)) and len(v) == 3
               and all(_int(s) and (s == -1 or 1 <= s <= INT_MAX) for s in v)
               and sum(s == -1 for s in v) <= 1),
    st.sampled_from([(1, -1, 1), (1, 1, 1), (-1, 1, 1), (2, 4, 1)]),
    ((1, -1), (1, -1, -1), (0, 1, 1), (1, 1.0, 1), (-2, 1, 1), "1,-1,1", (1, "-1", 1)))
LABELS = Spec(
    lambda v: (isinstance(v, (tuple, list)) and len(v) == 2
               and all(isinstance(x, str) and x for x in v) and v[0] != v[1]),
    st.lists(st.text(min_size=1, max_size=3), min_size=2, max_size=2, unique=True).map(tuple),
    (("A",), ("A", "A"), ("A", ""), ("A", 1), "AB", ("A", "B", "C")))
_SIZE = re.compile(r"\s*(\d+(\.\d*)?)\s*(KB|MB|GB)?\s*", re.IGNORECASE)
SHARD_SIZE = Spec(
    lambda v: (_int(v) and v >= 1) or (
        isinstance(v, str) and (m := _SIZE.fullmatch(v)) is not None and float(m.group(1)) > 0),
    st.sampled_from(["5GB", "500MB", "20kb", "1.5GB", 10**10, 4096]),
    ("5TB", "GB", "-5GB", "0GB", 0, -3, 5.0, "five"))
OPT_INT0 = Spec(lambda v: v is None or (_int(v) and 0 <= v <= INT_MAX),
                st.none() | st.integers(0, 64), (-1, 1.0, "0"))
OPT_INT1 = Spec(lambda v: v is None or (_int(v) and 1 <= v <= INT_MAX),
                st.none() | st.integers(1, 64), (0, -1, 2.0, "2"))
ADDRESS = Spec(lambda v: v is None or (isinstance(v, str) and bool(v)),
               st.none() | st.just("10.0.0.1:1234"), ("",))
DEVICE_IDS = Spec(lambda v: v is None or (_int(v) and 0 <= v <= INT_MAX) or (
    isinstance(v, (tuple, list)) and all(_int(i) and 0 <= i <= INT_MAX for i in v)),
                  st.none() | st.integers(0, 7) | st.lists(st.integers(0, 7)).map(tuple),
                  (-1, (0, -1), (0.0,), "0,1"))


def PATH(good_paths, bad_paths=()) -> Spec:  # noqa: N802
  """A path to an existing file or directory (`good_paths` are such paths)."""
  goods = tuple(good_paths)
  return Spec(lambda v: isinstance(v, str) and v in goods, st.sampled_from(goods),
              ("", "/nonexistent/onpo_fuzz", "relative/missing.gguf") + tuple(bad_paths))


def OPT_PATH(good_paths, bad_paths=()) -> Spec:  # noqa: N802
  """Like PATH, or '' (use the default)."""
  goods = tuple(good_paths) + ("",)
  return Spec(lambda v: isinstance(v, str) and v in goods, st.sampled_from(goods),
              ("/nonexistent/onpo_fuzz",) + tuple(bad_paths))


def _method_specs(base) -> dict[str, Spec]:
  """The sections both jobs share: `selfplay` and the methods' hyperparameters."""
  return {
      "selfplay.methods": NAMES(methods_lib.METHODS),
      "selfplay.num_rounds": INT(1), "selfplay.prompts_per_round": INT(1),
      "selfplay.num_samples": INT(2), "selfplay.epochs": INT(1),
      "selfplay.minibatch_size": INT(1),
      "selfplay.pairing": CHOICE(pairs_lib.PAIRINGS),
      "selfplay.tournament_mode": CHOICE(pairs_lib.COMPARISON_MODES),
      "selfplay.learning_rate": POSITIVE, "selfplay.temperature": POSITIVE,
      "selfplay.logp_reduction": CHOICE(("sum", "mean")),
      "selfplay.init_from": CHOICE(("anchor", "policy")),
      "onpo.eta": POSITIVE, "omd.eta_inpo": POSITIVE, "inpo.eta_inpo": POSITIVE,
      "inpo.tau": REAL(0.0, base.inpo.eta_inpo, hi_open=True),
      "sppo.beta": POSITIVE, "dpo.beta": POSITIVE, "online_ipo.beta": POSITIVE,
      "dpo.label_smoothing": REAL(0.0, 0.5, hi_open=True),
      "nash_md.alpha": UNIT_CLOSED, "nash_md.beta": NONNEG,
  }


def specs_of_testbed(base) -> dict[str, Spec]:
  """Every field of the testbed job's config (configs/default.py)."""
  specs = {
      "experiment": CONST("selfplay"), "seed": INT(0), "seeds": INT(2),
      "testbed.start_temperature": POSITIVE,
      "oracle.kind": CHOICE(("synthetic", "bt")), "oracle.feature_dim": INT(1),
      "oracle.strength": POSITIVE, "oracle.cyclic": UNIT_CLOSED, "oracle.cyclic_spread": NONNEG,
      "model.dtype": CONST("float32"),
      "sft.num_steps": INT(1), "sft.batch_size": INT(1), "sft.learning_rate": POSITIVE,
      "selfplay.vary_game": BOOL,
      "exact.enabled": BOOL, "exact.methods": NAMES(shadow.SHADOW_METHODS),
      "exact.tol": POSITIVE, "exact.residual_tol": POSITIVE,
      "exact.dtype": CHOICE(("float32", "float64")),
      "exact.tracking_kl_bound": REAL(0.0, 1.0, lo_open=True, hi_open=True),
      "exact.eta_grid": REALS(0.0, 100.0), "exact.sweep_methods": NAMES(exact_part.SWEEPABLE),
      "eval.nash_reference": BOOL, "checkpoint.max_to_keep": INT(1),
      "log_every_seconds": NONNEG, "allow_config_change": BOOL, "compilation_cache_dir": STR,
  }
  for field in ("testbed.vocab_size", "testbed.response_length", "testbed.prompt_length",
                "testbed.num_prompts", "oracle.vocab_size", "model.vocab_size",
                "model.hidden_size", "model.intermediate_size", "model.num_layers",
                "model.num_heads", "model.num_kv_heads", "model.head_dim",
                "model.max_position_embeddings", "exact.num_rounds", "exact.max_steps",
                "exact.stall_steps", "exact.vocab_size", "exact.response_length",
                "exact.num_prompts"):
    specs[field] = INT(1)
  return specs | _method_specs(base)


def _judge_specs(prefix: str, paths) -> dict[str, Spec]:
  return {
      f"{prefix}.kind": CHOICE(llm_config.JUDGE_KINDS),
      f"{prefix}.path": PATH(paths["checkpoints"], [paths["prompts"]]),
      f"{prefix}.tokenizer_path": OPT_PATH(paths["checkpoints"], [paths["prompts"]]),
      f"{prefix}.dtype": CHOICE(llm_config.RUN_DTYPES),
      f"{prefix}.preset": CHOICE(llm_config.JUDGE_PRESETS),
      f"{prefix}.template": STR, f"{prefix}.use_chat_template": BOOL,
      f"{prefix}.labels": LABELS, f"{prefix}.max_length": INT(1),
      f"{prefix}.micro_batch_size": INT(1), f"{prefix}.offload": BOOL,
      f"{prefix}.hf_config": HF_CONFIG,
  }


def specs_of_llm(base, paths) -> dict[str, Spec]:
  """Every field of the llm job's config (configs/llm_common.py), with `paths` to real
  files for the path fields."""
  specs = {
      "experiment": CONST("llm"), "seed": INT(0),
      "policy.path": PATH(paths["checkpoints"], [paths["prompts"]]),
      "policy.tokenizer_path": OPT_PATH(paths["checkpoints"], [paths["prompts"]]),
      "policy.param_dtype": CHOICE(llm_config.RUN_DTYPES),
      "policy.dtype": CHOICE(llm_config.RUN_DTYPES), "policy.remat": BOOL,
      "policy.logprob_chunk_size": INT(0), "policy.hf_config": HF_CONFIG,
      "ref.dtype": CHOICE(llm_config.RUN_DTYPES), "ref.offload": BOOL,
      "lora.enabled": BOOL, "lora.rank": INT(1), "lora.alpha": POSITIVE,
      "lora.target_modules": Spec(
          lambda v: v == "all-linear" or NAMES(lora.ALL_LINEAR).accepts(v),
          st.just("all-linear") | NAMES(lora.ALL_LINEAR).good,
          ("all_linear", "q_proj", ("q_proj", "lm_head"), ("embed_tokens",), ())),
      "lora.dropout": Spec(lambda v: _real(v) and v == 0, st.just(0.0), (0.1, 1.0, 1e-9)),
      "lora.adapter_dtype": CHOICE(llm_config.RUN_DTYPES),
      "lora.base_dtype": CHOICE(llm_config.RUN_DTYPES),
      "data.source": CHOICE(llm_config.PROMPT_SOURCES),
      "data.paths": Spec(
          lambda v: (v == paths["prompts"] or (isinstance(v, (tuple, list)) and len(v) >= 1
                                               and all(p == paths["prompts"] for p in v))),
          st.sampled_from([paths["prompts"], (paths["prompts"],)]),
          ("", (), ("",), (paths["prompts"], 3), "/nonexistent/p.jsonl", paths["policy"])),
      "data.split": NONEMPTY_STR, "data.tfds_data_dir": STR,
      "data.max_prompt_length": INT(1), "data.overlong": CHOICE(llm_config.OVERLONG_POLICIES),
      "data.use_chat_template": BOOL, "data.shuffle_seed": INT(0),
      "sampling.max_new_tokens": INT(1), "sampling.top_p": REAL(0.0, 1.0, lo_open=True),
      "sampling.micro_batch_size": INT(1), "sampling.prompt_buckets": INTS(1),
      "sampling.cache_dtype": CHOICE(llm_config.CACHE_DTYPES),
      "sampling.eos_check_every": INT(0), "sampling.cache_segments": INT(1),
      "sampling.decode_layout": CHOICE(llm_config.DECODE_LAYOUTS),
      "sampling.share_prefill": BOOL,
      "selfplay.global_batch_size": INT(1),
      "selfplay.lr_schedule": CHOICE(("cosine", "constant")),
      "selfplay.warmup_ratio": REAL(0.0, 1.0, hi_open=True),
      "selfplay.weight_decay": NONNEG, "selfplay.max_grad_norm": NONNEG,
      "mesh.shape": MESH_SHAPE, "mesh.variant": STR,
      "eval.prompt_file": PATH(paths["files"], [paths["policy"]]),
      "eval.reference_outputs": OPT_PATH(paths["files"], [paths["policy"]]),
      "eval.max_prompts": INT(0), "eval.max_new_tokens": INT(1),
      "eval.temperature": NONNEG, "eval.micro_batch_size": INT(1),
      "eval.confidence": REAL(0.0, 1.0, lo_open=True, hi_open=True),
      "eval.generator": STR, "eval.show_examples": INT(0),
      "export.dtype": CHOICE(llm_config.RUN_DTYPES), "export.max_shard_size": SHARD_SIZE,
      "distributed.enabled": BOOL, "distributed.coordinator_address": ADDRESS,
      "distributed.num_processes": OPT_INT1, "distributed.process_id": OPT_INT0,
      "distributed.local_device_ids": DEVICE_IDS,
      "checkpoint.max_to_keep": INT(1), "log_every_seconds": NONNEG,
      "allow_config_change": BOOL, "check_memory": BOOL,
  }
  specs |= _judge_specs("judge", paths)
  # The evaluation judge is 'verifiable' (no model): its path and tokenizer_path
  # are neutral strings.
  specs |= _judge_specs("eval.judges.extra", paths) | {
      "eval.judges.extra.path": STR, "eval.judges.extra.tokenizer_path": STR}
  return specs | _method_specs(base)


# Values of every kind, tried on every field (each spec says whether it takes them).
WRONG_VALUES = (None, True, False, 0, -1, 1, 3, INT_MAX + 1, 2**63, 10**30, 10**400, 0.5, -0.5,
                2.0, math.nan, math.inf, -math.inf, 1e308, "", " ", "x", "1", "float64",
                "5GB", (), (1,), ("a", "b"), [1, 2, 3], b"x", {"a": 1})

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=4).map(tuple),
    st.binary(max_size=4), st.sampled_from(WRONG_VALUES))


# ------------------------------------------------------------------ helpers


def leaves(config, prefix: str = "") -> list[str]:
  """Dotted names of the config's leaf fields (a *.hf_config dict counts as one)."""
  out = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and not name.endswith(".hf_config"):
      out += leaves(value, name + ".")
    else:
      out.append(name)
  return out


def get(config, name: str) -> Any:
  for key in name.split("."):
    config = config[key]
  return config


def with_value(base, name: str, value):
  """A copy of `base` with field `name` set to `value`, whatever its type (as a config
  file written in Python could set it)."""
  # Rebuilt from a dict: setting a field of a ConfigDict casts (an int in a float
  # field becomes a float), a new ConfigDict takes each value as it is.
  tree = base.to_dict()
  section, _, key = name.rpartition(".")
  parent = tree
  for k in section.split(".") if section else ():
    parent = parent[k]
  parent[key] = value
  return ml_collections.ConfigDict(tree)


ALLOWED = (ValueError, FileNotFoundError)


def check_field(validate, config, name: str, spec: Spec) -> str:
  """Runs `validate` and checks the property; returns the outcome for statistics."""
  value = get(config, name)
  accepted = spec.accepts(value)
  try:
    validate(config)
  except ALLOWED as e:
    # Exactly the validator's types: UnicodeDecodeError, JSONDecodeError (both
    # ValueError subclasses) or a TypeError from a comparison would be escapes.
    assert type(e) in ALLOWED, f"{type(e).__name__} escaped for {name}={value!r:.80}: {e}"
    msg = str(e)
    if not accepted:
      assert f"config.{name}" in msg, f"{name}={value!r:.80} refused without naming it: {msg}"
      return "refused, field named"
    # An accepted value may break a constraint between fields; the message
    # names one of them.
    assert re.search(r"config\.[a-z_]", msg) or name in msg, msg
    return "accepted alone, refused with another field (named)"
  assert accepted, f"config.{name}={value!r:.80} passed validation; its spec refuses it"
  return "accepted"


def _snapshot(root: str) -> dict:
  """{relative path: (size, mtime_ns, sha1)} of every file, and every folder, under root."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root) + "/"] = None
    for name in files:
      p = os.path.join(d, name)
      st_ = os.stat(p)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = (st_.st_size, st_.st_mtime_ns,
                                         hashlib.sha1(f.read()).hexdigest())
  return out


def _prior_run(workdir: str, config) -> dict:
  """A workdir holding a started run (config.json, lock, checkpoint, metrics), as
  tests/test_run_record.py makes them; returns its snapshot."""
  loop = loop_lib.UnitLoop(workdir, label="prior", total_units=2, max_to_keep=2,
                           log_every_seconds=1e9, config=config)
  state, _, _ = loop.restore({"x": np.arange(3.0)})
  loop.complete(1, state, 1, {"u": 1.0}, "")
  loop.writer.close()
  run_record.unlock_workdir(workdir)
  return _snapshot(workdir)


class _NoWork(Exception):
  pass


def _no_loop(*args, **kwargs):
  # The jobs create their workdir in UnitLoop, right after validation: reaching
  # it with a refused config would be the bug (and would start a real run).
  raise _NoWork("validation passed; the job went on to create its workdir")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def testbed_base():
  return testbed_configs.get_config("tiny")


@pytest.fixture(scope="module")
def llm_paths(tmp_path_factory):
  """Existing files and folders for the llm config's path fields (validation only
  checks that they exist; nothing is loaded)."""
  root = tmp_path_factory.mktemp("llm_paths")
  paths = {"policy": str(root / "policy"), "judge": str(root / "judge.gguf"),
           "prompts": str(root / "prompts.jsonl")}
  os.makedirs(paths["policy"])
  for name in ("judge", "prompts"):
    with open(paths[name], "w") as f:
      f.write("{}\n")
  # A checkpoint is a directory or a .gguf file; the other paths name files.
  paths["checkpoints"] = (paths["policy"], paths["judge"])
  paths["files"] = (paths["prompts"], paths["judge"])
  return paths


@pytest.fixture(scope="module")
def llm_base(llm_paths):
  c = llm_common.paper_config("llama3_8b", "onpo", tiny=True)
  c.policy.path = llm_paths["policy"]
  c.judge.path = llm_paths["judge"]
  c.data.source = "files"
  c.data.paths = llm_paths["prompts"]
  c.eval.prompt_file = llm_paths["prompts"]
  c.eval.judges.extra = llm_common.judge_section(kind="verifiable")
  return c


@pytest.fixture(scope="module")
def testbed_fields(testbed_base):
  return specs_of_testbed(testbed_base)


@pytest.fixture(scope="module")
def llm_fields(llm_base, llm_paths):
  return specs_of_llm(llm_base, llm_paths)


# ------------------------------------------------------------------ properties


def test_every_field_has_a_spec(testbed_base, testbed_fields, llm_base, llm_fields):
  for base, specs, job in ((testbed_base, testbed_fields, "configs/default.py"),
                           (llm_base, llm_fields, "configs/llm_common.py")):
    names = leaves(base)
    missing = sorted(set(names) - set(specs))
    assert not missing, (f"{job}: fields without a spec in tests/test_fuzz_configs.py: {missing}; "
                         "add what values each takes")
    assert not sorted(set(specs) - set(names)), "specs of fields the config does not have"
    for name in names:  # the defaults are valid, by their own spec too
      assert specs[name].accepts(get(base, name)), name
  testbed_job.validate_config(testbed_base)
  llm_config.validate_config(llm_base)


SWEPT: dict[str, int] = {}  # cases per job, printed with -s


def _sweep(validate, base, specs, job):
  outcomes = {}
  for name in leaves(base):
    spec = specs[name]
    for value in WRONG_VALUES + spec.bad:
      outcome = check_field(validate, with_value(base, name, value), name, spec)
      outcomes[outcome] = outcomes.get(outcome, 0) + 1
  SWEPT[job] = sum(outcomes.values())
  print(f"\n{job}: {len(leaves(base))} fields, {SWEPT[job]} cases: {outcomes}")
  assert outcomes.get("refused, field named", 0) > len(leaves(base)) * len(WRONG_VALUES) // 2


def test_testbed_every_field_every_wrong_value(testbed_base, testbed_fields):
  _sweep(testbed_job.validate_config, testbed_base, testbed_fields, "testbed")


def test_llm_every_field_every_wrong_value(llm_base, llm_fields):
  _sweep(llm_config.validate_config, llm_base, llm_fields, "llm")


def _draw_case(data, base, specs, *, refused_only=False):
  name = data.draw(st.sampled_from(leaves(base)), label="field")
  spec = specs[name]
  values = st.one_of(spec.good, st.sampled_from(spec.bad or (None,)), _ANY)
  if refused_only:
    refused = [v for v in WRONG_VALUES + spec.bad
               if not spec.accepts(get(with_value(base, name, v), name))]
    # (Another registered experiment's name would dispatch to that job.)
    values = st.sampled_from(refused) | _ANY.filter(
        lambda v: not spec.accepts(get(with_value(base, name, v), name))
        and not (isinstance(v, str) and v in onpo_main.EXPERIMENTS))
  value = data.draw(values, label="value")
  return name, spec, with_value(base, name, value)


@fuzz(1000)
@given(data=st.data())
def test_testbed_random_values(testbed_base, testbed_fields, data):
  name, spec, config = _draw_case(data, testbed_base, testbed_fields)
  event(check_field(testbed_job.validate_config, config, name, spec))


@fuzz(1000)
@given(data=st.data())
def test_llm_random_values(llm_base, llm_fields, data):
  name, spec, config = _draw_case(data, llm_base, llm_fields)
  event(check_field(llm_config.validate_config, config, name, spec))


@pytest.fixture(scope="module")
def prior_runs(tmp_path_factory, testbed_base, llm_base):
  """Workdirs holding an earlier run of each job, with their snapshots."""
  root = tmp_path_factory.mktemp("prior")
  out = {}
  for job, base in (("selfplay", testbed_base), ("llm", llm_base)):
    workdir = str(root / job)
    out[job] = (workdir, _prior_run(workdir, base))
  return out


def _run_refused(config, workdir, name):
  with mock.patch.object(loop_lib, "UnitLoop", _no_loop):
    with pytest.raises(ALLOWED) as info:
      onpo_main.run(config, workdir)
  assert type(info.value) in ALLOWED and f"config.{name}" in str(info.value), info.value


@fuzz(100)
@given(data=st.data(), job=st.sampled_from(["selfplay", "llm"]))
def test_refused_configs_leave_workdirs_untouched(tmp_path_factory, testbed_base, testbed_fields,
                                                 llm_base, llm_fields, prior_runs, data, job):
  base, specs = ((testbed_base, testbed_fields) if job == "selfplay" else (llm_base, llm_fields))
  name, _, config = _draw_case(data, base, specs, refused_only=True)
  fresh = str(tmp_path_factory.getbasetemp() / "never_created" / "run")
  _run_refused(config, fresh, name)
  assert not os.path.exists(fresh), f"a refused config created {fresh}"
  workdir, before = prior_runs[job]
  _run_refused(config, workdir, name)
  assert _snapshot(workdir) == before, "a refused config changed the earlier run's workdir"


def _cli_values(spec: Spec, default):
  """Refused values the command line can express for a field of `default`'s type."""
  if isinstance(default, bool):
    return st.nothing()
  if isinstance(default, int):
    return st.integers(-2**40, 2**40).filter(lambda v: not spec.accepts(v)).map(str)
  if isinstance(default, float):
    return st.sampled_from(["nan", "inf", "-inf", "-1.0", "0.0", "-1e-9", "1e400"]).filter(
        lambda v: not spec.accepts(float(v)))
  if isinstance(default, str):
    return st.text(alphabet="abcdefgh_0123456789", max_size=8).filter(
        lambda v: not spec.accepts(v))
  return st.nothing()


def _reset_cli():
  """Unparsed flags without the `--config.<field>` override flags, which each parse of
  --config defines anew (a second definition would be an error)."""
  fv = flags.FLAGS
  fv.unparse_flags()
  for name in [n for n in fv if n.startswith("config.")]:
    delattr(fv, name)


def _parse_cli(argv):
  """absl's parse of `argv` as `python -m experiments.run` would do it (the config
  flag reads its `--config.<field>` overrides from sys.argv)."""
  _reset_cli()
  with mock.patch.object(sys, "argv", argv):
    flags.FLAGS(argv)


@fuzz(80)
@given(data=st.data())
def test_cli_overrides_are_refused_before_the_workdir(tmp_path_factory, testbed_base,
                                                     testbed_fields, prior_runs, data):
  """`python -m experiments.run --config=configs/default.py:tiny --config.<field>=<value>`,
  in process: a refused value is named, and neither workdir changes."""
  from experiments import run as run_mod  # pylint: disable=g-import-not-at-top
  cli = [n for n in leaves(testbed_base) if isinstance(get(testbed_base, n), (int, float, str))
         and not isinstance(get(testbed_base, n), bool) and testbed_fields[n] is not STR]
  name = data.draw(st.sampled_from(cli), label="field")
  text = data.draw(_cli_values(testbed_fields[name], get(testbed_base, name)), label="value")
  fresh = str(tmp_path_factory.getbasetemp() / "cli_never_created" / "run")
  prior, before = prior_runs["selfplay"]
  argv = ["experiments/run.py", "--config=configs/default.py:tiny", f"--config.{name}={text}",
          f"--workdir={fresh}"]
  try:
    try:
      _parse_cli(argv)
    except flags.IllegalFlagValueError as e:
      # absl refuses what the field's type cannot parse (e.g. 1e400 for an int), naming the flag.
      assert f"config.{name}" in str(e)
      event("refused by the flag parser")
      return
    for workdir in (fresh, prior):
      flags.FLAGS.workdir = workdir
      with mock.patch.object(loop_lib, "UnitLoop", _no_loop), pytest.raises(ALLOWED) as info:
        run_mod.main([])
      assert f"config.{name}" in str(info.value), info.value
    event("refused by validate_config")
  finally:
    _reset_cli()
  assert not os.path.exists(fresh)
  assert _snapshot(prior) == before


@fuzz(300)
@given(arg=st.one_of(st.text(max_size=30), st.sampled_from(
    ["tiny", "sweep", "tiny,sweep", "tiny=yes", "tiny=maybe", "sweep=0", "x=1", ",,", "=",
     "tiny=", "mesh=v5p-16", "v5p-16"]), st.integers(), st.none()))
def test_config_arg_suffix_is_parsed_or_named(arg):
  """The `:arg` suffix of --config=file.py:arg (configs/common.parse_arg)."""
  try:
    args = common.parse_arg(arg, tiny=False, sweep=False)
  except ValueError as e:
    assert type(e) is ValueError and "config arg" in str(e), e
    event("refused (named)")
  else:
    assert isinstance(args.tiny, bool) and isinstance(args.sweep, bool)
    event("parsed")
