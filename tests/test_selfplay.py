"""Tests for the self-play engine: backends, pair weights, accumulation, method pins.

The two backends (testbed and real checkpoints) must build the same examples and
the same losses from the same responses; gradient accumulation must weigh every
example of an update alike however the tournament's dropped pairs (weight 0)
fall into minibatches; online IPO trains on λ_p pairs whatever the configured
pairing; Nash-MD takes one update per fresh sample set; the `:tiny` LLM configs
start at zero DPO / INPO margin; an engine moves to another game's oracle only
with the same policy and log-prob reduction.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
from configs import llm_common
from onpo_jax.llm.backend import LLMBackend
from onpo_jax.selfplay import methods as methods_lib
from onpo_jax.selfplay.engine import Engine
from onpo_jax.selfplay.methods import METHODS
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.testbed.backend import TestbedBackend
from onpo_jax.testbed.world import Testbed


@pytest.fixture(scope="module")
def world():
  cfg = default_config.get_config("tiny")
  return cfg, Testbed(cfg)


def _testbed_backend(cfg, w):
  tb = cfg.testbed
  return TestbedBackend(w.graphdef, w.model_config, w.oracle, response_length=tb.response_length,
                        prompt_length=tb.prompt_length, temperature=1.0,
                        reduction=cfg.selfplay.logp_reduction)


def _llm_config_like(cfg):
  """An llm config whose selfplay / sampling sections match the tiny testbed's."""
  c = llm_common.shrink_for_cpu(llm_common.default_config())
  c.selfplay.methods = tuple(cfg.selfplay.methods)
  c.selfplay.num_samples = cfg.selfplay.num_samples
  c.selfplay.minibatch_size = cfg.selfplay.minibatch_size
  c.selfplay.global_batch_size = cfg.selfplay.minibatch_size
  c.selfplay.logp_reduction = cfg.selfplay.logp_reduction
  c.sampling.max_new_tokens = cfg.testbed.response_length
  c.sampling.prompt_buckets = (cfg.testbed.prompt_length,)
  c.policy.logprob_chunk_size = 0
  return c


def _responses(cfg, w, key):
  """[n, K, L] responses drawn uniformly from the enumerated set (any fixed set will do)."""
  n, k = w.prompt_tokens.shape[0], cfg.selfplay.num_samples
  idx = jax.random.randint(key, (n, k), 0, w.responses.shape[0])
  return jnp.asarray(w.responses)[idx]


@pytest.mark.parametrize("name", ["onpo_two_step", "inpo", "dpo", "online_ipo", "sppo",
                                  "nash_md"])
def test_backends_build_identical_examples_and_losses(world, name):
  cfg, w = world
  tb = _testbed_backend(cfg, w)
  llm = LLMBackend(w.graphdef, w.model_config, w.oracle, _llm_config_like(cfg), eos_ids=(),
                   pad_id=0)
  spec = METHODS[name]
  responses = _responses(cfg, w, jax.random.key(1))
  opponents = _responses(cfg, w, jax.random.key(2))
  mask = jnp.ones(responses.shape, bool)
  pairing = methods_lib.pairing(name, cfg.selfplay.pairing)
  args = (spec.data, pairing, w.prompt_tokens, w.prompt_mask, responses, mask, opponents, mask,
          jax.random.key(3))
  batch_tb, batch_llm = tb.build_examples(*args), llm.build_examples(*args)
  assert type(batch_tb) is type(batch_llm)
  for field, a, b in zip(batch_tb._fields, batch_tb, batch_llm):
    # Integer masks and tokens exactly; the oracle's float targets come from the
    # same function on the same inputs (jitted vs eager), so they agree to rounding.
    if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0, err_msg=field)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
  params = w.init_params
  anchors_tb = {a: tb.anchor_logprobs(params, batch_tb) for a in spec.anchors}
  anchors_llm = {a: llm.anchor_logprobs(params, batch_llm) for a in spec.anchors}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), anchors_tb,
               anchors_llm)
  engine_tb, engine_llm = Engine(tb, cfg), Engine(llm, cfg)
  idx = jnp.arange(batch_tb.weight.shape[0])
  valid = jnp.ones(idx.shape, bool)
  shifted = jax.tree.map(lambda x: x * 1.01, params)  # away from the anchors: a real loss
  state_tb = engine_tb.init_state(name, shifted)
  state_llm = engine_llm.init_state(name, shifted)
  # The steps donate params and state: each gets its own (init_state copies).
  _, _, m_tb = engine_tb._train_step[name](state_tb["params"], state_tb["opt_state"], batch_tb,
                                           anchors_tb, idx, valid, jnp.float32(1.0))
  _, _, m_llm = engine_llm._train_step[name](state_llm["params"], state_llm["opt_state"],
                                             batch_llm, anchors_llm, idx, valid, jnp.float32(1.0))
  assert np.isfinite(float(m_tb["loss"])) and float(m_tb["loss"]) != 0.0
  np.testing.assert_allclose(float(m_tb["loss"]), float(m_llm["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_tb["l2_grads"]), float(m_llm["l2_grads"]), rtol=1e-4)


def test_llm_backend_passes_the_eos_check_interval_and_cache_segments_to_its_samplers(world):
  cfg, w = world
  for every, expected_every, segments in ((0, None, 1), (3, 3, 2)):  # 0: the per-backend default
    c = _llm_config_like(cfg)
    c.sampling.eos_check_every = every
    c.sampling.cache_segments = segments
    llm = LLMBackend(w.graphdef, w.model_config, w.oracle, c, eos_ids=(1,), pad_id=0)
    for sampler in (llm.sampler.sampler, llm.mixture_sampler.sampler):
      assert sampler.config.eos_check_every == expected_every
      assert sampler.config.cache_segments == segments


def test_online_ipo_trains_on_lambda_p_pairs_whatever_the_configured_pairing(world):
  cfg, w = world
  assert cfg.selfplay.pairing == "tournament"
  engine = Engine(_testbed_backend(cfg, w), cfg)
  assert engine.pairing("online_ipo") == "lambda_p"
  assert engine.pairing("dpo") == "tournament"
  assert engine.pairing("onpo_two_step") == cfg.selfplay.pairing
  assert engine.num_queries_per_prompt("online_ipo") == 1


def test_with_backend_judges_with_another_oracle_and_refuses_another_policy(world):
  cfg, w = world
  backend = _testbed_backend(cfg, w)
  engine = Engine(backend, cfg)
  gc = cfg.copy_and_resolve_references()
  gc.seed = cfg.seed + 1
  judged = engine.with_backend(backend.with_oracle(Testbed(gc).oracle))
  assert judged.backend.oracle is not w.oracle and engine.backend.oracle is w.oracle
  assert judged._train_step is engine._train_step  # compiled once for both games
  mean = TestbedBackend(w.graphdef, w.model_config, w.oracle,
                        response_length=cfg.testbed.response_length,
                        prompt_length=cfg.testbed.prompt_length, temperature=1.0,
                        reduction="mean" if cfg.selfplay.logp_reduction == "sum" else "sum")
  with pytest.raises(ValueError, match="reduction"):
    engine.with_backend(mean)
  wider = cfg.copy_and_resolve_references()
  wider.model.num_layers += 1
  with pytest.raises(ValueError, match="graphdef"):
    engine.with_backend(_testbed_backend(wider, Testbed(wider)))


def _sgd_engine(cfg, w, accumulation):
  c = cfg.copy_and_resolve_references()
  c.selfplay.methods = ("dpo",)
  c.selfplay.minibatch_size = 4
  c.selfplay.global_batch_size = 4 * accumulation
  c.selfplay.epochs = 1
  inner = optax.sgd(0.1)
  if accumulation > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accumulation).gradient_transformation()
  return Engine(_testbed_backend(c, w), c, inner_optimizer=inner)


def test_accumulated_update_equals_one_big_batch_with_unequal_weights(world):
  """Two minibatches with 1 and 4 surviving pairs + accumulation == one batch of 8."""
  cfg, w = world
  tb = _testbed_backend(cfg, w)
  responses = _responses(cfg, w, jax.random.key(5))
  mask = jnp.ones(responses.shape, bool)
  full = tb.build_examples("pairs", "all_pairs", w.prompt_tokens, w.prompt_mask, responses, mask,
                           responses, mask, jax.random.key(6))
  batch = jax.tree.map(lambda x: x[:8], full)
  # Dropped pairs: the first minibatch keeps one pair, the second all four.
  batch = batch._replace(weight=jnp.asarray([1, 0, 0, 0, 1, 1, 1, 1], jnp.float32))
  params = w.init_params
  ref = jax.tree.map(lambda x: x * 0.97, params)
  anchors = {"ref": tb.anchor_logprobs(ref, batch)}

  big = _sgd_engine(cfg, w, 1)
  big.config.selfplay.minibatch_size = 8
  small = _sgd_engine(cfg, w, 2)
  order = jnp.arange(8)
  ones = jnp.ones(8, bool)
  # The steps donate params and state: each run starts from its own (init_state copies).
  s_big = big.init_state("dpo", params)
  p_big, _, _ = big._train_step["dpo"](s_big["params"], s_big["opt_state"], batch, anchors, order,
                                       ones, jnp.float32(1.0))
  scales = small._accumulation_scales(np.asarray(batch.weight).reshape(2, 4))
  np.testing.assert_allclose(scales, [2 * 1 / 5, 2 * 4 / 5])
  start = small.init_state("dpo", params)
  p, st = start["params"], start["opt_state"]
  for s in range(2):
    p, st, _ = small._train_step["dpo"](p, st, batch, anchors, order[4 * s:4 * s + 4],
                                        ones[:4], jnp.float32(scales[s]))
  moved = optax.global_norm(jax.tree.map(jnp.subtract, p_big, params))
  assert float(moved) > 1e-4  # a real update happened
  diff = optax.global_norm(jax.tree.map(jnp.subtract, p, p_big))
  # float32 SGD on the same sum in another order: rounding of the update only.
  assert float(diff) <= 1e-5 * float(moved)
  # Without the scales (each minibatch its own weighted mean) the update differs.
  start = small.init_state("dpo", params)
  q, st = start["params"], start["opt_state"]
  for s in range(2):
    q, st, _ = small._train_step["dpo"](q, st, batch, anchors, order[4 * s:4 * s + 4], ones[:4],
                                        jnp.float32(1.0))
  assert float(optax.global_norm(jax.tree.map(jnp.subtract, q, p_big))) > 0.1 * float(moved)


def test_accumulation_scales_reject_partial_updates(world):
  cfg, w = world
  with pytest.raises(ValueError, match="global_batch_size"):
    _sgd_engine(cfg, w, 2)._accumulation_scales(np.ones((3, 4)))


def test_nash_md_takes_one_update_per_fresh_sample_set(world):
  cfg, w = world
  c = cfg.copy_and_resolve_references()
  c.selfplay.methods = ("nash_md", "sppo")
  c.selfplay.epochs = 2
  engine = Engine(_testbed_backend(c, w), c)
  prompts, mask = w.round_prompts(0, c.selfplay.prompts_per_round)
  for name, steps in (("nash_md", 1), ("sppo", None)):
    state = engine.init_state(name, w.init_params)
    batch, _ = engine.collect(name, state["params"], w.init_params, prompts, mask,
                              sample_key=jax.random.key(0), mixture_key=jax.random.key(1),
                              oracle_key=jax.random.key(2))
    calls = []
    step = engine._train_step[name]
    engine._train_step[name] = lambda *a, step=step, **kw: calls.append(1) or step(*a, **kw)
    engine.train(name, state, w.init_params, batch, jax.random.key(3), 1)
    num = int(batch.weight.shape[0])
    expected = steps or c.selfplay.epochs * -(-num // c.selfplay.minibatch_size)
    assert len(calls) == expected, name


def test_tiny_llm_configs_start_at_zero_margin(world):
  """π_ref and π_1 are the same numbers at round 1 in every `:tiny` paper config."""
  cfg, w = world
  for model in ("llama3_8b", "mistral_7b"):
    for method in llm_common.PAPER_METHODS:
      c = llm_common.paper_config(model, method, tiny=True)
      assert c.ref.dtype == c.policy.param_dtype, (model, method)
  c = llm_common.paper_config("llama3_8b", "inpo", tiny=True)
  params = w.init_params
  ref = jax.tree.map(lambda x: x.astype(jnp.dtype(c.ref.dtype)), params)
  tb = _testbed_backend(cfg, w)
  responses = _responses(cfg, w, jax.random.key(7))
  mask = jnp.ones(responses.shape, bool)
  batch = tb.build_examples("pairs", "all_pairs", w.prompt_tokens, w.prompt_mask, responses, mask,
                            responses, mask, jax.random.key(8))
  assert isinstance(batch, PairBatch)
  lp, lp_ref = tb.anchor_logprobs(params, batch), tb.anchor_logprobs(ref, batch)
  np.testing.assert_array_equal(np.asarray(lp.w - lp.l), np.asarray(lp_ref.w - lp_ref.l))
  _, metrics = METHODS["dpo"].loss(c, lp, {"ref": lp_ref}, None, batch.weight)
  assert float(jnp.max(jnp.abs(metrics["margin"]))) == 0.0


@pytest.mark.parametrize("name", ["onpo_two_step", "inpo"])
def test_rounds_update_the_state_in_place_and_leave_the_sft_tree(world, name):
  """The train step and ONPO's phase transitions donate the state: the old one is freed.

  Holding both would double the parameters and optimizer moments at the peak
  (the SmolLM2 job's live arrays: 11.3 GB without donation, 3.8 GB with it).
  """
  cfg, w = world
  c = cfg.copy_and_resolve_references()
  c.selfplay.methods = (name,)
  adam = optax.adam(1e-2)

  def update(grads, opt_state, params=None):
    updates, inner = adam.update(grads, opt_state[0], params)
    return updates, (inner, params)

  # An optimizer whose init puts the parameters themselves in its state.
  holding = optax.GradientTransformation(lambda p: (adam.init(p), p), update)
  engine = Engine(_testbed_backend(c, w), c, inner_optimizer=holding)
  state = engine.init_state(name, w.init_params)
  sft = jax.tree.leaves(w.init_params)
  owned = jax.tree.leaves(state)
  assert not {id(x) for x in sft} & {id(x) for x in owned}
  assert len({id(x) for x in owned}) == len(owned)  # no buffer twice: each can be donated
  prompts, mask = w.round_prompts(0, c.selfplay.prompts_per_round)
  batch, _ = engine.collect(name, state["params"], w.init_params, prompts, mask,
                            sample_key=jax.random.key(0), mixture_key=jax.random.key(1),
                            oracle_key=jax.random.key(2))
  new_state, metrics = engine.train(name, state, w.init_params, batch, jax.random.key(3), 1)
  assert all(x.is_deleted() for x in jax.tree.leaves(state))  # moments and π' too
  assert not any(x.is_deleted() for x in sft + jax.tree.leaves(new_state))
  assert all(np.isfinite(v) for v in metrics.values())
  # The next round starts from the returned state.
  engine.train(name, new_state, w.init_params, batch, jax.random.key(4), 2)


@pytest.mark.parametrize("name", ["onpo_two_step", "dpo"])
def test_train_step_memory_reads_the_compiled_step(world, name):
  """XLA's buffers of the step that ran: every argument counted, the state aliased in place."""
  cfg, w = world
  c = cfg.copy_and_resolve_references()
  c.selfplay.methods = (name,)
  engine = Engine(_testbed_backend(c, w), c)
  assert engine.train_step_memory(name) is None  # no step yet
  state = engine.init_state(name, w.init_params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  state_bytes = nbytes(state)
  prompts, mask = w.round_prompts(0, c.selfplay.prompts_per_round)
  batch, _ = engine.collect(name, state["params"], w.init_params, prompts, mask,
                            sample_key=jax.random.key(0), mixture_key=jax.random.key(1),
                            oracle_key=jax.random.key(2))
  engine.train(name, state, w.init_params, batch, jax.random.key(3), 1)
  got = engine.train_step_memory(name)
  # Donated params and optimizer state come back written in place.
  assert got["aliased"] == state_bytes
  # The first step's anchor (π' for ONPO's auxiliary phase, π_ref for DPO): float32
  # log-probs of both responses of every pair; the minibatch's int32 indices, bool
  # validity and float32 loss scale.
  num, mb = batch.weight.shape[0], c.selfplay.minibatch_size
  anchors = 2 * 4 * num
  assert got["arguments"] == state_bytes + nbytes(batch) + anchors + 4 * mb + mb + 4
  assert got["temporaries"] > 0 and got["outputs"] >= got["aliased"]
  assert got["peak"] == got["arguments"] + got["outputs"] + got["temporaries"] - got["aliased"]
