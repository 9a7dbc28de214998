"""One self-play round per method: sample from π_t, query the oracle, regress.

Every method follows the same pipeline (issue 5, step 4):
  1. sample K responses per prompt from the method's current policy π_t with
     the jitted sampler (`onpo_jax.sampler`); Nash-MD also samples opponents from
     the per-token geometric mixture π_t^{1−α}·π_ref^{α} (`MixtureSampler`);
  2. build training examples with the oracle: preference pairs (`onpo_jax.pairs`:
     tournament / λ_p / all pairs), SPPO's per-sample win rates P̂ from the
     K×K preference matrix, or Nash-MD's P(y ≻ y') against the mixture sample;
  3. compute the anchor log-probs once (`aux` π', `prev` π_t, `ref` SFT), with a
     fingerprint of the anchor parameters (exact integer sums of their bits,
     computed on device) that is re-checked after training so a stale cache is
     caught;
  4. E epochs of shuffled minibatches with the inner optimizer (optax Adam unless
     the caller passes another, `Engine(inner_optimizer=...)`):
     ONPO through `onpo_step` (two regressions per round for `two_step`: the
     auxiliary one against π'_t, then the policy one against π'_{t+1} on the same
     data; one regression and a parameter-space extrapolation for
     `extrapolate`), the baselines with their own loss (`onpo_jax.losses`),
     every regression starting from π_t with a fresh inner state.
NaN/inf in a loss stops the run (`FloatingPointError` naming method, round, step).

Method table (BASELINES.md): loss / anchors / data
  onpo_two_step, onpo_extrapolate: ONPO regression, target η/2 / aux / pairs
  omd: INPO without KL, target 1/(2η_I) / prev / pairs
  inpo: INPO, τ and η_I / ref + prev / pairs
  sppo: SPPO per sample, target (P̂ − ½)/β / prev / K samples, K(K−1)/2 queries
  dpo: iterative DPO, β, ε / ref / best-vs-worst (tournament) pairs
  online_ipo: IPO, target 1/(2β) / ref / fresh pairs from π_t
  nash_md: REINFORCE vs mixture opponent, α, β / ref / N·K queries
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from onpo_jax import losses
from onpo_jax import oracle as oracle_lib
from onpo_jax import pairs as pairs_lib
from onpo_jax import sampler as sampler_lib
from onpo_jax import testbed
from onpo_jax.onpo_step import onpo_anchor_params
from onpo_jax.onpo_step import onpo_begin_phase
from onpo_jax.onpo_step import onpo_end_phase
from onpo_jax.onpo_step import onpo_step


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What a method trains on and against which anchors."""

  loss: str  # key of the loss in `_pair_loss` / 'sppo' / 'nash_md'
  data: str  # 'pairs' | 'samples' | 'mixture'
  anchors: tuple[str, ...]  # among 'aux', 'prev', 'ref'
  variant: str | None = None  # onpo_step variant
  fixed_pairing: str | None = None  # overrides config.selfplay.pairing


METHODS = {
    "onpo_two_step": MethodSpec("onpo", "pairs", ("aux",), variant="two_step"),
    "onpo_extrapolate": MethodSpec("onpo", "pairs", ("aux",), variant="extrapolate"),
    "omd": MethodSpec("omd", "pairs", ("prev",)),
    "inpo": MethodSpec("inpo", "pairs", ("ref", "prev")),
    "sppo": MethodSpec("sppo", "samples", ("prev",)),
    # Iterative DPO trains on best-vs-worst of K (BASELINES.md).
    "dpo": MethodSpec("dpo", "pairs", ("ref",), fixed_pairing="tournament"),
    "online_ipo": MethodSpec("online_ipo", "pairs", ("ref",)),
    "nash_md": MethodSpec("nash_md", "mixture", ("ref",)),
}


def to_memory(tree, kind: str):
  """Moves every array of `tree` to memory kind `kind` ('pinned_host' | 'device')."""
  def move(x):
    if not isinstance(x, jax.Array):
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(kind))
  return jax.tree.map(move, tree)


def _bits(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    width = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    x = jax.lax.bitcast_convert_type(x, width)
  return x.astype(jnp.uint32)


@jax.jit
def _fingerprint_device(tree):
  out = jnp.zeros((2,), jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    b = _bits(x).ravel()
    # Integer sums wrap exactly and do not depend on the reduction order, so the
    # value is identical on every mesh; a single changed bit changes the first.
    w = jnp.arange(1, b.size + 1, dtype=jnp.uint32) * jnp.uint32(2 * i + 1)
    out = out + jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * w, dtype=jnp.uint32)])
  return out


def fingerprint(tree) -> np.ndarray:
  """Identity of a parameter tree computed on device: two uint32 bit sums (as int64).

  Nothing is pulled to the host but the two sums, so it also works for trees
  sharded over several processes (gathered with `process_allgather`).
  """
  tree = to_memory(tree, "device")  # offloaded trees are fingerprinted on device too
  return np.asarray(multihost_utils.process_allgather(_fingerprint_device(tree), tiled=True)
                    )[:2].astype(np.int64)


def validate_selfplay(sp, need, *, num_samples_expected: str = "K >= 2") -> None:
  """Checks of the `selfplay` section shared by the testbed and the llm jobs.

  Args:
    sp: the `selfplay` config section.
    need: the job's `need(ok, field, expected, got)`, raising ValueError in the
      job's wording when `ok` is false.
    num_samples_expected: what the message says `selfplay.num_samples` must be.
  """
  need(isinstance(sp.num_samples, int) and sp.num_samples >= 2, "selfplay.num_samples",
       num_samples_expected, sp.num_samples)
  methods = tuple(sp.methods)
  need(len(methods) >= 1 and len(set(methods)) == len(methods), "selfplay.methods",
       "a non-empty tuple without duplicates", methods)
  for m in methods:
    need(m in METHODS, "selfplay.methods", f"names among {sorted(METHODS)}", m)
  need(sp.pairing in pairs_lib.PAIRINGS, "selfplay.pairing", f"one of {pairs_lib.PAIRINGS}",
       sp.pairing)


class Engine:
  """Jitted pieces shared by every round of every method (compiled once each).

  Args:
    graphdef: policy graphdef (all methods share the architecture).
    model_config: the policy's `DecoderConfig`.
    oracle: the preference oracle.
    config: the full run config (`configs/default.py`).
    inner_optimizer: the inner optimizer of every regression: an optax
      `GradientTransformation` shared by all methods, or a callable mapping a
      method name to its own (e.g. a schedule sized by that method's number of
      updates). None: `optax.adam(selfplay.learning_rate)`.
  """

  def __init__(self, graphdef, model_config, oracle, config, *, inner_optimizer=None):
    self.graphdef = graphdef
    self.oracle = oracle
    self.config = config
    sp = config.selfplay
    self.k = int(sp.num_samples)
    self.response_length = int(config.testbed.response_length)
    self.prompt_length = int(config.testbed.prompt_length)
    self.reduction = sp.logp_reduction
    sampling = sampler_lib.SamplingConfig(
        max_new_tokens=self.response_length, temperature=float(sp.temperature), eos_ids=(),
        pad_id=0, prompt_buckets=(self.prompt_length,))
    self.sampler = sampler_lib.Sampler(graphdef, sampling, model_config=model_config)
    self.mixture_sampler = sampler_lib.MixtureSampler(
        graphdef, graphdef, sampling, policy_model_config=model_config,
        ref_model_config=model_config)
    self.seq_logps = jax.jit(self._seq_logps)
    if inner_optimizer is None:
      inner_optimizer = optax.adam(float(sp.learning_rate))
    self.opts = {}
    for name in sp.methods:
      spec = METHODS[name]
      self.inner = (inner_optimizer if isinstance(inner_optimizer, optax.GradientTransformation)
                    else inner_optimizer(name))
      self.opts[name] = (onpo_step(self.inner, variant=spec.variant, init_from=sp.init_from)
                         if spec.variant else self.inner)
    self._train_step = {name: jax.jit(functools.partial(self._train_step_impl, name))
                        for name in sp.methods}
    self._build = {name: jax.jit(functools.partial(self._build_impl, name))
                   for name in sp.methods}
    self._begin = {}
    self._end = {}
    for name in sp.methods:
      if METHODS[name].variant:
        opt = self.opts[name]
        self._begin[name] = jax.jit(lambda p, s, opt=opt: onpo_begin_phase(opt, p, s))
        self._end[name] = jax.jit(lambda p, s, opt=opt: onpo_end_phase(opt, p, s))

  # -- pure pieces ---------------------------------------------------------------

  def _seq_logps(self, params, tokens, attn, resp):
    return testbed.sequence_logprobs(self.graphdef, params, tokens, attn, resp, self.reduction)

  def pairing(self, name: str) -> str:
    return METHODS[name].fixed_pairing or self.config.selfplay.pairing

  def num_queries_per_prompt(self, name: str) -> int:
    """Oracle queries per prompt and round (the reported budget)."""
    spec = METHODS[name]
    if spec.data == "samples":
      return self.k * (self.k - 1) // 2
    if spec.data == "mixture":
      return self.k
    pairing = self.pairing(name)
    if pairing == "tournament":
      return pairs_lib.tournament_num_comparisons(self.k)
    return 1 if pairing == "lambda_p" else self.k * (self.k - 1) // 2

  def _build_impl(self, name, prompt_tokens, prompt_mask, responses, opponents, key):
    """Training examples of one round (jitted per method): dict of [B, ...] arrays."""
    spec = METHODS[name]
    n, k, length = responses.shape
    resp_mask = jnp.ones(responses.shape, bool)
    rep = lambda a, m: jnp.repeat(a, m, axis=0)
    if spec.data == "pairs":
      compare_fn = pairs_lib.oracle_compare_fn(self.oracle, prompt_tokens, prompt_mask, responses,
                                               resp_mask)
      pr, _ = pairs_lib.build_pairs(self.pairing(name), compare_fn, key, n, k)
      m = pr.chosen.shape[1]
      take = lambda idx: jnp.take_along_axis(responses, idx[:, :, None], 1).reshape(n * m, length)
      tok_w, attn_w, resp_w = testbed.full_sequences(rep(prompt_tokens, m), rep(prompt_mask, m),
                                                     take(pr.chosen))
      tok_l, attn_l, resp_l = testbed.full_sequences(rep(prompt_tokens, m), rep(prompt_mask, m),
                                                     take(pr.rejected))
      return dict(tok_w=tok_w, attn_w=attn_w, resp_w=resp_w, tok_l=tok_l, attn_l=attn_l,
                  resp_l=resp_l, weight=pr.weight.reshape(-1))
    flat = responses.reshape(n * k, length)
    tok, attn, resp = testbed.full_sequences(rep(prompt_tokens, k), rep(prompt_mask, k), flat)
    if spec.data == "samples":
      # SPPO: P(y_i ≻ y_j) for i < j from the oracle, the rest by P + Pᵀ = 1.
      ii, jj = np.triu_indices(k, 1)
      m = len(ii)
      p_upper = self.oracle.preference_prob(
          rep(prompt_tokens, m), rep(prompt_mask, m),
          responses[:, ii].reshape(n * m, length), jnp.ones((n * m, length), bool),
          responses[:, jj].reshape(n * m, length), jnp.ones((n * m, length), bool)).reshape(n, m)
      mat = jnp.full((n, k, k), 0.5, p_upper.dtype)
      mat = mat.at[:, ii, jj].set(p_upper).at[:, jj, ii].set(1.0 - p_upper)
      win_rate = losses.sppo_win_rates(mat).reshape(n * k)
      return dict(tok=tok, attn=attn, resp=resp, win_rate=win_rate,
                  weight=jnp.ones((n * k,), jnp.float32))
    # Nash-MD: one query per policy sample against its mixture opponent.
    opp = opponents.reshape(n * k, length)
    preference = self.oracle.preference_prob(rep(prompt_tokens, k), rep(prompt_mask, k), flat,
                                             jnp.ones(flat.shape, bool), opp,
                                             jnp.ones(opp.shape, bool))
    return dict(tok=tok, attn=attn, resp=resp, preference=preference,
                weight=jnp.ones((n * k,), jnp.float32))

  def _anchor_logps(self, name, anchor_params, ex) -> dict:
    """Log-probs of the examples under one anchor, computed once per regression."""
    if METHODS[name].data == "pairs":
      return {"w": self.seq_logps(anchor_params, ex["tok_w"], ex["attn_w"], ex["resp_w"]),
              "l": self.seq_logps(anchor_params, ex["tok_l"], ex["attn_l"], ex["resp_l"])}
    return {"y": self.seq_logps(anchor_params, ex["tok"], ex["attn"], ex["resp"])}

  def _loss(self, name, params, ex, anchors):
    spec = METHODS[name]
    cfg = self.config
    w = ex["weight"]
    if spec.data == "pairs":
      b = ex["tok_w"].shape[0]
      lp = self._seq_logps(params, jnp.concatenate([ex["tok_w"], ex["tok_l"]]),
                           jnp.concatenate([ex["attn_w"], ex["attn_l"]]),
                           jnp.concatenate([ex["resp_w"], ex["resp_l"]]))
      lp_w, lp_l = lp[:b], lp[b:]
      if spec.loss == "onpo":
        return losses.onpo_loss(lp_w, lp_l, anchors["aux"]["w"], anchors["aux"]["l"],
                                eta=cfg.onpo.eta, weights=w)
      if spec.loss == "omd":
        return losses.omd_loss(lp_w, lp_l, anchors["prev"]["w"], anchors["prev"]["l"],
                               eta_inpo=cfg.omd.eta_inpo, weights=w)
      if spec.loss == "inpo":
        return losses.inpo_loss(lp_w, lp_l, anchors["ref"]["w"], anchors["ref"]["l"],
                                anchors["prev"]["w"], anchors["prev"]["l"], tau=cfg.inpo.tau,
                                eta_inpo=cfg.inpo.eta_inpo, weights=w)
      if spec.loss == "dpo":
        return losses.dpo_loss(lp_w, lp_l, anchors["ref"]["w"], anchors["ref"]["l"],
                               beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing,
                               weights=w)
      if spec.loss == "online_ipo":
        return losses.online_ipo_loss(lp_w, lp_l, anchors["ref"]["w"], anchors["ref"]["l"],
                                      beta=cfg.online_ipo.beta, weights=w)
      raise ValueError(f"unknown pair loss {spec.loss!r}")
    lp = self._seq_logps(params, ex["tok"], ex["attn"], ex["resp"])
    if spec.loss == "sppo":
      return losses.sppo_loss(lp, anchors["prev"]["y"], ex["win_rate"], beta=cfg.sppo.beta,
                              weights=w)
    return losses.nash_md_loss(lp, anchors["ref"]["y"], ex["preference"], beta=cfg.nash_md.beta,
                               weights=w)

  def _train_step_impl(self, name, params, opt_state, ex_all, anchors_all, idx, valid):
    """One gradient step on the minibatch `idx` (entries with valid=False weigh 0)."""
    take = lambda a: a[idx]
    ex = jax.tree.map(take, ex_all)
    ex["weight"] = ex["weight"] * valid.astype(ex["weight"].dtype)
    anchors = jax.tree.map(take, anchors_all)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: self._loss(name, p, ex, anchors), has_aux=True)(params)
    updates, opt_state = self.opts[name].update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, l2_grads=optax.global_norm(grads),
                   l2_updates=optax.global_norm(updates), l2_params=optax.global_norm(params))
    return params, opt_state, metrics

  # -- host-side round -----------------------------------------------------------

  def init_state(self, name: str, sft_params) -> dict:
    """A method's state at round 1: π_1 = π'_1 = π_SFT and a fresh optimizer."""
    return {"params": sft_params, "opt_state": self.opts[name].init(sft_params)}

  def _regress(self, name, params, opt_state, ex, anchors, key, round_idx, phase):
    """E epochs of minibatch steps; returns (params, opt_state, mean metrics, timing)."""
    sp = self.config.selfplay
    num = int(ex["weight"].shape[0])
    mb = int(sp.minibatch_size)
    steps_per_epoch = -(-num // mb)
    history = []
    seq_len = int(ex["tok_w" if "tok_w" in ex else "tok"].shape[1])
    seqs_per_example = 2 if "tok_w" in ex else 1
    t0 = time.perf_counter()
    for epoch in range(int(sp.epochs)):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num))
      # Static minibatch shape: the last one is filled with repeats that weigh 0.
      valid = np.arange(steps_per_epoch * mb) < num
      perm = np.resize(perm, steps_per_epoch * mb)
      for s in range(steps_per_epoch):
        sl = slice(s * mb, (s + 1) * mb)
        params, opt_state, metrics = self._train_step[name](
            params, opt_state, ex, anchors, jnp.asarray(perm[sl]), jnp.asarray(valid[sl]))
        history.append(metrics)
    history = jax.device_get(history)
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - t0
    step_losses = np.array([h["loss"] for h in history], np.float64)
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
      raise FloatingPointError(
          f"method {name!r}, round {round_idx}, phase {phase!r}: loss is {step_losses[bad[0]]} at "
          f"gradient step {int(bad[0])}; stopping the run (lower selfplay.learning_rate or the "
          f"method's step size)")
    mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    tokens = len(history) * mb * seqs_per_example * seq_len
    return params, opt_state, mean, (elapsed, tokens)

  def run_round(self, name: str, state: dict, sft_params, prompt_tokens, prompt_mask,
                key: jax.Array, round_idx: int) -> tuple[dict, dict]:
    """One round of `name` from `state`; returns (new state, metrics of the round)."""
    spec = METHODS[name]
    k_sample, k_mix, k_build, k_train = jax.random.split(key, 4)
    n = prompt_tokens.shape[0]
    params, opt_state = state["params"], state["opt_state"]
    rep_t = jnp.repeat(jnp.asarray(prompt_tokens), self.k, axis=0)
    rep_m = jnp.repeat(jnp.asarray(prompt_mask), self.k, axis=0)

    t0 = time.perf_counter()
    out = self.sampler(params, rep_t, rep_m, k_sample)
    responses = out.response_tokens.reshape(n, self.k, self.response_length)
    opponents = responses
    if spec.data == "mixture":
      mix = self.mixture_sampler(params, sft_params, rep_t, rep_m, k_mix,
                                 float(self.config.nash_md.alpha))
      opponents = mix.response_tokens.reshape(n, self.k, self.response_length)
    jax.block_until_ready(opponents)
    sample_time = time.perf_counter() - t0
    sampled_tokens = n * self.k * self.response_length * (2 if spec.data == "mixture" else 1)

    ex = self._build[name](jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), responses,
                           opponents, k_build)
    metrics = {}
    train_time, train_tokens = 0.0, 0
    phases = []
    if spec.variant == "two_step":
      phases = ["aux", "policy"]
    elif spec.variant == "extrapolate":
      phases = ["aux"]
    if phases:
      for i, phase in enumerate(phases):
        params, opt_state = self._begin[name](params, opt_state)
        anchor_params = onpo_anchor_params(opt_state)
        anchors = {"aux": self._anchor_logps(name, anchor_params, ex)}
        fp = fingerprint(anchor_params)
        params, opt_state, m, (dt, tok) = self._regress(
            name, params, opt_state, ex, anchors, jax.random.fold_in(k_train, i), round_idx, phase)
        if not np.array_equal(fp, fingerprint(onpo_anchor_params(opt_state))):
          raise RuntimeError(f"{name}: the anchor π' changed during the {phase} regression of "
                             f"round {round_idx}; cached anchor log-probs would be stale")
        params, opt_state = self._end[name](params, opt_state)
        metrics.update({f"{phase}/{key_}": v for key_, v in m.items()})
        metrics[f"{phase}/anchor_fingerprint"] = float(fp[0])
        train_time += dt
        train_tokens += tok
    else:
      opt_state = self.opts[name].init(params)  # each regression is a new problem
      anchor_trees = {"prev": params, "ref": sft_params}
      anchors = {a: self._anchor_logps(name, anchor_trees[a], ex) for a in spec.anchors}
      fps = {a: fingerprint(anchor_trees[a]) for a in spec.anchors}
      params, opt_state, m, (dt, tok) = self._regress(name, params, opt_state, ex, anchors,
                                                      k_train, round_idx, "policy")
      for a in spec.anchors:
        if not np.array_equal(fps[a], fingerprint(anchor_trees[a])):
          raise RuntimeError(f"{name}: anchor {a!r} changed during round {round_idx}")
      metrics.update({f"policy/{key_}": v for key_, v in m.items()})
      train_time, train_tokens = dt, tok
    metrics.update({
        "oracle_queries": float(n * self.num_queries_per_prompt(name)),
        "pairs_kept": float(np.sum(np.asarray(ex["weight"]))),
        "sample_tokens_per_s": sampled_tokens / max(sample_time, 1e-9),
        "train_tokens_per_s": train_tokens / max(train_time, 1e-9),
    })
    return {"params": params, "opt_state": opt_state}, metrics
