"""Jitted autoregressive sampling with a KV cache, incl. Nash-MD geometric mixtures.

Two jitted functions per sampler, as in tunix `generate/sampler.py`:
  * `prefill`: runs the left-padded prompt through every model once
    (`Decoder.prefill`: the prompt attends to its own keys), filling a fresh
    KV cache, and returns the next-token logits at the last prompt slot; a
    prompt that several rows hold is run once and its cache copied to each
    of them (`SamplingConfig.share_prefill`,
    `prompt_batches.distinct_prompt_rows`);
  * `decode`: a loop that samples one token per step for the whole batch and
    feeds it back through the model(s); the KV caches are donated. With
    `eos_ids` it is a `lax.while_loop` that stops once every row has ended
    (checked every `SamplingConfig.eos_check_every` steps), without them a
    loop of fixed length. With `SamplingConfig.cache_segments` > 1 it runs
    one such loop per segment, the caches grown in between. On CPU its steps
    run feature-major by default (`SamplingConfig.decode_layout`,
    `models.feature_major`): activations [D, B], the kernels copied
    transposed once per call, before the loop.
Prompts are padded on the left up to a bucket length (`SamplingConfig.prompt_buckets`)
on the host, so a new batch of the same size within a bucket reuses the compiled
code. Positions always come from the padding mask (`positions_from_mask`), so the
first real token sits at position 0 whatever the padding.

Geometric mixture (Nash-MD, Munos et al. 2023, arXiv 2312.00886): the
mixture policy is π_α(y_t | x, y_<t) ∝ π_θ(y_t | ·)^{1−α} · π_ref(y_t | ·)^{α}, a
per-token normalised product. `MixtureSampler` advances the policy's and the
reference's caches together and samples every token from
softmax((1−α)·ℓ_θ + α·ℓ_ref), never mixing whole sequences.

Log-prob conventions (shared with the losses): `response_logprobs[b, j]` is the
log-probability of the sampled token under the model's *unmodified* distribution
(temperature 1, no top-k / top-p), which equals
`Decoder.token_logprobs(sequences, ...)[b, P + j]` in the aligned convention
(out[b, t] = log p(tokens[b, t] | tokens[b, <t])). `sampling_logprobs` holds the
log-probabilities under the distribution actually sampled from (after
temperature / top-k / top-p; 0 for greedy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from onpo_jax.models import decoder as decoder_lib
from onpo_jax.models import feature_major
from onpo_jax.models import partitioning
# Re-exported (these five): the sampler's public API has always included them.
from onpo_jax.next_token import categorical, filter_logits, geometric_mixture_logprobs
from onpo_jax.prompt_batches import bucket_length as bucket_length
from onpo_jax.prompt_batches import pad_prompts_to_bucket as pad_prompts_to_bucket
from onpo_jax.prompt_batches import distinct_prompt_rows
# Re-exported with SamplingConfig, which the samplers take.
from onpo_jax.sampling_config import GPU_EOS_CHECK_EVERY as GPU_EOS_CHECK_EVERY
from onpo_jax.sampling_config import SamplingConfig

# ------------------------------------------------------------------ pure functions


def response_mask_from_tokens(tokens: jax.Array, eos_ids: Sequence[int]
                              ) -> tuple[jax.Array, jax.Array]:
  """Marks generated tokens up to and including the first EOS.

  Only the generated tokens are passed in, so an EOS id inside the prompt can
  never stop a sequence (a bug seen in public code).

  Args:
    tokens: [B, N] generated token ids.
    eos_ids: ids that end a sequence; empty means all N tokens are kept.

  Returns:
    (mask [B, N] bool, lengths [B] int32): mask[b, j] is True iff no EOS occurs
    in tokens[b, :j]; lengths counts the True entries (EOS included).
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B, N], got {tokens.shape}")
  if not eos_ids:
    mask = jnp.ones(tokens.shape, bool)
  else:
    is_eos = jnp.isin(tokens, jnp.asarray(tuple(eos_ids), tokens.dtype))
    eos_before = (jnp.cumsum(is_eos, axis=-1) - is_eos) > 0
    mask = ~eos_before
  return mask, jnp.sum(mask, axis=-1, dtype=jnp.int32)


# --------------------------------------------------------------------------- outputs


class SampleOutput(NamedTuple):
  """Sampler output; P is the bucket length, N = max_new_tokens.

  Attributes:
    sequences: [B, P+N] int32, left-padded prompt then response; pad_id after EOS.
    attention_mask: [B, P+N] bool, real prompt tokens and response_mask.
    response_mask: [B, P+N] bool, True exactly on generated tokens up to and
      including the first EOS.
    response_tokens: [B, N] int32, sequences[:, P:].
    response_logprobs: [B, N] float32, log-prob of each response token under the
      unmodified model (temperature 1, no filtering) — for `MixtureSampler`,
      under the unmodified geometric mixture; 0 after EOS.
    sampling_logprobs: [B, N] float32, log-prob under the distribution sampled
      from (temperature/top-k/top-p applied; 0 for greedy); 0 after EOS.
    model_logprobs: [M, B, N] float32, per-model unmodified log-probs (M = 1 for
      `Sampler`; [policy, ref] for `MixtureSampler`); 0 after EOS.
    lengths: [B] int32, number of response tokens (EOS included).
  """

  sequences: jax.Array
  attention_mask: jax.Array
  response_mask: jax.Array
  response_tokens: jax.Array
  response_logprobs: jax.Array
  sampling_logprobs: jax.Array
  model_logprobs: jax.Array
  lengths: jax.Array


# --------------------------------------------------------------------------- samplers


class _MultiModelSampler:
  """Shared machinery: M models advanced in lock step, one combined next-token law."""

  def __init__(self, graphdefs, model_configs, config: SamplingConfig,
               combine: Callable[[Sequence[jax.Array], Any], jax.Array]):
    if not isinstance(config, SamplingConfig):
      raise TypeError(f"sampling_config must be a SamplingConfig, got {type(config).__name__}")
    self.config = config
    self._graphdefs = tuple(graphdefs)
    self._model_configs = tuple(model_configs)
    self._combine = combine
    vocabs = {int(c.vocab_size) for c in self._model_configs}
    if len(vocabs) != 1:
      raise ValueError(f"all models must share one vocabulary, got vocab sizes {sorted(vocabs)}")
    self.vocab_size = vocabs.pop()
    for name, ids in (("eos_ids", config.eos_ids), ("pad_id", (config.pad_id,))):
      if any(i >= self.vocab_size for i in ids):
        raise ValueError(
            f"SamplingConfig.{name}={getattr(config, name)} out of range for vocab_size "
            f"{self.vocab_size}")
    if config.top_k > self.vocab_size:
      raise ValueError(
          f"SamplingConfig.top_k={config.top_k} exceeds vocab_size {self.vocab_size}")
    # Steps at which the decoding loop's cache segments end (the last: N).
    self._segment_ends = config.cache_segment_ends(jax.default_backend())
    self.prefill = jax.jit(self._prefill_impl)
    # Caches are argument 1: donated so the loop updates them in place. A
    # cache that grows between segments is copied anyway (and the donated
    # buffers would match no output).
    donate = (1,) if len(self._segment_ends) == 1 else ()
    self.decode = jax.jit(self._decode_impl, donate_argnums=donate)

  # -- jitted bodies ------------------------------------------------------------

  def _prefill_impl(self, states, prompt_tokens, prompt_mask, rows=None):
    """Fills a fresh cache per model; returns (caches, last-slot logits per model).

    The caches have the first segment's slots (prompt + its steps), which is
    prompt + N with a single segment. With `rows` ([B] int), the prompts
    given are the distinct ones and the caches and logits returned are their
    rows `rows` (`distinct_prompt_rows`).
    """
    max_len = prompt_tokens.shape[1] + self._segment_ends[0]
    positions = decoder_lib.positions_from_mask(prompt_mask)
    dtype = None if self.config.cache_dtype is None else jnp.dtype(self.config.cache_dtype)
    caches, logits = [], []
    for graphdef, state, mcfg in zip(self._graphdefs, states, self._model_configs):
      model = nnx.merge(graphdef, state)
      h, cache = model.prefill(prompt_tokens, positions, prompt_mask, max_len, dtype)
      # Only the last slot's logits are needed: [B, 1, V] instead of [B, P, V].
      logits.append(model.logits_from_hidden(h[:, -1:, :])[:, 0, :].astype(jnp.float32))
      caches.append(cache)
    if rows is not None:
      caches = [decoder_lib.select_rows(c, rows) for c in caches]
      logits = [jnp.take(lg, rows, axis=0) for lg in logits]
    return tuple(caches), tuple(logits)

  def _choose(self, logp_combined, key):
    """Samples one token per row; returns (token [B], sampling log-prob [B])."""
    cfg = self.config
    if cfg.greedy:
      tok = jnp.argmax(logp_combined, axis=-1).astype(jnp.int32)
      return tok, jnp.zeros(tok.shape, jnp.float32)
    if cfg.temperature == 1.0 and cfg.top_k == 0 and cfg.top_p == 1.0:
      # `logp_combined` is already normalised: skip two passes over the vocabulary.
      tok = categorical(key, logp_combined)
      return tok, _gather(logp_combined, tok)
    filtered = filter_logits(logp_combined, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p)
    tok = categorical(key, filtered)
    logp_sampling = jax.nn.log_softmax(filtered, axis=-1)
    return tok, _gather(logp_sampling, tok)

  def _decode_impl(self, states, caches, last_logits, prompt_tokens, prompt_mask, key, extra):
    """Samples N tokens (stopping early once every row hit EOS).

    Returns (SampleOutput, caches). With `eos_check_every` > 1 the loop may
    run up to that many steps minus one past the last EOS, or past N: their
    tokens are masked (or dropped), and the caches hold their writes (slots
    past N clamp to the last one). With several cache segments
    (`SamplingConfig.cache_segments`) the loop runs once per segment, each
    time with the caches grown to the segment's slots (prompt + its last
    step); the caches come in with the first segment's slots and leave with
    prompt + N.
    """
    cfg = self.config
    n_new = cfg.max_new_tokens
    batch = prompt_tokens.shape[0]
    num_models = len(self._graphdefs)
    eos = jnp.asarray(cfg.eos_ids, jnp.int32) if cfg.eos_ids else None
    # The j-th response token sits at position (#real prompt tokens) + j.
    next_pos0 = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
    models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
    if cfg.feature_major(jax.default_backend()):
      # The transposed kernels are built once, outside the loop.
      steps_of = [functools.partial(feature_major.decode_step, feature_major.decode_weights(m),
                                    mcfg) for m, mcfg in zip(models, self._model_configs)]
    else:
      steps_of = [functools.partial(_tokens_major_step, m) for m in models]

    def sample_step(step, logits_per_model, bufs, done):
      tokens, lp_comb, lp_samp, lp_models = bufs
      logp_models = [jax.nn.log_softmax(l, axis=-1) for l in logits_per_model]
      logp_comb = self._combine(logp_models, extra)
      # fold_in keeps each step's randomness independent of early stopping.
      tok, lp_s = self._choose(logp_comb, jax.random.fold_in(key, step))
      # Steps past N (a check every few steps can overrun) write nothing.
      tokens = tokens.at[:, step].set(tok, mode="drop")
      lp_comb = lp_comb.at[:, step].set(_gather(logp_comb, tok), mode="drop")
      lp_samp = lp_samp.at[:, step].set(lp_s, mode="drop")
      lp_models = lp_models.at[:, :, step].set(
          jnp.stack([_gather(lp, tok) for lp in logp_models]), mode="drop")
      if eos is not None:
        done = done | jnp.isin(tok, eos)
      return (tokens, lp_comb, lp_samp, lp_models), done, tok

    bufs = (jnp.full((batch, n_new), cfg.pad_id, jnp.int32),
            jnp.zeros((batch, n_new), jnp.float32),
            jnp.zeros((batch, n_new), jnp.float32),
            jnp.zeros((num_models, batch, n_new), jnp.float32))
    bufs, done, tok = sample_step(0, last_logits, bufs, jnp.zeros((batch,), bool))

    def decode_step(carry):
      step, caches, prev_tok, done, bufs = carry
      pos = next_pos0 + step - 1
      new_caches, logits = [], []
      for step_of, cache in zip(steps_of, caches):
        lg, cache = step_of(prev_tok, pos, cache)
        logits.append(lg.astype(jnp.float32))
        new_caches.append(cache)
      bufs, done, tok = sample_step(step, logits, bufs, done)
      return step + 1, tuple(new_caches), tok, done, bufs

    every = cfg.steps_per_eos_check(jax.default_backend())

    def steps(carry):
      if every == 1:
        return decode_step(carry)
      return jax.lax.fori_loop(0, every, lambda _, c: decode_step(c), carry)

    carry = (jnp.asarray(1, jnp.int32), tuple(caches), tok, done, bufs)
    start = 1
    for end in self._segment_ends:
      slots = prompt_tokens.shape[1] + end
      step, loop_caches, *rest = carry
      if loop_caches[0].mask.shape[1] < slots:
        carry = (step, tuple(decoder_lib.grow_cache(c, slots) for c in loop_caches), *rest)
      if eos is None:
        # Fixed length: a loop of known trip count, which XLA:GPU runs without
        # a check (and a wait for the device) per step.
        carry = jax.lax.fori_loop(start, end, lambda _, c: decode_step(c), carry)
      else:
        # Every segment starts at 1 + a multiple of `every`
        # (cache_segment_ends), where a block of `every` steps starts: no
        # block crosses into the next segment's cache.
        def cond(carry, end=end):
          step, _, _, done, _ = carry
          return (step < end) & ~jnp.all(done)

        carry = jax.lax.while_loop(cond, steps, carry)
      start = end
    _, caches, _, _, bufs = carry
    tokens, lp_comb, lp_samp, lp_models = bufs

    resp_mask, lengths = response_mask_from_tokens(tokens, cfg.eos_ids)
    tokens = jnp.where(resp_mask, tokens, cfg.pad_id)
    zero = jnp.zeros((), jnp.float32)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    out = SampleOutput(
        sequences=jnp.concatenate([prompt_tokens, tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask, resp_mask], axis=1),
        response_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), resp_mask], axis=1),
        response_tokens=tokens,
        response_logprobs=jnp.where(resp_mask, lp_comb, zero),
        sampling_logprobs=jnp.where(resp_mask, lp_samp, zero),
        model_logprobs=jnp.where(resp_mask[None], lp_models, zero),
        lengths=lengths)
    return out, caches

  # -- host side ------------------------------------------------------------------

  def _run(self, states, prompt_tokens, prompt_mask, key, extra) -> SampleOutput:
    tokens, mask = pad_prompts_to_bucket(prompt_tokens, prompt_mask,
                                         self.config.prompt_buckets, self.config.pad_id)
    if (tokens >= self.vocab_size).any() or (tokens < 0).any():
      raise ValueError(f"prompt_tokens must lie in [0, {self.vocab_size})")
    total = tokens.shape[1] + self.config.max_new_tokens
    for mcfg in self._model_configs:
      limit = getattr(mcfg, "max_position_embeddings", None)
      if limit is not None and total > limit:
        raise ValueError(
            f"bucket length {tokens.shape[1]} + SamplingConfig.max_new_tokens "
            f"{self.config.max_new_tokens} = {total} exceeds max_position_embeddings {limit}")
    key = jnp.asarray(key)
    if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
            (key.dtype == jnp.uint32 and key.shape == (2,))):
      raise ValueError(f"key must be a jax.random key, got dtype {key.dtype} shape {key.shape}")
    shared = (distinct_prompt_rows(tokens, mask, partitioning.batch_shards())
              if self.config.share_prefill else None)
    if shared is None:
      caches, last_logits = self.prefill(states, jnp.asarray(tokens), jnp.asarray(mask))
    else:
      first, of_row = shared
      caches, last_logits = self.prefill(states, jnp.asarray(tokens[first]),
                                         jnp.asarray(mask[first]),
                                         jnp.asarray(of_row, jnp.int32))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    out, _ = self.decode(states, caches, last_logits, tokens, mask, key, extra)
    return out


def _tokens_major_step(model, tokens, positions, cache):
  """A decoding step through the model's own forward: (logits [B, V], cache)."""
  logits, cache = model(tokens[:, None], positions[:, None],
                        jnp.ones((tokens.shape[0], 1), bool), cache)
  return logits[:, 0, :], cache


def _gather(logp, tok):
  return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


class Sampler(_MultiModelSampler):
  """Samples responses from one decoder.

  Usage:
    graphdef, state = nnx.split(model)
    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=64), model_config=cfg)
    out = sampler(state, prompt_tokens, prompt_mask, jax.random.key(0))

  `sampler.prefill` and `sampler.decode` are the two jitted functions (their
  `_cache_size()` counts compilations).
  """

  def __init__(self, graphdef, sampling_config: SamplingConfig, *, model_config):
    """Builds the jitted functions.

    Args:
      graphdef: `nnx.split(model)[0]` of a model with the decoder API.
      sampling_config: static sampling settings.
      model_config: the model's `DecoderConfig` (vocab size, cache shape).
    """
    super().__init__((graphdef,), (model_config,), sampling_config,
                     combine=lambda logps, _: logps[0])

  def __call__(self, state, prompt_tokens, prompt_mask, key) -> SampleOutput:
    """Samples N tokens per left-padded prompt.

    Args:
      state: `nnx.split(model)[1]`.
      prompt_tokens: [B, P] int, left-padded.
      prompt_mask: [B, P] bool, False on padding.
      key: PRNG key; the same key and inputs give the same samples.

    Returns:
      `SampleOutput` with P the bucket length.
    """
    return self._run((state,), prompt_tokens, prompt_mask, key, jnp.zeros((), jnp.float32))


class MixtureSampler(_MultiModelSampler):
  """Samples from the per-token geometric mixture π_θ^{1−α}·π_ref^{α} (Nash-MD).

  Both models keep their own KV cache and are advanced by the same sampled
  token; `alpha` is a traced argument, so changing it does not recompile.
  Temperature / top-k / top-p apply to the mixture's log-probs.
  """

  def __init__(self, policy_graphdef, ref_graphdef, sampling_config: SamplingConfig, *,
               policy_model_config, ref_model_config):
    def combine(logps, alpha):
      return geometric_mixture_logprobs(logps[0], logps[1], alpha)

    super().__init__((policy_graphdef, ref_graphdef), (policy_model_config, ref_model_config),
                     sampling_config, combine=combine)

  def __call__(self, policy_state, ref_state, prompt_tokens, prompt_mask, key,
               alpha: float) -> SampleOutput:
    """Samples N tokens per prompt from the geometric mixture.

    Args:
      policy_state: state of π_θ.
      ref_state: state of π_ref.
      prompt_tokens: [B, P] int, left-padded.
      prompt_mask: [B, P] bool.
      key: PRNG key.
      alpha: mixture weight α ∈ [0, 1] on the reference.

    Returns:
      `SampleOutput`; `response_logprobs` are under the mixture and
      `model_logprobs` are [policy, ref].
    """
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return self._run((policy_state, ref_state), prompt_tokens, prompt_mask, key,
                     jnp.asarray(alpha, jnp.float32))


def sample_mixture(policy_model: nnx.Module, ref_model: nnx.Module, prompt_tokens, prompt_mask,
                   key, *, alpha: float, sampling_config: SamplingConfig) -> SampleOutput:
  """One-off convenience wrapper around `MixtureSampler` (compiles every call).

  Long-running loops should build one `MixtureSampler` and reuse it.
  """
  policy_graphdef, policy_state = nnx.split(policy_model)
  ref_graphdef, ref_state = nnx.split(ref_model)
  sampler = MixtureSampler(policy_graphdef, ref_graphdef, sampling_config,
                           policy_model_config=policy_model.config,
                           ref_model_config=ref_model.config)
  return sampler(policy_state, ref_state, prompt_tokens, prompt_mask, key, alpha)
