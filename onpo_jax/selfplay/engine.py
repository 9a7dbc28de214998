"""One self-play round of any method, on any backend.

Every method follows the same pipeline (docs/algorithm.md §3, docs/baselines.md):
  1. sample K responses per prompt from the method's current policy π_t
     (`Backend.sample`); Nash-MD also samples opponents from the per-token
     geometric mixture π_t^{1−α}·π_ref^{α} (`Backend.sample_mixture`);
  2. build training examples with the oracle (`Backend.build_examples`):
     preference pairs (tournament / λ_p / all pairs), SPPO's per-sample win
     rates P̂, or Nash-MD's P(y ≻ y') against the mixture sample;
  3. compute the anchor log-probs once per regression (`aux` π', `prev` π_t,
     `ref` SFT), with a fingerprint of the anchor parameters that is re-checked
     after training so a stale cache is caught;
  4. E epochs of shuffled minibatches with the inner optimizer (optax Adam
     unless the caller passes another): ONPO through `onpo_step` (two
     regressions per round for `two_step`: the auxiliary one against π'_t, then
     the policy one against π'_{t+1} on the same data; one regression and a
     parameter-space extrapolation for `extrapolate`), the baselines with their
     own loss from the method table (`onpo_jax.selfplay.methods.METHODS`).
NaN/inf in a loss stops the run (`FloatingPointError` naming method, round, step).
"""

from __future__ import annotations

import copy
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onpo_jax import pairs as pairs_lib
from onpo_jax.onpo_step import onpo_anchor_params
from onpo_jax.onpo_step import onpo_begin_phase
from onpo_jax.onpo_step import onpo_end_phase
from onpo_jax.onpo_step import onpo_step
from onpo_jax.selfplay.fingerprint import fingerprint
from onpo_jax.selfplay.methods import METHODS
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.selfplay.methods import PairLogps
from onpo_jax.selfplay.methods import pairing as method_pairing


def _pinned_sharding(mesh, x):
  """The sharding a state leaf keeps between jitted calls (None: leave it be)."""
  if mesh is None or not isinstance(x, jax.Array):
    return None
  s = x.sharding
  if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
    return s
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _distinct_buffers(params, opt_state):
  """(params, opt_state) with a copy of every leaf that already appeared in them.

  The updates donate params and opt_state, and one buffer cannot be donated
  twice: an optimizer whose init puts the parameters themselves in its state
  (a running average started at them, say), or a regression (a pluggable
  solver) that returns one array in two places, would share one.
  """
  seen = set()

  def own(x):
    if id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(own, (params, opt_state))


def _abstract(x):
  """An array's shape, dtype and committed sharding; other leaves as they are."""
  if isinstance(x, jax.Array):
    # An uncommitted array leaves its placement to jit: naming it would
    # lower another program than the call compiled.
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None)
  if isinstance(x, np.ndarray):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _policy_logps(backend, params, batch, frozen=None):
  """The trained policy's log-probs of a minibatch (one forward over both pair sides)."""
  if isinstance(batch, PairBatch):
    b = batch.tok_w.shape[0]
    lp = backend.sequence_logprobs(params, jnp.concatenate([batch.tok_w, batch.tok_l]),
                                   jnp.concatenate([batch.attn_w, batch.attn_l]),
                                   jnp.concatenate([batch.resp_w, batch.resp_l]), frozen)
    return PairLogps(lp[:b], lp[b:])
  return backend.sequence_logprobs(params, batch.tok, batch.attn, batch.resp, frozen)


class Engine:
  """Jitted pieces shared by every round of every method (compiled once each).

  Args:
    backend: a `onpo_jax.selfplay.backend.Backend`.
    config: the run config: `selfplay` (methods, num_samples, pairing, epochs,
      minibatch_size, learning_rate, init_from) and each method's section.
    inner_optimizer: the inner optimizer of every regression: an optax
      `GradientTransformation` shared by all methods, or a callable mapping a
      method name to its own (e.g. a schedule sized by that method's number of
      updates). None: `optax.adam(selfplay.learning_rate)`.
    mesh: when set, every state leaf is put back on one fixed sharding after
      each jitted call, so the next phase or round hits the compiled executable
      instead of compiling again for whatever shardings the compiler chose.
    regression: how one regression is solved, `regression(name, optimizer,
      params, opt_state, batch, anchors, key, round_idx, phase) -> (params,
      opt_state, mean metrics, (seconds, tokens))`; None: E epochs of shuffled minibatches
      (`_regress`). The testbed's exact mode passes a full-batch solver.
  """

  def __init__(self, backend, config, *, inner_optimizer=None, mesh=None, regression=None):
    self.backend = backend
    self.config = config
    self.mesh = mesh
    self.regression = regression or self._regress
    sp = config.selfplay
    self.k = int(sp.num_samples)
    # Minibatches per optimizer update (gradient accumulation up to the global batch).
    self.accumulation = int(sp.get("global_batch_size", sp.minibatch_size)) // int(
        sp.minibatch_size)
    if inner_optimizer is None:
      inner_optimizer = optax.adam(float(sp.learning_rate))
    self.opts, self._train_step, self._begin, self._end = {}, {}, {}, {}
    self._pinned_shardings = {}
    # Per method, the abstract arguments of its first train step (`train_step_memory`).
    self._step_args = {}
    for name in sp.methods:
      spec = METHODS[name]
      inner = (inner_optimizer if isinstance(inner_optimizer, optax.GradientTransformation)
               else inner_optimizer(name))
      opt = onpo_step(inner, variant=spec.variant, init_from=sp.init_from) if spec.variant \
          else inner
      self.opts[name] = opt
      # params and opt_state are donated: each update writes the state in place
      # instead of holding the old and the new one (two more copies of the
      # parameters and optimizer moments at the peak). keep_unused: jit drops an
      # argument the computation does not read (BEGIN's reset of the inner
      # optimizer's moments), and a dropped argument is not donated, so the old
      # moments would stay alive beside the new ones.
      donate = dict(donate_argnums=(0, 1), keep_unused=True)
      self._train_step[name] = jax.jit(functools.partial(self._train_step_impl, name), **donate)
      if spec.variant:
        self._begin[name] = jax.jit(lambda p, s, opt=opt: onpo_begin_phase(opt, p, s), **donate)
        self._end[name] = jax.jit(lambda p, s, opt=opt: onpo_end_phase(opt, p, s), **donate)

  def with_backend(self, backend) -> "Engine":
    """This engine, its compiled steps shared, over another backend of the same policy.

    The compiled steps see the backend only through the policy's
    log-probabilities, which depend on the architecture (`graphdef`) and the
    token reduction alone; what else differs between the backends (the oracle
    that judges, for another game) is reached outside them.
    """
    for attr in ("graphdef", "reduction"):
      if getattr(backend, attr, None) != getattr(self.backend, attr, None):
        raise ValueError(f"Engine.with_backend: the backends' {attr} differ; the compiled "
                         "steps would score the policy with the old one")
    other = copy.copy(self)
    other.backend = backend
    return other

  # -- pure pieces ---------------------------------------------------------------

  def pairing(self, name: str) -> str:
    return method_pairing(name, self.config.selfplay.pairing)

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

  def _train_step_impl(self, name, params, opt_state, batch, anchors, idx, valid, scale,
                       frozen=None):
    """One gradient step on the minibatch `idx` (entries with valid=False weigh 0).

    `frozen` is the backend's frozen arrays (LoRA's base; None), an argument
    rather than a constant so the executable does not embed them.

    `scale` turns the minibatch's weighted mean into its share of the weighted
    mean over the whole accumulation group (see `_accumulation_scales`).
    """
    mb = jax.tree.map(lambda a: a[idx], batch)
    mb = mb._replace(weight=mb.weight * valid.astype(mb.weight.dtype))
    anchors = jax.tree.map(lambda a: a[idx], anchors)
    target = getattr(mb, "target", None)

    def loss_fn(p):
      loss, metrics = METHODS[name].loss(self.config, _policy_logps(self.backend, p, mb, frozen),
                                         anchors, target, mb.weight)
      return loss * scale, (loss, metrics)

    (_, (loss, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.opts[name].update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, l2_grads=optax.global_norm(grads),
                   l2_updates=optax.global_norm(updates), l2_params=optax.global_norm(params))
    return params, opt_state, metrics

  def train_step_memory(self, name: str) -> dict[str, int] | None:
    """XLA's per-device memory of the method's compiled train step, in bytes.

    Read from the executable of the method's first train step: `arguments`
    (parameters, optimizer state, the round's batch and anchors, the frozen
    base), `outputs`, `temporaries` (activations kept for the backward pass,
    gradients and scratch, in one block XLA assigns) and `aliased` (outputs
    written into donated arguments); `peak` = arguments + outputs +
    temporaries − aliased. The jit cache serves the executable, only tracing
    is repeated; call it under the activation sharding rules of the round, or
    the trace differs and compiles anew.

    Returns:
      The sizes, or None before the method's first minibatch step (a
      regression that does not take them, the testbed's exact solver) or
      where the backend reports no memory analysis.
    """
    if name not in self._step_args:
      return None
    args, frozen = self._step_args[name]
    stats = self._train_step[name].lower(*args, frozen=frozen).compile().memory_analysis()
    if stats is None:
      return None
    out = dict(arguments=int(stats.argument_size_in_bytes),
               outputs=int(stats.output_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes), aliased=int(stats.alias_size_in_bytes))
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out

  def _accumulation_scales(self, weights: np.ndarray) -> np.ndarray:
    """Per-step loss scales so that an accumulated update weighs every example alike.

    Each minibatch loss is a weighted mean Σ_b w ℓ / Σ_b w, and gradient
    accumulation (`optax.MultiSteps`) averages the A minibatch gradients of
    one update. Scaling minibatch b by A·Σ_b w / Σ_group w makes that average
    the weighted mean over the whole group, Σ_group w ℓ / Σ_group w, so pairs
    dropped by the tournament (weight 0) do not make the survivors of a sparse
    minibatch weigh more than those of a full one.

    Args:
      weights: [steps, minibatch] example weights of a regression's steps, in order.

    Returns:
      [steps] float32 scales (1 without accumulation).
    """
    accum = self.accumulation
    if accum == 1:
      return np.ones(weights.shape[0], np.float32)
    if weights.shape[0] % accum:
      raise ValueError(f"{weights.shape[0]} minibatch steps per epoch do not fill whole updates "
                       f"of {accum} accumulated minibatches (selfplay.global_batch_size)")
    per_step = weights.sum(axis=1, dtype=np.float64)
    group = np.repeat(per_step.reshape(-1, accum).sum(axis=1), accum)
    return np.where(group > 0, accum * per_step / np.where(group > 0, group, 1.0), 0.0
                    ).astype(np.float32)

  # -- placement -----------------------------------------------------------------

  def _pin(self, name, params, opt_state):
    if self.mesh is None:
      return params, opt_state
    shardings = self._pinned_shardings[name]
    put = lambda tree, s: jax.tree.map(lambda x, sh: x if sh is None else jax.device_put(x, sh),
                                       tree, s)
    return put(params, shardings["params"]), put(opt_state, shardings["opt_state"])

  def init_state(self, name: str, sft_params) -> dict:
    """A method's state at round 1: π_1 = π'_1 = π_SFT and a fresh optimizer.

    The state owns its buffers (a copy of `sft_params`, an optimizer state
    sharing none of them): `train` donates them, and the caller's SFT tree
    (π_ref, the evaluation's baseline) stays intact.
    """
    params = jax.tree.map(jnp.copy, sft_params)
    params, opt_state = _distinct_buffers(params, self.opts[name].init(params))
    state = {"params": params, "opt_state": opt_state}
    self._pinned_shardings[name] = jax.tree.map(functools.partial(_pinned_sharding, self.mesh),
                                                state)
    params, opt_state = self._pin(name, state["params"], state["opt_state"])
    return {"params": params, "opt_state": opt_state}

  # -- host-side round -----------------------------------------------------------

  def _regress(self, name, optimizer, params, opt_state, batch, anchors, key, round_idx, phase):
    """E epochs of minibatch steps; returns (params, opt_state, mean metrics, timing).

    Nash-MD takes one update per fresh sample set (its REINFORCE gradient is
    only unbiased at the policy that drew the samples): one epoch, and without
    gradient accumulation the whole batch in one step (docs/baselines.md §6).
    """
    del optimizer  # the jitted train step holds it
    sp = self.config.selfplay
    num = int(batch.weight.shape[0])
    on_policy_once = METHODS[name].data == "mixture"
    mb = num if on_policy_once and self.accumulation == 1 else int(sp.minibatch_size)
    epochs = 1 if on_policy_once else int(sp.epochs)
    if on_policy_once and self.accumulation > 1 and num != mb * self.accumulation:
      raise ValueError(f"{name}: {num} samples per round with gradient accumulation of "
                       f"{self.accumulation} x {mb} make several updates per sample set; set "
                       "selfplay.global_batch_size = prompts_per_round x num_samples")
    steps_per_epoch = -(-num // mb)
    history = []
    pair = isinstance(batch, PairBatch)
    seq_len = int((batch.tok_w if pair else batch.tok).shape[1])
    weights = np.asarray(batch.weight, np.float64)
    t0 = time.perf_counter()
    for epoch in range(epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num))
      # Static minibatch shape: the last one is filled with repeats that weigh 0.
      valid = np.arange(steps_per_epoch * mb) < num
      perm = np.resize(perm, steps_per_epoch * mb)
      scales = self._accumulation_scales((weights[perm] * valid).reshape(steps_per_epoch, mb))
      for s in range(steps_per_epoch):
        sl = slice(s * mb, (s + 1) * mb)
        args = (params, opt_state, batch, anchors, jnp.asarray(perm[sl]),
                jnp.asarray(valid[sl]), jnp.asarray(scales[s]))
        frozen = getattr(self.backend, "frozen", None)
        if name not in self._step_args:
          self._step_args[name] = jax.tree.map(_abstract, (args, frozen))
        params, opt_state, metrics = self._train_step[name](*args, frozen=frozen)
        params, opt_state = self._pin(name, params, opt_state)
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
    tokens = len(history) * mb * (2 if pair else 1) * seq_len
    return params, opt_state, mean, (elapsed, tokens)

  def _phase(self, name, params, opt_state, batch, anchor_trees, key, round_idx, phase):
    """One regression against fixed anchors whose fingerprints are checked afterwards."""
    anchors = {a: self.backend.anchor_logprobs(tree, batch) for a, tree in anchor_trees.items()}
    fps = {a: fingerprint(tree) for a, tree in anchor_trees.items()}
    params, opt_state, metrics, timing = self.regression(
        name, self.opts[name], params, opt_state, batch, anchors, key, round_idx, phase)
    return params, opt_state, metrics, timing, fps

  def collect(self, name: str, params, ref_params, prompt_tokens, prompt_mask, *,
              sample_key: jax.Array, mixture_key: jax.Array, oracle_key: jax.Array) -> tuple:
    """Samples from π_t and builds the round's examples; returns (batch, metrics)."""
    spec = METHODS[name]
    n = prompt_tokens.shape[0]
    rep_t = jnp.repeat(jnp.asarray(prompt_tokens), self.k, axis=0)
    rep_m = jnp.repeat(jnp.asarray(prompt_mask), self.k, axis=0)
    t0 = time.perf_counter()
    shape = lambda s: jnp.asarray(s).reshape((n, self.k) + s.shape[1:])
    out = self.backend.sample(params, rep_t, rep_m, sample_key)
    responses, response_mask = shape(out.tokens), shape(out.mask)
    opponents, opponent_mask = responses, response_mask
    if spec.data == "mixture":
      mix = self.backend.sample_mixture(params, ref_params, rep_t, rep_m, mixture_key,
                                        float(self.config.nash_md.alpha))
      opponents, opponent_mask = shape(mix.tokens), shape(mix.mask)
    jax.block_until_ready(opponents)
    sample_time = time.perf_counter() - t0
    sampled_tokens = int(np.prod(responses.shape)) * (2 if spec.data == "mixture" else 1)
    batch = self.backend.build_examples(spec.data, self.pairing(name), jnp.asarray(prompt_tokens),
                                        jnp.asarray(prompt_mask), responses, response_mask,
                                        opponents, opponent_mask, oracle_key)
    return batch, {"oracle_queries": float(n * self.num_queries_per_prompt(name)),
                   "sample_tokens_per_s": sampled_tokens / max(sample_time, 1e-9)}

  def train(self, name: str, state: dict, ref_params, batch, key: jax.Array,
            round_idx: int) -> tuple[dict, dict]:
    """The round's regression(s) on `batch`; returns (new state, metrics).

    `state`'s buffers are donated to the updates: use the returned state, not
    `state`, afterwards (`ref_params` is only read).
    """
    spec = METHODS[name]
    params, opt_state = state["params"], state["opt_state"]
    metrics = {}
    train_time, train_tokens = 0.0, 0
    if spec.variant:
      for i, phase in enumerate(spec.phases):
        params, opt_state = self._pin(name, *self._begin[name](
            *_distinct_buffers(params, opt_state)))
        anchor_params = onpo_anchor_params(opt_state)
        params, opt_state, m, (dt, tok), fps = self._phase(
            name, params, opt_state, batch, {"aux": anchor_params},
            jax.random.fold_in(key, i), round_idx, phase)
        if not np.array_equal(fps["aux"], fingerprint(onpo_anchor_params(opt_state))):
          raise RuntimeError(f"{name}: the anchor π' changed during the {phase} regression of "
                             f"round {round_idx}; cached anchor log-probs would be stale")
        params, opt_state = self._pin(name, *self._end[name](
            *_distinct_buffers(params, opt_state)))
        metrics.update({f"{phase}/{key_}": v for key_, v in m.items()})
        metrics[f"{phase}/anchor_fingerprint"] = float(fps["aux"][0])
        train_time += dt
        train_tokens += tok
    else:
      # Each regression is a new problem: the old optimizer state is not read
      # again, so it is freed now rather than when the caller drops `state`. The
      # regression donates params, so the anchor π_t is a copy of them.
      keep = {id(x) for x in jax.tree.leaves(params)}
      for x in jax.tree.leaves(opt_state):
        if isinstance(x, jax.Array) and id(x) not in keep:
          x.delete()
      params, opt_state = _distinct_buffers(params, self.opts[name].init(params))
      anchor_trees = {}
      for a in spec.anchors:
        anchor_trees[a] = jax.tree.map(jnp.copy, params) if a == "prev" else {
            "ref": ref_params}[a]
      params, opt_state, m, (dt, tok), fps = self._phase(
          name, params, opt_state, batch, anchor_trees, key, round_idx, "policy")
      for a, tree in anchor_trees.items():
        if not np.array_equal(fps[a], fingerprint(tree)):
          raise RuntimeError(f"{name}: anchor {a!r} changed during round {round_idx}")
      metrics.update({f"policy/{key_}": v for key_, v in m.items()})
      train_time, train_tokens = dt, tok
    metrics["train_tokens_per_s"] = train_tokens / max(train_time, 1e-9)
    return {"params": params, "opt_state": opt_state}, metrics

  def run_round(self, name: str, state: dict, ref_params, prompt_tokens, prompt_mask,
                key: jax.Array, round_idx: int) -> tuple[dict, dict]:
    """One round of `name` from `state`; returns (new state, metrics of the round).

    Args:
      name: a `METHODS` name.
      state: {'params', 'opt_state'} of the method.
      ref_params: π_ref = SFT (the `ref` anchor and Nash-MD's mixture partner).
      prompt_tokens, prompt_mask: [n, P] prompts of the round.
      key: the round's PRNG key (sampling, oracle draws, minibatch order).
      round_idx: 1-based round number, for messages.
    """
    k_sample, k_mix, k_build, k_train = jax.random.split(key, 4)
    batch, collected = self.collect(name, state["params"], ref_params, prompt_tokens,
                                    prompt_mask, sample_key=k_sample, mixture_key=k_mix,
                                    oracle_key=k_build)
    state, metrics = self.train(name, state, ref_params, batch, k_train, round_idx)
    train_rate = metrics.pop("train_tokens_per_s")
    metrics.update({
        "oracle_queries": collected["oracle_queries"],
        "pairs_kept": float(np.sum(np.asarray(batch.weight))),
        "sample_tokens_per_s": collected["sample_tokens_per_s"],
        "train_tokens_per_s": train_rate,
    })
    return state, metrics
