"""The decoding loop's KV-cache segments (`SamplingConfig.cache_segments`).

With G segments the sampler prefills a cache of prompt + (first segment's
steps) slots and grows it (`decoder.grow_cache`) each time the steps reach its
end, so a step reads fewer empty slots. Samples must not depend on G: tokens
are equal, and log-probs equal up to the float32 rounding of softmax sums over
more or fewer masked (exactly zero) terms, bounded by tests/tolerances.py's
LOGPROB_RTOL (observed: 0 with these tiny models; on a 6-layer SmolLM2-shaped
model with 1024 slots, 1.9e-6 absolute). Growing a cache into the wrong slots,
or segment ends that a block of steps between two EOS checks can cross, change
tokens or log-probs by 1e-2 and more.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from test_sampler import PROMPT_MASK, PROMPTS, _decoding_loops, policy, reference  # noqa: F401
from onpo_jax import sampler as sampler_lib
from onpo_jax.models import config as config_lib
from onpo_jax.models import decoder as dec

N_NEW = 13


def test_segment_ends_split_the_steps_on_check_boundaries():
  for n in (1, 2, 5, 13, 64, 2048):
    for segments in (1, 2, 3, 4, 7):
      for eos_ids, every in (((), None), ((3,), 1), ((3,), 4), ((3,), 8)):
        cfg = sampler_lib.SamplingConfig(max_new_tokens=n, cache_segments=segments,
                                         eos_ids=eos_ids, eos_check_every=every)
        ends = cfg.cache_segment_ends("cpu")
        assert ends[-1] == n and len(ends) <= segments, (n, segments, ends)
        assert all(1 < a < b for a, b in zip(ends, ends[1:])), ends
        if eos_ids:
          assert all((e - 1) % every == 0 for e in ends[:-1]), (every, ends)
        if n - 1 >= segments * (every or 1):
          assert len(ends) == segments, (n, segments, every, ends)
  assert sampler_lib.SamplingConfig(max_new_tokens=2048, cache_segments=4).cache_segment_ends(
      "cpu") == (513, 1025, 1536, 2048)
  # A GPU checks for the end every 8 steps by default.
  gpu = sampler_lib.SamplingConfig(max_new_tokens=2048, cache_segments=4, eos_ids=(3,))
  assert gpu.cache_segment_ends("gpu") == (513, 1025, 1537, 2048)


def test_peak_cache_slots():
  def peak(segments):
    return sampler_lib.SamplingConfig(max_new_tokens=13, cache_segments=segments).peak_cache_slots(
        7, "cpu")
  # Ends: 1 segment (13,); 2: (7, 13); 3: (5, 9, 13); 4: (4, 7, 10, 13).
  assert [peak(g) for g in (1, 2, 3, 4)] == [20, 14 + 20, 12 + 16 + 20, 11 + 17 + 20]


def test_grow_cache_keeps_the_slots_and_adds_empty_ones():
  cfg = config_lib.DecoderConfig.tiny(vocab_size=32)
  rng = np.random.RandomState(0)
  cache = dec.init_cache(cfg, 2, 5)
  cache = cache._replace(
      k=tuple(jnp.asarray(rng.randn(*x.shape), x.dtype) for x in cache.k),
      v=tuple(jnp.asarray(rng.randn(*x.shape), x.dtype) for x in cache.v),
      mask=jnp.asarray(rng.rand(2, 5) < 0.5), index=jnp.asarray(4, jnp.int32))
  grown = dec.grow_cache(cache, 8)
  for old, new in zip(cache.k, grown.k):
    assert new.shape == old.shape[:3] + (8,) and new.dtype == old.dtype
    np.testing.assert_array_equal(new[..., :5], old)
    assert not np.asarray(new[..., 5:]).any()
  for old, new in zip(cache.v, grown.v):
    assert new.shape == old.shape[:2] + (8,) + old.shape[3:]
    np.testing.assert_array_equal(new[:, :, :5], old)
    assert not np.asarray(new[:, :, 5:]).any()
  np.testing.assert_array_equal(grown.mask[:, :5], cache.mask)
  assert not grown.mask[:, 5:].any() and int(grown.index) == 4
  assert dec.grow_cache(cache, 5).mask.shape == (2, 5)
  with pytest.raises(ValueError, match="max_length: expected at least the cache's 5 slots, got 4"):
    dec.grow_cache(cache, 4)


def _sampler(policy, reference, mixture_alpha, **kw):  # noqa: F811
  (pm, pcfg), (rm, rcfg) = policy, reference
  config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(8,), **kw)
  if mixture_alpha is None:
    smp = sampler_lib.Sampler(nnx.split(pm)[0], config, model_config=pcfg)
    return smp, lambda key: smp(nnx.state(pm), PROMPTS, PROMPT_MASK, key)
  smp = sampler_lib.MixtureSampler(nnx.split(pm)[0], nnx.split(rm)[0], config,
                                   policy_model_config=pcfg, ref_model_config=rcfg)
  return smp, lambda key: smp(nnx.state(pm), nnx.state(rm), PROMPTS, PROMPT_MASK, key,
                              mixture_alpha)


def _assert_same_samples(a, b, what):
  for field in ("sequences", "attention_mask", "response_mask", "response_tokens", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)),
                                  err_msg=f"{what}: {field}")
  for field in ("response_logprobs", "sampling_logprobs", "model_logprobs"):
    ours, ref = np.asarray(getattr(a, field)), np.asarray(getattr(b, field))
    tolerances.assert_close_rel(ours, ref, rtol=tolerances.LOGPROB_RTOL,
                                scale=max(float(np.abs(ref).max()), 1.0), what=f"{what}: {field}")


@pytest.mark.parametrize("mixture_alpha", [None, 0.5])
def test_cache_segments_give_the_same_samples(policy, reference, mixture_alpha):  # noqa: F811
  smp, sample = _sampler(policy, reference, mixture_alpha)
  # A key whose free-running rows let an EOS id end row 0 by its second token
  # while another row never draws it (and so runs to N).
  for seed in range(3, 40):
    key = jax.random.key(seed)
    one = sample(key)
    free = np.asarray(one.response_tokens)
    late = [t for t in set(free[0, :2].tolist()) if any(t not in row for row in free[1:])]
    if late:
      break
  assert late, "no key among 37 gives a row that runs to N"
  for segments in (2, 3, 5):
    smp, sample = _sampler(policy, reference, mixture_alpha, cache_segments=segments)
    assert len(smp.config.cache_segment_ends(jax.default_backend())) == segments
    _assert_same_samples(sample(key), one, f"{segments} segments, no EOS")
  # With EOS ids: every row ends within the first segment, or some row runs to N.
  for eos_ids, all_end_early in ((tuple(sorted(set(free[:, 2].tolist()))), True),
                                 ((late[0],), False)):
    pad = min(set(range(8)) - set(eos_ids))
    for every in (1, 4):
      kw = dict(eos_ids=eos_ids, pad_id=pad, eos_check_every=every)
      ref = _sampler(policy, reference, mixture_alpha, **kw)[1](key)
      lengths = np.asarray(ref.lengths)
      assert (lengths <= 3).all() if all_end_early else (lengths == N_NEW).any(), lengths
      for segments in (2, 3):
        got = _sampler(policy, reference, mixture_alpha, cache_segments=segments, **kw)[1](key)
        _assert_same_samples(got, ref, f"{segments} segments, eos {eos_ids}, every {every}")


def test_each_segment_is_a_loop_over_a_longer_cache(policy):  # noqa: F811
  model, cfg = policy
  graphdef, state = nnx.split(model)
  config = sampler_lib.SamplingConfig(max_new_tokens=N_NEW, prompt_buckets=(8,), cache_segments=3)
  smp = sampler_lib.Sampler(graphdef, config, model_config=cfg)
  assert config.cache_segment_ends(jax.default_backend()) == (5, 9, 13)
  # Three fixed-length loops of 4 steps (steps 1-4, 5-8, 9-12).
  loops = _decoding_loops(smp, state)
  assert [trips for _, trips in loops] == [4, 4, 4], loops
  # The prefill's cache holds the prompt and the first segment; decoding
  # returns it grown to prompt + N, and leaves its argument alone (not donated).
  toks, mask = sampler_lib.pad_prompts_to_bucket(PROMPTS, PROMPT_MASK, (8,), 0)
  caches, logits = smp.prefill((state,), jnp.asarray(toks), jnp.asarray(mask))
  assert caches[0].mask.shape == (3, 8 + 5) and caches[0].k[0].shape[-1] == 8 + 5
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*[Dd]onat.*")
    _, out_caches = smp.decode((state,), caches, logits, jnp.asarray(toks), jnp.asarray(mask),
                               jax.random.key(0), jnp.float32(0))
  assert out_caches[0].mask.shape == (3, 8 + N_NEW)
  assert not caches[0].k[0].is_deleted()
  np.testing.assert_array_equal(out_caches[0].mask[:, :8], mask)
  assert np.asarray(out_caches[0].mask[:, 8:8 + N_NEW - 1]).all()



def test_cache_segments_benchmark_compares_with_one_segment(capsys):
  from benchmarks import cache_segments as bench
  out = bench.main(["--layers", "1", "--batch", "2", "--prompt", "4", "--new", "9",
                    "--segments", "3", "--rounds", "2"])
  printed = capsys.readouterr().out
  assert "G=3: segment ends (4, 6, 9)" in printed and "95% CI" in printed
  assert out[1]["same_tokens"] and out[3]["same_tokens"]
  assert out[3]["low"] <= out[3]["diff"] <= out[3]["high"]
  for argv, flag in ((["--segments", "1"], "--segments"), (["--segments", "a"], "--segments"),
                     (["--rounds", "1"], "--rounds")):
    with pytest.raises(SystemExit):
      bench.parse_args(argv)
    assert flag in capsys.readouterr().err
