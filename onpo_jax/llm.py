r"""Aligning a real checkpoint end to end: the `llm` experiment.

    python -m experiments.run --config=configs/llama3_8b_onpo.py:gpu8 --workdir=runs/llama3_onpo

From local Hugging Face directories (policy, judge, prompts) to an exported HF
checkpoint and AlpacaEval-format outputs, on the SAME round logic as the
testbed (`onpo_jax.rounds.Engine`: sampling, pairs, anchors, losses,
`onpo_step`, fingerprints). `LLMEngine` is a thin subclass that adapts the
pieces the testbed does not need:

  * responses end at EOS: the response mask comes from the sampled tokens
    (`sampler.response_mask_from_tokens`), so pad tokens after EOS are never
    scored, and examples are built on the host because the judge reads text;
  * sampling, anchor log-probs and judging run in micro-batches;
  * the inner optimizer is AdamW with the paper's linear-warm-up cosine
    schedule, gradient clipping, and `optax.MultiSteps` gradient accumulation
    (`selfplay.minibatch_size` examples per micro-step,
    `selfplay.global_batch_size` per update).

Roles: the policy π (trained, `policy.param_dtype`), the auxiliary π' (inside
`onpo_step`'s state), the reference π_ref = SFT (frozen, `ref.dtype`, INPO /
DPO anchor) and the judge (frozen, `judge.dtype`). `ref.offload` and
`judge.offload` keep those two in pinned host memory except while they are used.

Multi-host: `experiments/run.py` calls `jax.distributed.initialize` when
`config.distributed.enabled`. Every process computes the same prompt batches
(the order is a function of the seed) and passes them as replicated inputs;
parameters are sharded over the global mesh; host-side values are gathered
with `multihost_utils.process_allgather`. Only process 0 writes metrics,
AlpacaEval files and the exported checkpoint; orbax writes the arrays.

Outputs in `workdir`: metrics.jsonl (per round: losses, norms, oracle queries,
tokens/s, win rate vs SFT with its CI), memory.json, alpaca_eval/*.json,
checkpoints/, export/<method>/ (HF directory + tokenizer), summary.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from types import SimpleNamespace
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from onpo_jax import alpaca_eval
from onpo_jax import checkpoint as checkpoint_lib
from onpo_jax import losses
from onpo_jax import memory as memory_lib
from onpo_jax import metrics as metrics_lib
from onpo_jax import pairs as pairs_lib
from onpo_jax import rounds
from onpo_jax import sampler as sampler_lib
from onpo_jax.onpo_step import onpo_step

# ------------------------------------------------------------------ pure pieces


def warmup_cosine(step, *, peak: float, warmup_steps: int, total_steps: int):
  """Linear warm-up then cosine decay to 0 (transformers' cosine schedule).

  lr(s) = peak · s / w for s < w, else peak · ½(1 + cos(π (s − w)/(T − w))),
  clipped at 0 past T; w = warmup_steps, T = total_steps (ONPO arXiv
  2502.16852 §5: cosine schedule, warm-up ratio 0.03).

  Args:
    step: int scalar (traced or not), the optimizer update count from 0.
    peak: peak learning rate (> 0).
    warmup_steps: w, 0 <= w < T.
    total_steps: T >= 1.
  """
  if not peak > 0 or total_steps < 1 or not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_cosine: need peak > 0, total_steps >= 1 and 0 <= warmup_steps < "
                     f"total_steps; got {peak}, {total_steps}, {warmup_steps}")
  s = jnp.asarray(step, jnp.float32)
  warm = s / max(warmup_steps, 1)
  progress = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
  cos = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return peak * jnp.where(s < warmup_steps, warm, cos)


def full_sequences(prompt_tokens, prompt_mask, responses, response_mask, pad_id: int):
  """Prompt [N, P] + response [N, R] -> (tokens, attention mask, response mask) [N, P+R].

  Response positions after EOS (mask False) are written as `pad_id` and are
  neither attended to nor scored, so lp(y) sums exactly the generated tokens up
  to and including EOS (BASELINES.md: no prompt or pad tokens in log-probs).
  """
  prompt_tokens, responses = np.asarray(prompt_tokens), np.asarray(responses)
  prompt_mask, response_mask = np.asarray(prompt_mask, bool), np.asarray(response_mask, bool)
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens/prompt_mask must both be [N, P]; got {prompt_tokens.shape}, "
                     f"{prompt_mask.shape}")
  if responses.shape != response_mask.shape or responses.shape[0] != prompt_tokens.shape[0]:
    raise ValueError(f"responses/response_mask must both be [N={prompt_tokens.shape[0]}, R]; "
                     f"got {responses.shape}, {response_mask.shape}")
  resp = np.where(response_mask, responses, pad_id).astype(np.int32)
  tokens = np.concatenate([prompt_tokens.astype(np.int32), resp], axis=1)
  attn = np.concatenate([prompt_mask, response_mask], axis=1)
  scored = np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1)
  return tokens, attn, scored


def accumulation_steps(global_batch_size: int, minibatch_size: int) -> int:
  """Micro-batches per optimizer update; the global batch must be a multiple."""
  if minibatch_size < 1 or global_batch_size < minibatch_size or global_batch_size % minibatch_size:
    raise ValueError(f"selfplay.global_batch_size={global_batch_size} must be a positive multiple "
                     f"of selfplay.minibatch_size={minibatch_size}")
  return global_batch_size // minibatch_size


def examples_per_prompt(config, name: str) -> int:
  """Training examples one prompt yields for method `name` (pairs or samples)."""
  spec = rounds.METHODS[name]
  k = int(config.selfplay.num_samples)
  if spec.data != "pairs":
    return k
  return pairs_lib.num_pairs_per_prompt(spec.fixed_pairing or config.selfplay.pairing, k)


def updates_per_regression(config, name: str) -> int:
  """Optimizer updates of one regression: epochs · examples / global batch."""
  sp = config.selfplay
  n = int(sp.prompts_per_round) * examples_per_prompt(config, name)
  if n % int(sp.global_batch_size):
    raise ValueError(f"selfplay.prompts_per_round={sp.prompts_per_round} gives {n} training "
                     f"examples for {name!r}, not a multiple of selfplay.global_batch_size="
                     f"{sp.global_batch_size}; every update must see a full global batch")
  return int(sp.epochs) * n // int(sp.global_batch_size)


def make_inner_optimizer(config, num_updates: int) -> optax.GradientTransformation:
  """AdamW + warm-up cosine + clipping, wrapped in MultiSteps for accumulation.

  The schedule restarts with each regression because `onpo_step` (and the
  baselines' per-round `init`) reset the inner state: one cosine per regression,
  as each iteration of INPO / ONPO is its own fine-tuning run.
  """
  sp = config.selfplay
  warmup = int(math.ceil(float(sp.warmup_ratio) * num_updates))
  warmup = min(warmup, num_updates - 1)
  if sp.lr_schedule == "cosine":
    lr = functools.partial(warmup_cosine, peak=float(sp.learning_rate), warmup_steps=warmup,
                           total_steps=num_updates)
  else:
    lr = float(sp.learning_rate)
  parts = []
  if sp.max_grad_norm:
    parts.append(optax.clip_by_global_norm(float(sp.max_grad_norm)))
  parts.append(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(sp.weight_decay)))
  inner = optax.chain(*parts)
  accum = accumulation_steps(int(sp.global_batch_size), int(sp.minibatch_size))
  if accum > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accum).gradient_transformation()
  return inner


# Kept under their old names: the device fingerprint now lives in `rounds`.
device_fingerprint = rounds.fingerprint
to_memory = rounds.to_memory


def host_gather(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as a full numpy copy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ------------------------------------------------------------------- adapters


class MicroBatchedSampler:
  """Calls a `Sampler`/`MixtureSampler` on fixed-size row blocks.

  Returns an object with `response_tokens` [rows, N] (numpy, pad after EOS),
  `response_mask` and `lengths`, as `Engine.run_round` reads them. Block b uses
  the key fold_in(key, b); the last block is padded with copies of row 0.
  """

  def __init__(self, sampler, micro_batch_size: int, eos_ids, offloaded=()):
    self.sampler = sampler
    self.micro_batch_size = int(micro_batch_size)
    self.eos_ids = tuple(eos_ids)
    self.offloaded = tuple(offloaded)  # positions of state args kept on host between calls

  def __call__(self, *args):
    # (states..., tokens, mask, key[, alpha]) as Engine passes them.
    extra = (args[-1],) if isinstance(args[-1], (float, int)) else ()
    *states, tokens, mask, key = args[:len(args) - len(extra)]
    states = [to_memory(s, "device") if i in self.offloaded else s for i, s in enumerate(states)]
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    rows, mb = tokens.shape[0], self.micro_batch_size
    pad = -rows % mb
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    outs = []
    for b, start in enumerate(range(0, rows + pad, mb)):
      out = self.sampler(*states, tokens[start:start + mb], mask[start:start + mb],
                         jax.random.fold_in(key, b), *extra)
      outs.append(host_gather(out.response_tokens))
    resp = np.concatenate(outs)[:rows]
    resp_mask, lengths = sampler_lib.response_mask_from_tokens(jnp.asarray(resp), self.eos_ids)
    return SimpleNamespace(response_tokens=resp, response_mask=np.asarray(resp_mask),
                           lengths=np.asarray(lengths))


class ScopedOracle:
  """Runs an oracle under its own mesh and, optionally, offloads it between calls.

  On several hosts the judge is sharded over each host's own devices: every
  host judges the same (replicated) batch, so judging needs no cross-host
  traffic and its outputs are host-local arrays the host-side code can read.
  With `offload`, its parameters stay in pinned host memory except during a call.
  """

  def __init__(self, oracle, mesh, rules, offload: bool = False):
    self.oracle, self.mesh, self.rules, self.offload = oracle, mesh, rules, offload
    self.vocab_size = oracle.vocab_size
    if offload:
      oracle.state = to_memory(oracle.state, "pinned_host")

  def preference_prob(self, *args):
    from onpo_jax.models import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    host = self.oracle.state
    # Host copies: arrays made under the global mesh cannot enter the judge's mesh.
    args = [host_gather(a) for a in args]
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      if self.offload:
        self.oracle.state = to_memory(host, "device")
      try:
        # numpy, so the caller's arrays on the policy's mesh can mix with it.
        return host_gather(self.oracle.preference_prob(*args))
      finally:
        self.oracle.state = host


class LLMEngine(rounds.Engine):
  """`rounds.Engine` for real checkpoints (module docstring lists the changes).

  Args:
    graphdef: the policy's graphdef.
    model_config: its DecoderConfig.
    oracle: any `onpo_jax.oracle.Oracle` (host-side judges included).
    config: the llm config (`default_config()`).
    eos_ids: token ids that end a response.
    pad_id: id written after EOS.
  """

  def __init__(self, graphdef, model_config, oracle, config, *, eos_ids, pad_id: int,
               mesh=None):
    view = config.copy_and_resolve_references()
    view.unlock()
    # Engine reads the two lengths from `testbed`; here they are the data limits.
    view.testbed = ml_collections.ConfigDict(dict(
        response_length=int(config.sampling.max_new_tokens),
        prompt_length=int(config.data.max_prompt_length)))
    super().__init__(
        graphdef, model_config, oracle, view,
        inner_optimizer=lambda name: make_inner_optimizer(config,
                                                          updates_per_regression(config, name)))
    sp, sc = config.selfplay, config.sampling
    self.eos_ids, self.pad_id = tuple(int(e) for e in eos_ids), int(pad_id)
    self.chunk_size = config.policy.logprob_chunk_size or None
    self.micro = int(sp.minibatch_size)
    sampling = sampler_lib.SamplingConfig(
        max_new_tokens=int(sc.max_new_tokens), temperature=float(sp.temperature),
        top_p=float(sc.top_p), eos_ids=self.eos_ids, pad_id=self.pad_id,
        prompt_buckets=tuple(sc.prompt_buckets), cache_dtype=sc.cache_dtype)
    self.sampler = MicroBatchedSampler(
        sampler_lib.Sampler(graphdef, sampling, model_config=model_config),
        sc.micro_batch_size, self.eos_ids)
    self.mixture_sampler = MicroBatchedSampler(
        sampler_lib.MixtureSampler(graphdef, graphdef, sampling, policy_model_config=model_config,
                                   ref_model_config=model_config),
        sc.micro_batch_size, self.eos_ids, offloaded=(1,) if config.ref.offload else ())
    # Host-side: the judge decodes text, so example building is not jitted.
    self._build = {name: functools.partial(self._build_impl, name) for name in sp.methods}
    # Every jitted step returns (params, opt_state) put back on one fixed sharding
    # per leaf, so the next phase or round hits the compiled executable instead of
    # compiling again for whatever shardings GSPMD chose for the outputs.
    self.mesh = mesh
    self._canonical = {}
    for name in sp.methods:
      self._train_step[name] = self._pinned(name, self._train_step[name])
      if name in self._begin:
        self._begin[name] = self._pinned(name, self._begin[name])
        self._end[name] = self._pinned(name, self._end[name])

  def _sharding_of(self, x):
    if self.mesh is None or not isinstance(x, jax.Array):
      return None
    s = x.sharding
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == self.mesh:
      return s
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def _pin(self, tree, shardings):
    if self.mesh is None:
      return tree
    return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), tree, shardings)

  def _pinned(self, name, fn):
    def call(params, opt_state, *rest):
      out = fn(params, opt_state, *rest)
      canon = self._canonical[name]
      return (self._pin(out[0], canon["params"]), self._pin(out[1], canon["opt_state"])) + \
          tuple(out[2:])
    return call

  def init_state(self, name: str, sft_params) -> dict:
    """As `Engine.init_state`, with every leaf placed on its canonical sharding."""
    state = super().init_state(name, sft_params)
    self._canonical[name] = jax.tree.map(self._sharding_of, state)
    return self._pin(state, self._canonical[name])

  def _seq_logps(self, params, tokens, attn, resp):
    from onpo_jax import logprobs  # pylint: disable=g-import-not-at-top
    from onpo_jax.models.decoder import positions_from_mask  # pylint: disable=g-import-not-at-top
    model = nnx.merge(self.graphdef, params)
    token_lp = model.token_logprobs(tokens, positions_from_mask(attn), attn,
                                    chunk_size=self.chunk_size)
    return logprobs.reduce_logprobs(token_lp, resp, self.reduction)

  def _build_impl(self, name, prompt_tokens, prompt_mask, responses, opponents, key):
    """Training examples of one round, with EOS-aware response masks (host side)."""
    spec = rounds.METHODS[name]
    pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    responses = np.asarray(responses)
    n, k, length = responses.shape
    rmask = np.asarray(sampler_lib.response_mask_from_tokens(
        jnp.asarray(responses.reshape(n * k, length)), self.eos_ids)[0]).reshape(n, k, length)
    rep = lambda a, m: np.repeat(a, m, axis=0)
    seqs = functools.partial(full_sequences, pad_id=self.pad_id)
    if spec.data == "pairs":
      compare_fn = pairs_lib.oracle_compare_fn(self.oracle, jnp.asarray(pt), jnp.asarray(pm),
                                               jnp.asarray(responses), jnp.asarray(rmask))
      pr, _ = pairs_lib.build_pairs(self.pairing(name), compare_fn, key, n, k)
      m = pr.chosen.shape[1]
      take = lambda a, idx: np.take_along_axis(a, np.asarray(idx)[:, :, None], 1).reshape(n * m,
                                                                                         length)
      tok_w, attn_w, resp_w = seqs(rep(pt, m), rep(pm, m), take(responses, pr.chosen),
                                   take(rmask, pr.chosen))
      tok_l, attn_l, resp_l = seqs(rep(pt, m), rep(pm, m), take(responses, pr.rejected),
                                   take(rmask, pr.rejected))
      ex = dict(tok_w=tok_w, attn_w=attn_w, resp_w=resp_w, tok_l=tok_l, attn_l=attn_l,
                resp_l=resp_l, weight=np.asarray(pr.weight, np.float32).reshape(-1))
      return jax.tree.map(jnp.asarray, ex)
    flat, fmask = responses.reshape(n * k, length), rmask.reshape(n * k, length)
    tok, attn, resp = seqs(rep(pt, k), rep(pm, k), flat, fmask)
    ones = np.ones((n * k,), np.float32)
    if spec.data == "samples":
      ii, jj = np.triu_indices(k, 1)
      m = len(ii)
      p_upper = alpaca_eval.oracle_preferences(
          self.oracle, rep(pt, m), rep(pm, m), responses[:, ii].reshape(n * m, length),
          rmask[:, ii].reshape(n * m, length), responses[:, jj].reshape(n * m, length),
          rmask[:, jj].reshape(n * m, length), micro_batch_size=max(1, n * m)).reshape(n, m)
      mat = np.full((n, k, k), 0.5, np.float32)
      mat[:, ii, jj], mat[:, jj, ii] = p_upper, 1.0 - p_upper
      win = np.asarray(losses.sppo_win_rates(jnp.asarray(mat))).reshape(n * k)
      return jax.tree.map(jnp.asarray, dict(tok=tok, attn=attn, resp=resp, win_rate=win,
                                            weight=ones))
    opp = np.asarray(opponents).reshape(n * k, length)
    omask = np.asarray(sampler_lib.response_mask_from_tokens(jnp.asarray(opp), self.eos_ids)[0])
    pref = self.oracle.preference_prob(jnp.asarray(rep(pt, k)), jnp.asarray(rep(pm, k)),
                                       jnp.asarray(flat), jnp.asarray(fmask), jnp.asarray(opp),
                                       jnp.asarray(omask))
    return jax.tree.map(jnp.asarray, dict(tok=tok, attn=attn, resp=resp,
                                          preference=np.asarray(pref), weight=ones))

  def _anchor_logps(self, name, anchor_params, ex) -> dict:
    """Anchor log-probs in micro-batches of `selfplay.minibatch_size` examples."""
    anchor_params = to_memory(anchor_params, "device") if self.config.ref.offload else anchor_params
    mb = self.micro

    def lp(tok, attn, resp):
      return jnp.concatenate([self.seq_logps(anchor_params, tok[i:i + mb], attn[i:i + mb],
                                             resp[i:i + mb])
                              for i in range(0, tok.shape[0], mb)])

    if rounds.METHODS[name].data == "pairs":
      return {"w": lp(ex["tok_w"], ex["attn_w"], ex["resp_w"]),
              "l": lp(ex["tok_l"], ex["attn_l"], ex["resp_l"])}
    return {"y": lp(ex["tok"], ex["attn"], ex["resp"])}


# --------------------------------------------------------------------- config

MESH_VARIANTS = {
    # name: ((data, fsdp, tensor), devices) — FSDP first: an 8B policy with Adam
    # fits per device once sharded, and FSDP needs no model-specific rules.
    "gpu8": ((1, 8, 1), "1 node of 8 GPUs (the paper: 8×A100 40 GB)"),
    "v4-16": ((1, 8, 1), "TPU v4-16 slice: 8 chips × 32 GiB, 2 hosts"),
    "v4-32": ((2, 8, 1), "TPU v4-32 slice: 16 chips × 32 GiB, 4 hosts"),
    "v5p-8": ((1, 4, 1), "TPU v5p-8 slice: 4 chips × 95 GiB, 1 host"),
    "v5p-16": ((1, 8, 1), "TPU v5p-16 slice: 8 chips × 95 GiB, 2 hosts"),
    "v5p-64": ((4, 8, 1), "TPU v5p-64 slice: 32 chips × 95 GiB, 8 hosts"),
}


def default_config() -> ml_collections.ConfigDict:
  """Every field of the `llm` experiment, with the ONPO paper's settings.

  Symbols: ONPO's η (arXiv 2502.16852); INPO's η_I and τ (arXiv 2407.00617;
  η_I = 1/η of ONPO); DPO's β. Paths must be local directories (nothing is
  downloaded). Paper settings are marked [paper]; [inferred] / UNKNOWN as in
  ONPO_SPEC.md.
  """
  c = ml_collections.ConfigDict()
  c.experiment = "llm"
  c.seed = 0  # fixes sampling, oracle draws, minibatch order and the prompt split

  c.policy = ml_collections.ConfigDict()
  c.policy.path = ""  # local HF directory of the SFT policy π_SFT (config.json + safetensors)
  c.policy.tokenizer_path = ""  # tokenizer directory; "" = policy.path
  c.policy.param_dtype = "float32"  # master weights of π (and of π' in the optimizer state)
  c.policy.dtype = "bfloat16"  # compute dtype of activations
  c.policy.remat = True  # rematerialise blocks in the backward pass
  c.policy.logprob_chunk_size = 256  # predictions per chunk of the [B, L, V] log-softmax (0 = all)
  c.policy.hf_config = None  # config.json content used for memory plans when policy.path is absent

  c.ref = ml_collections.ConfigDict()
  c.ref.dtype = "bfloat16"  # frozen π_ref = π_SFT (INPO / DPO anchor, Nash-MD mixture)
  c.ref.offload = False  # keep π_ref in pinned host memory except while it is used

  c.judge = ml_collections.ConfigDict()
  c.judge.kind = "pairwise"  # 'pairwise' (pair-pm LM judge, the paper's oracle) | 'reward' (BT RM)
  c.judge.path = ""  # local HF directory of the judge
  c.judge.tokenizer_path = ""  # "" = judge.path
  c.judge.dtype = "bfloat16"  # judge parameters and compute, frozen
  c.judge.template = ""  # "" = RLHFlow pair-pm template (onpo_jax.judge.PAIR_PM_TEMPLATE)
  c.judge.use_chat_template = True  # wrap the filled template in the judge's chat template
  c.judge.labels = ("A", "B")  # judge tokens meaning "A is better" / "B is better"
  c.judge.max_length = 4096  # judge input tokens (longer inputs lose their start)
  c.judge.micro_batch_size = 8  # judge rows per forward pass
  c.judge.offload = False  # keep the judge in pinned host memory except while judging
  c.judge.hf_config = None  # config.json content for memory plans when judge.path is absent

  c.data = ml_collections.ConfigDict()
  c.data.source = "hf_dir"  # 'files' (jsonl/parquet) | 'hf_dir' | 'tfds' (onpo_jax.data)
  c.data.paths = ""  # the HF dataset directory or prompt file(s), e.g. prompt-collection-v0.1
  c.data.split = "train"
  c.data.tfds_data_dir = ""  # array_record output directory (source='tfds')
  c.data.max_prompt_length = 1024  # P: longest templated prompt, tokens
  c.data.overlong = "drop"  # 'drop' | 'truncate' prompts longer than P
  c.data.use_chat_template = True  # render prompts with the policy's chat template
  c.data.shuffle_seed = 0  # one global shuffle; round t uses its own disjoint slice

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 2048  # N: response tokens per sample (stops at EOS)
  c.sampling.top_p = 1.0  # nucleus sampling (1 = off); temperature is selfplay.temperature
  c.sampling.micro_batch_size = 64  # sampler rows (prompts × K) per call
  c.sampling.prompt_buckets = (128, 256, 512, 1024)  # left-padded prompt lengths (bounded recompiles)
  c.sampling.cache_dtype = "bfloat16"  # KV-cache dtype

  c.selfplay = ml_collections.ConfigDict()
  c.selfplay.methods = ("onpo_two_step",)  # rounds.METHODS names, each from the same SFT policy
  c.selfplay.num_rounds = 3  # T [paper: 3 iterations, as INPO]
  c.selfplay.prompts_per_round = 19968  # prompts per round [inferred: ~60k / 3, a multiple of 128]
  c.selfplay.num_samples = 8  # K responses per prompt [paper, INPO]
  c.selfplay.pairing = "tournament"  # INPO's knockout, best vs worst [paper practice]
  c.selfplay.epochs = 1  # passes over a round's pairs (UNKNOWN; 1 as in INPO's recipe)
  c.selfplay.global_batch_size = 128  # pairs per optimizer update [paper]
  c.selfplay.minibatch_size = 16  # pairs per micro-step (gradient accumulation up to 128)
  c.selfplay.learning_rate = 5e-7  # peak LR [paper: taken from INPO, arXiv 2407.00617]
  c.selfplay.lr_schedule = "cosine"  # 'cosine' (linear warm-up, cosine decay) [paper] | 'constant'
  c.selfplay.warmup_ratio = 0.03  # warm-up fraction of each regression's updates [paper]
  c.selfplay.weight_decay = 0.0  # AdamW decoupled weight decay
  c.selfplay.max_grad_norm = 1.0  # global-norm clipping (0 = off)
  c.selfplay.logp_reduction = "sum"  # lp(y) = Σ response-token log-probs (targets assume 'sum')
  c.selfplay.init_from = "anchor"  # ONPO: each regression starts at its anchor
  c.selfplay.temperature = 1.0  # sampling temperature of π_t

  c.onpo = ml_collections.ConfigDict()
  c.onpo.eta = 100.0  # ONPO η [paper: 1/η = 0.01]; target η/2 = 50 on the margin
  c.omd = ml_collections.ConfigDict()
  c.omd.eta_inpo = 0.01  # η_I of INPO w/o KL (= 1/η of ONPO)
  c.inpo = ml_collections.ConfigDict()
  c.inpo.eta_inpo = 0.005  # INPO η_I [paper]; step 1/η_I, target 1/(2η_I) = 100
  c.inpo.tau = 0.005 / 3  # INPO τ = η_I/3 [paper]
  c.sppo = ml_collections.ConfigDict()
  c.sppo.beta = 0.001  # SPPO β = 1/η_SPPO (SPPO paper η = 1e3)
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # iterative-DPO β (UNKNOWN in the paper; RLHFlow's recipe uses 0.1)
  c.dpo.label_smoothing = 0.0  # ε
  c.online_ipo = ml_collections.ConfigDict()
  c.online_ipo.beta = 0.1  # IPO β: target 1/(2β)
  c.nash_md = ml_collections.ConfigDict()
  c.nash_md.alpha = 0.125  # mixture weight of π_ref
  c.nash_md.beta = 0.05  # KL coefficient

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.variant = ""  # MESH_VARIANTS key the shape came from (documentation only)

  c.eval = ml_collections.ConfigDict()
  c.eval.prompt_file = ""  # AlpacaEval-style JSON/JSONL with "instruction" ("" = no evaluation)
  c.eval.reference_outputs = ""  # AlpacaEval outputs file to compare with; "" = the SFT policy
  c.eval.max_prompts = 0  # evaluate on the first n prompts (0 = all)
  c.eval.max_new_tokens = 2048
  c.eval.temperature = 0.0  # 0 = greedy decoding
  c.eval.micro_batch_size = 32  # sampler rows per call
  c.eval.confidence = 0.95  # CI level of the win rate
  c.eval.generator = ""  # AlpacaEval "generator" name ("" = "<method>-round<t>")

  c.export = ml_collections.ConfigDict()
  c.export.dtype = "bfloat16"  # dtype of the exported HF checkpoint
  c.export.max_shard_size = "5GB"  # safetensors shard size

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False  # call jax.distributed.initialize (experiments/run.py)
  # Unset (None) fields are auto-detected by jax.distributed (TPU pods, SLURM, Open MPI);
  # typed placeholders so that they can be set from the command line.
  c.distributed.coordinator_address = placeholder(str)  # "host:port" of process 0
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)
  c.distributed.local_device_ids = placeholder(tuple)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2
  c.log_every_seconds = 60.0
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:tiny` variant: same fields, sizes for tiny local checkpoints on CPU."""
  c.policy.param_dtype = "float32"
  c.policy.dtype = "float32"
  c.policy.remat = False
  c.policy.logprob_chunk_size = 8
  c.data.max_prompt_length = 24
  c.sampling.max_new_tokens = 6
  c.sampling.micro_batch_size = 8
  c.sampling.prompt_buckets = (24,)
  c.sampling.cache_dtype = "float32"
  c.judge.dtype = "float32"  # bf16 sums depend on the sharding; f32 keeps runs comparable
  c.judge.max_length = 96
  c.judge.micro_batch_size = 8
  c.judge.use_chat_template = False
  c.selfplay.num_rounds = 1
  c.selfplay.prompts_per_round = 4
  c.selfplay.num_samples = 4
  c.selfplay.global_batch_size = 4
  c.selfplay.minibatch_size = 2
  c.selfplay.learning_rate = 1e-3
  c.eval.max_new_tokens = 6
  c.eval.micro_batch_size = 4
  c.export.dtype = "float32"
  c.export.max_shard_size = "5GB"
  c.mesh.shape = (1, -1, 1)
  c.log_every_seconds = 0.0
  return c


def _need(ok: bool, field: str, expected: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field} must be {expected}; got {got!r}")


def validate_config(config) -> None:
  """Raises ValueError naming the config field that is missing or wrong."""
  sp = config.selfplay
  for field in ("policy.path", "judge.path", "data.paths"):
    section, key = field.split(".")
    _need(bool(config[section][key]), field, "a local path", config[section][key])
  _need(config.judge.kind in ("pairwise", "reward"), "judge.kind", "'pairwise' or 'reward'",
        config.judge.kind)
  rounds.validate_selfplay(sp, _need)
  methods = tuple(sp.methods)
  _need(sp.lr_schedule in ("cosine", "constant"), "selfplay.lr_schedule", "'cosine' or 'constant'",
        sp.lr_schedule)
  _need(0 <= sp.warmup_ratio < 1, "selfplay.warmup_ratio", "in [0, 1)", sp.warmup_ratio)
  for field in ("num_rounds", "prompts_per_round", "epochs", "global_batch_size",
                "minibatch_size"):
    _need(isinstance(sp[field], int) and sp[field] >= 1, f"selfplay.{field}", "an int >= 1",
          sp[field])
  accumulation_steps(sp.global_batch_size, sp.minibatch_size)
  for m in methods:
    updates_per_regression(config, m)
  for field in ("sampling.micro_batch_size", "eval.micro_batch_size", "judge.micro_batch_size",
                "sampling.max_new_tokens", "data.max_prompt_length"):
    section, key = field.split(".")
    _need(int(config[section][key]) >= 1, field, "an int >= 1", config[section][key])
  _need(max(config.sampling.prompt_buckets) >= config.data.max_prompt_length,
        "sampling.prompt_buckets", f"a largest bucket >= data.max_prompt_length = "
        f"{config.data.max_prompt_length}", tuple(config.sampling.prompt_buckets))
  shape = tuple(config.mesh.shape)
  _need(len(shape) == 3 and sum(s == -1 for s in shape) <= 1
        and all(s == -1 or s >= 1 for s in shape), "mesh.shape",
        "(data, fsdp, tensor) positive ints with at most one -1", shape)
  _need(0 < config.eval.confidence < 1, "eval.confidence", "in (0, 1)", config.eval.confidence)
  _need(0 <= config.inpo.tau < config.inpo.eta_inpo, "inpo.tau", "0 <= τ < inpo.eta_inpo",
        config.inpo.tau)


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """`config.mesh.shape` with its -1 resolved for `num_devices` devices."""
  shape = list(config.mesh.shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)}: {num_devices} devices are "
                       f"not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices; "
                     f"{num_devices} are available")
  return tuple(shape)


def decoder_configs(config):
  """(policy, judge) DecoderConfigs, from config.json when the path exists."""
  from onpo_jax.models.config import DecoderConfig  # pylint: disable=g-import-not-at-top

  def one(section, **overrides):
    src = section.path if section.path and os.path.isdir(section.path) else section.hf_config
    if src is None:
      raise ValueError(f"no config.json at {section.path!r} and no hf_config to plan from")
    if isinstance(src, ml_collections.ConfigDict):
      src = src.to_dict()
    return DecoderConfig.from_hf(src, **overrides)

  policy = one(config.policy, param_dtype=config.policy.param_dtype, dtype=config.policy.dtype,
               remat=bool(config.policy.remat))
  judge = one(config.judge, param_dtype=config.judge.dtype, dtype=config.judge.dtype)
  return policy, judge


def estimate_memory(config, mesh_dims: tuple[int, int, int] | None = None
                    ) -> memory_lib.MemoryEstimate:
  """Per-device bytes of a config on its mesh (`onpo_jax.memory`), nothing allocated.

  The optimizer is the one the run builds for the first method; the KV cache is
  one sampling micro-batch at the longest prompt bucket plus N new tokens.
  """
  policy, judge = decoder_configs(config)
  if mesh_dims is None:
    if -1 in tuple(config.mesh.shape):
      raise ValueError("config.mesh.shape has a -1; pass mesh_dims for a memory plan")
    mesh_dims = tuple(config.mesh.shape)
  name = config.selfplay.methods[0]
  spec = rounds.METHODS[name]
  inner = make_inner_optimizer(config, updates_per_regression(config, name))
  opt = (onpo_step(inner, variant=spec.variant, init_from=config.selfplay.init_from)
         if spec.variant else inner)
  needs_ref = any("ref" in rounds.METHODS[m].anchors for m in config.selfplay.methods)
  return memory_lib.estimate(
      policy, opt, dict(zip(("data", "fsdp", "tensor"), mesh_dims)),
      ref_config=(policy.replace(param_dtype=config.ref.dtype)
                  if needs_ref and not config.ref.offload else None),
      judge_config=None if config.judge.offload else judge,
      kv_batch_size=int(config.sampling.micro_batch_size),
      kv_length=max(config.sampling.prompt_buckets) + int(config.sampling.max_new_tokens),
      kv_dtype=config.sampling.cache_dtype)


# ------------------------------------------------------------------------ run


def build_oracle(config, policy_tokenizer, mesh, rules):
  """The run's oracle from `config.judge` (frozen, `judge.dtype`, optionally offloaded).

  `mesh` should span this host's devices only (see `ScopedOracle`).
  """
  from onpo_jax import judge as judge_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  jc = config.judge
  overrides = {"dtype": jc.dtype, "param_dtype": jc.dtype}
  tok_path = jc.tokenizer_path or jc.path
  if jc.kind == "pairwise":
    kw = dict(use_chat_template=bool(jc.use_chat_template), labels=tuple(jc.labels),
              max_length=int(jc.max_length), micro_batch_size=int(jc.micro_batch_size))
    if jc.template:
      kw["template"] = jc.template
    oracle = judge_lib.load_pairwise_judge(jc.path, policy_tokenizer, tokenizer_path=tok_path,
                                           mesh=mesh, config_overrides=overrides, **kw)
  else:
    model = judge_lib.load_reward_model(jc.path, mesh=mesh, **overrides)
    oracle = judge_lib.RewardModelOracle(
        model, tok_lib.load_tokenizer(tok_path), policy_tokenizer,
        template=jc.template or None, max_length=int(jc.max_length),
        micro_batch_size=int(jc.micro_batch_size))
  return ScopedOracle(oracle, mesh, rules, offload=bool(jc.offload))


class Evaluator:
  """AlpacaEval-format generations and the oracle win rate against a reference.

  The reference is the SFT policy's own generations (same decoding settings)
  or, with `eval.reference_outputs`, an AlpacaEval outputs file whose
  instructions must match the prompt file's, in order.
  """

  def __init__(self, config, tokenizer, graphdef, model_config, oracle, *, eos_ids, pad_id):
    from onpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    ec = config.eval
    instructions, datasets = alpaca_eval.read_instructions(ec.prompt_file)
    if ec.max_prompts:
      instructions, datasets = instructions[:ec.max_prompts], datasets[:ec.max_prompts]
    self.instructions, self.datasets = instructions, datasets
    records = [data_lib.PromptRecord(id=str(i), messages=(("user", s),), is_chat=False,
                                     source=f"{ec.prompt_file}:{i}")
               for i, s in enumerate(instructions)]
    # Truncation, not dropping: every instruction must get an output.
    toks, _, _ = data_lib.tokenize_prompts(
        records, tokenizer, max_prompt_length=int(config.data.max_prompt_length),
        overlong="truncate", use_chat_template=bool(config.data.use_chat_template))
    self.prompt_tokens, self.prompt_mask = data_lib.left_pad(
        toks, int(config.data.max_prompt_length), pad_id)
    greedy = float(ec.temperature) == 0.0
    sampling = sampler_lib.SamplingConfig(
        max_new_tokens=int(ec.max_new_tokens), temperature=1.0 if greedy else float(ec.temperature),
        greedy=greedy, eos_ids=tuple(eos_ids), pad_id=int(pad_id),
        prompt_buckets=tuple(config.sampling.prompt_buckets),
        cache_dtype=config.sampling.cache_dtype)
    self.sampler = MicroBatchedSampler(
        sampler_lib.Sampler(graphdef, sampling, model_config=model_config),
        ec.micro_batch_size, eos_ids)
    self.tokenizer, self.oracle, self.config = tokenizer, oracle, config
    self.reference = None  # (tokens, mask, texts)

  def generate(self, params, key):
    """(tokens [n, N], mask [n, N], texts) of the policy's answers."""
    out = self.sampler(params, self.prompt_tokens, self.prompt_mask, key)
    texts = [self.tokenizer.decode(t[m].tolist(), skip_special_tokens=True)
             for t, m in zip(out.response_tokens, out.response_mask)]
    return out.response_tokens, out.response_mask, texts

  def set_reference(self, sft_params, key) -> list[dict] | None:
    """Fixes the reference outputs; returns the SFT records when they were generated."""
    ec = self.config.eval
    if ec.reference_outputs:
      recs = alpaca_eval.read_outputs(ec.reference_outputs)
      got = [r["instruction"] for r in recs[:len(self.instructions)]]
      if got != self.instructions:
        raise ValueError(f"config.eval.reference_outputs={ec.reference_outputs!r}: its "
                         "instructions must equal eval.prompt_file's, in the same order")
      texts = [r["output"] for r in recs[:len(self.instructions)]]
      tokens, mask = alpaca_eval.encode_outputs(self.tokenizer, texts, int(ec.max_new_tokens))
      self.reference = (tokens, mask, texts)
      return None
    self.reference = self.generate(sft_params, key)
    return alpaca_eval.make_records(self.instructions, self.reference[2], "sft", self.datasets)

  def evaluate(self, params, key, generator: str):
    """(AlpacaEval records, WinRate vs the reference, mean response tokens)."""
    tokens, mask, texts = self.generate(params, key)
    ref_tokens, ref_mask, _ = self.reference
    prefs = alpaca_eval.oracle_preferences(
        self.oracle, self.prompt_tokens, self.prompt_mask, tokens, mask, ref_tokens, ref_mask,
        micro_batch_size=int(self.config.judge.micro_batch_size))
    wr = alpaca_eval.win_rate(prefs, float(self.config.eval.confidence))
    records = alpaca_eval.make_records(self.instructions, texts, generator, self.datasets)
    return records, wr, float(np.mean(mask.sum(axis=1)))


def export_policy(graphdef, params, path: str, *, dtype: str, max_shard_size, tokenizer=None):
  """Writes the policy as a HF directory (process 0 writes; every process must call).

  Each tensor is cast on device and gathered to the host one at a time.
  """
  from onpo_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  from onpo_jax.models.decoder import Decoder  # pylint: disable=g-import-not-at-top
  cfg = nnx.merge(graphdef, params).config.replace(param_dtype=dtype, remat=False)
  host = jax.tree.map(lambda x: host_gather(x.astype(jnp.dtype(dtype))), params)
  if jax.process_index() == 0:
    export_graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0))))[0]
    hf_io.save_hf_checkpoint(nnx.merge(export_graphdef, host), path, max_shard_size=max_shard_size)
    if tokenizer is not None:
      tokenizer.save_pretrained(path)
  multihost_utils.sync_global_devices(f"export {path}")
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Aligns `config.policy.path` for `selfplay.num_rounds` rounds; returns the summary."""
  from onpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  validate_config(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  methods = tuple(config.selfplay.methods)
  sp = config.selfplay
  if -1 not in tuple(config.mesh.shape) and jax.process_count() == 1:
    # A single host may plan on fewer devices than it has (tests, debugging).
    dims = tuple(config.mesh.shape)
    mesh = sharding_lib.make_mesh(dims, devices=jax.devices()[:math.prod(dims)])
  else:
    dims = mesh_shape(config, jax.device_count())
    mesh = sharding_lib.make_mesh(dims)
  rules = sharding_lib.DEFAULT_RULES
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  log = lambda msg: (print(msg, flush=True), logging.info(msg)) if is_main else None

  if True:  # models are loaded outside the activation context (nnx.eval_shape inside
    # jax.set_mesh would resolve logical names as mesh axes).
    tokenizer = tok_lib.load_tokenizer(config.policy.tokenizer_path or config.policy.path)
    policy = hf_io.load_hf_checkpoint(config.policy.path, mesh=mesh, rules=rules,
                                      param_dtype=config.policy.param_dtype,
                                      dtype=config.policy.dtype, remat=bool(config.policy.remat))
    model_config = policy.config
    graphdef, sft_params = nnx.split(policy)
    eos_ids = tok_lib.eos_token_ids(tokenizer, model_config)
    pad_id = int(tokenizer.pad_token_id)
    ref_params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.ref.dtype)), sft_params)
    if config.ref.offload:
      ref_params = to_memory(ref_params, "pinned_host")
    judge_mesh = mesh
    if jax.process_count() > 1:
      judge_mesh = sharding_lib.make_mesh((1, jax.local_device_count(), 1),
                                          devices=jax.local_devices())
    oracle = build_oracle(config, tokenizer, judge_mesh, rules)
    records = data_lib.load_prompt_records(
        config.data.source, config.data.paths, split=config.data.split,
        data_dir=config.data.tfds_data_dir or None)
    prompts = data_lib.PromptSet.from_records(
        records, tokenizer, max_prompt_length=int(config.data.max_prompt_length),
        overlong=config.data.overlong, use_chat_template=bool(config.data.use_chat_template))
    if prompts.num_rounds(int(sp.prompts_per_round)) < int(sp.num_rounds):
      raise ValueError(f"config.data.paths={config.data.paths!r} has {len(prompts)} usable prompts; "
                       f"selfplay.num_rounds={sp.num_rounds} x selfplay.prompts_per_round="
                       f"{sp.prompts_per_round} needs {sp.num_rounds * sp.prompts_per_round}")
    engine = LLMEngine(graphdef, model_config, oracle, config, eos_ids=eos_ids, pad_id=pad_id,
                       mesh=mesh)
    plan = estimate_memory(config, dims)
    writer.write_json("memory.json", plan.as_dict())
    log(f"llm: {len(prompts)} prompts ({prompts.stats}); eos {eos_ids}; memory {plan.summary()}")

    evaluator = None
    run_key = jax.random.key(int(config.seed))
    eval_key = jax.random.fold_in(run_key, 2**20)
    if config.eval.prompt_file:
      evaluator = Evaluator(config, tokenizer, graphdef, model_config, oracle, eos_ids=eos_ids,
                            pad_id=pad_id)
      with sharding_lib.activation_sharding(mesh, rules):
        sft_records = evaluator.set_reference(sft_params, eval_key)
      if sft_records is not None and is_main:
        alpaca_eval.write_outputs(os.path.join(workdir, "alpaca_eval", "sft.json"), sft_records)

    state = {"methods": {m: engine.init_state(m, sft_params) for m in methods}}
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=int(config.checkpoint.max_to_keep))
    total_units, unit = int(sp.num_rounds) * len(methods), 0
    latest = ckpt.latest_step()
    if latest is not None:
      state, meta = ckpt.restore(latest, state)
      unit = int(meta["unit"])
      log(f"llm: resuming after unit {unit}/{total_units} in {workdir}")
    history: dict[str, list] = {m: [] for m in methods}
    start = time.perf_counter()
    while unit < total_units:
      t, mi = divmod(unit, len(methods))
      name = methods[mi]
      batch = next(prompts.round_batches(t, batch_size=int(sp.prompts_per_round),
                                         prompts_per_round=int(sp.prompts_per_round),
                                         seed=int(config.data.shuffle_seed)))
      key = jax.random.fold_in(jax.random.fold_in(run_key, t), mi)
      with sharding_lib.activation_sharding(mesh, rules):
        new_state, m = engine.run_round(name, state["methods"][name], ref_params,
                                        batch.prompt_tokens, batch.prompt_mask, key, t + 1)
      state["methods"][name] = new_state
      out = {f"{name}/{k}": float(v) for k, v in m.items()}
      if evaluator is not None:
        generator = config.eval.generator or f"{name}-round{t + 1}"
        with sharding_lib.activation_sharding(mesh, rules):
          recs, wr, mean_len = evaluator.evaluate(new_state["params"], eval_key, generator)
        if is_main:
          alpaca_eval.write_outputs(
              os.path.join(workdir, "alpaca_eval", f"{name}_round{t + 1}.json"), recs)
        out.update(wr.as_dict(f"{name}/eval/"))
        out[f"{name}/eval/mean_response_tokens"] = mean_len
        history[name].append(wr.as_dict())
      unit += 1
      out["unit"] = unit
      writer.write(t + 1, out)
      ckpt.save(unit, state, {"unit": unit, "methods": list(methods)})
      log(f"[llm] round {t + 1}/{sp.num_rounds} {name}: loss "
          f"{out.get(f'{name}/policy/loss', out.get(f'{name}/aux/loss', float('nan'))):.4g}, "
          f"win rate vs ref {out.get(f'{name}/eval/win_rate', float('nan')):.3f}, "
          f"{time.perf_counter() - start:.0f}s elapsed")
    exports = {}
    for name in methods:
      exports[name] = export_policy(
          graphdef, state["methods"][name]["params"], os.path.join(workdir, "export", name),
          dtype=config.export.dtype, max_shard_size=config.export.max_shard_size,
          tokenizer=tokenizer)
  summary = {"methods": list(methods), "export": exports, "memory": plan.as_dict(),
             "eval": history, "mesh": list(dims), "process_count": jax.process_count()}
  writer.write_json("summary.json", summary)
  writer.close()
  ckpt.close()
  return summary


# ------------------------------------------------------------- paper configs

# config.json of the paper's checkpoints (architecture only), so memory plans
# and `jax.eval_shape` checks need no download.
LLAMA3_8B_HF = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128009],
    pad_token_id=None, hidden_act="silu")
MISTRAL_7B_HF = dict(
    model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
    sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=None, hidden_act="silu")
PAPER_METHODS = {"onpo": ("onpo_two_step",), "inpo": ("inpo",), "idpo": ("dpo",)}


def paper_config(model: str, method: str, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's setup for `model` ('llama3_8b' | 'mistral_7b') and `method`.

  Args:
    model: which SFT policy.
    method: 'onpo', 'inpo' or 'idpo' (iterative DPO); overridable by `arg`.
    arg: comma-separated tokens from the `--config=file.py:arg` suffix: a mesh
      variant (`MESH_VARIANTS`, default 'gpu8'), a method name, and/or 'tiny'
      (the CPU-sized copy for tiny local checkpoints of the same family).
  """
  tokens = [t for t in (arg or "").split(",") if t]
  variant, tiny = "gpu8", False
  for tok in tokens:
    if tok in MESH_VARIANTS:
      variant = tok
    elif tok in PAPER_METHODS:
      method = tok
    elif tok == "tiny":
      tiny = True
    else:
      raise ValueError(f"config arg {tok!r}: expected a mesh variant {sorted(MESH_VARIANTS)}, a "
                       f"method {sorted(PAPER_METHODS)} or 'tiny'")
  c = default_config()
  c.selfplay.methods = PAPER_METHODS[method]
  c.policy.hf_config = dict(LLAMA3_8B_HF if model == "llama3_8b" else MISTRAL_7B_HF)
  c.judge.hf_config = dict(LLAMA3_8B_HF)  # RLHFlow pair-pm is a Llama-3-8B
  c.mesh.shape, _ = MESH_VARIANTS[variant]
  c.mesh.variant = variant
  if tiny:
    shrink_for_cpu(c)
  return c
