"""The real-checkpoint backend of the self-play engine.

What differs from the testbed (`onpo_jax.testbed.backend`):
  * responses end at EOS: the response mask comes from the sampled tokens
    (`sampler.response_mask_from_tokens`), so pad tokens after EOS are never
    scored, and examples are built on the host because the judge reads text;
  * sampling, anchor log-probs and judging run in micro-batches;
  * the reference and the judge may wait in pinned host memory between uses
    (`onpo_jax.selfplay.roles`), and the judge may run on its own mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from onpo_jax import logprobs
from onpo_jax import sampler as sampler_lib
from onpo_jax.llm import adapted as adapted_lib
from onpo_jax.llm import config as llm_config
from onpo_jax.llm.export import host_gather
from onpo_jax.models.decoder import positions_from_mask
from onpo_jax.selfplay import examples as examples_lib
from onpo_jax.selfplay import roles
from onpo_jax.selfplay.backend import Samples
from onpo_jax.selfplay.methods import PairBatch
from onpo_jax.selfplay.methods import PairLogps


class MicroBatchedSampler:
  """Calls a `Sampler`/`MixtureSampler` on fixed-size row blocks.

  Returns `Samples(tokens [rows, N] numpy with pad after EOS, mask)`. Block b
  uses the key fold_in(key, b); the last block is padded with copies of row 0.
  """

  def __init__(self, sampler, micro_batch_size: int, eos_ids, offloaded=()):
    self.sampler = sampler
    self.micro_batch_size = int(micro_batch_size)
    self.eos_ids = tuple(eos_ids)
    self.offloaded = tuple(offloaded)  # positions of state args kept on host between calls

  def __call__(self, *args):
    # (states..., tokens, mask, key[, alpha]) as the sampler takes them.
    extra = (args[-1],) if isinstance(args[-1], (float, int)) else ()
    *states, tokens, mask, key = args[:len(args) - len(extra)]
    states = [roles.to_memory(s, "device") if i in self.offloaded else s
              for i, s in enumerate(states)]
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
    resp_mask, _ = sampler_lib.response_mask_from_tokens(jnp.asarray(resp), self.eos_ids)
    return Samples(resp, np.asarray(resp_mask))


class ScopedOracle:
  """Runs an oracle under its own mesh, on this process's share of the rows.

  On several hosts the judge is sharded over each host's own devices and every
  process judges only its shard of each batch's rows (`data.host_shard`: every
  `process_count`-th row from `process_index`, the last rows padded with copies
  of row 0 so every process has the same shape); the probabilities are then
  gathered, so each process returns the whole batch's, in order. Judging needs
  no cross-host traffic besides that gather, and the judge's outputs are
  host-local arrays the host-side code can read. With `offload`, its parameters
  stay in pinned host memory except during a call.
  """

  def __init__(self, oracle, mesh, rules, offload: bool = False):
    self.oracle, self.mesh, self.rules = oracle, mesh, rules
    # A program oracle (no `state`: e.g. the verifiable judge) has nothing to offload.
    self.offload = bool(offload) and hasattr(oracle, "state")
    self.vocab_size = oracle.vocab_size
    self.rows_judged = 0  # rows this process judged since the last `pop_counts`
    if self.offload:
      oracle.state = roles.to_memory(oracle.state, "pinned_host")

  def preference_prob(self, *args):
    # Host copies: arrays made under the global mesh cannot enter the judge's mesh.
    args = [host_gather(a) for a in args]
    count = jax.process_count()
    if count == 1:
      return self._judge(args)
    rows = args[0].shape[0]
    mine = host_rows(rows, jax.process_index(), count)
    probs = self._judge([a[np.where(mine < rows, mine, 0)] for a in args])
    gathered = np.asarray(multihost_utils.process_allgather(probs))  # [count, rows per process]
    out = np.empty((gathered.size,) + gathered.shape[2:], gathered.dtype)
    for p in range(count):
      out[host_rows(rows, p, count)] = gathered[p]
    return out[:rows]

  def _judge(self, args):
    from onpo_jax.models import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    self.rows_judged += args[0].shape[0]
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      if not self.offload:
        # numpy, so the caller's arrays on the policy's mesh can mix with it.
        return host_gather(self.oracle.preference_prob(*args))
      host = self.oracle.state
      self.oracle.state = roles.to_memory(host, "device")
      try:
        return host_gather(self.oracle.preference_prob(*args))
      finally:
        self.oracle.state = host

  def pop_counts(self) -> dict[str, float]:
    """The oracle's counts since the last call, over all processes; resets them.

    Returns:
      The oracle's `pop_truncation_counts()` summed over processes (none for an
      oracle without them), and `rows_judged_per_process`: the most rows one
      process judged (the whole batch on one process, about 1/`process_count`
      of it on several). Every process must call it (it gathers).
    """
    pop = getattr(self.oracle, "pop_truncation_counts", None)
    counts = {k: float(v) for k, v in (pop() if pop else {}).items()}
    local = np.asarray([self.rows_judged] + list(counts.values()), np.float64)
    self.rows_judged = 0
    if jax.process_count() > 1:
      every = np.asarray(multihost_utils.process_allgather(local))  # [processes, 1 + counts]
      local = np.concatenate([every[:, :1].max(0), every[:, 1:].sum(0)])
    return dict(zip(counts, local[1:].tolist()), rows_judged_per_process=float(local[0]))


def host_rows(rows: int, process_index: int, process_count: int) -> np.ndarray:
  """Row indices one process judges: its `data.host_shard` of 0..rows padded to a multiple.

  Indices >= `rows` are padding, so every process has ceil(rows / count) of
  them; the caller judges row 0 in their place and drops their results.
  """
  from onpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  padded = np.arange(-(-rows // process_count) * process_count)
  return data_lib.host_shard(padded, process_index, process_count)


class LLMBackend:
  """`onpo_jax.selfplay.backend.Backend` for Hugging Face checkpoints and judges.

  Args:
    graphdef: the policy's graphdef.
    model_config: its `DecoderConfig`.
    oracle: any oracle with `preference_prob` (e.g. a `ScopedOracle` judge).
    config: the llm config (`configs/llm_common.py`).
    eos_ids: token ids that end a response.
    pad_id: id written after EOS.
    adapted: how a trained tree becomes the decoder's parameters
      (`onpo_jax.llm.adapted`: full weights, the default, or LoRA adapters over
      a frozen base, with `None` standing for π_ref = the base).
  """

  def __init__(self, graphdef, model_config, oracle, config, *, eos_ids, pad_id: int,
               adapted=None):
    sp, sc = config.selfplay, config.sampling
    self.graphdef, self.oracle = graphdef, oracle
    self.adapted = adapted or adapted_lib.FullParams()
    # The engine passes it to every jitted train step as an argument.
    self.frozen = self.adapted.frozen
    self.eos_ids, self.pad_id = tuple(int(e) for e in eos_ids), int(pad_id)
    self.reduction = sp.logp_reduction
    self.tournament_mode = sp.get("tournament_mode", "deterministic")
    self.chunk_size = config.policy.logprob_chunk_size or None
    self.response_len = int(sc.max_new_tokens)
    self.micro = int(sp.minibatch_size)
    self.ref_placement = roles.role_placements(config)[roles.Role.REF]
    sampling = llm_config.sampling_config(
        config, max_new_tokens=int(sc.max_new_tokens), temperature=float(sp.temperature),
        top_p=float(sc.top_p), eos_ids=self.eos_ids, pad_id=self.pad_id)
    self.sampler = MicroBatchedSampler(
        sampler_lib.Sampler(graphdef, sampling, model_config=model_config),
        sc.micro_batch_size, self.eos_ids)
    self.mixture_sampler = MicroBatchedSampler(
        sampler_lib.MixtureSampler(graphdef, graphdef, sampling, policy_model_config=model_config,
                                   ref_model_config=model_config),
        sc.micro_batch_size, self.eos_ids, offloaded=(1,) if self.ref_placement.offload else ())
    self._seq_logps = jax.jit(self.sequence_logprobs)

  def sample(self, params, prompt_tokens, prompt_mask, key) -> Samples:
    return self.sampler(self.adapted.materialize(params), prompt_tokens, prompt_mask, key)

  def sample_mixture(self, params, ref_params, prompt_tokens, prompt_mask, key,
                     alpha: float) -> Samples:
    return self.mixture_sampler(self.adapted.materialize(params),
                                self.adapted.materialize(ref_params), prompt_tokens,
                                prompt_mask, key, alpha)

  def build_examples(self, data, pairing, prompt_tokens, prompt_mask, responses, response_mask,
                     opponents, opponent_mask, key):
    # Eager: the judge decodes the sampled tokens to text on the host.
    return examples_lib.build_examples(data, pairing, prompt_tokens, prompt_mask, responses,
                                       response_mask, opponents, opponent_mask, key,
                                       oracle=self.oracle, pad_id=self.pad_id,
                                       tournament_mode=self.tournament_mode)

  def sequence_logprobs(self, params, tokens, attn, resp, frozen=None):
    model = nnx.merge(self.graphdef, self.adapted.state(params, frozen))
    # Rows are [prompt bucket | max_new_tokens response slots]
    # (selfplay.examples.full_sequences): the prompt's positions need no logits.
    first = max(tokens.shape[1] - self.response_len, 1)
    token_lp = model.token_logprobs(tokens, positions_from_mask(attn), attn,
                                    chunk_size=self.chunk_size, first_target=first)
    lp = logprobs.reduce_logprobs(token_lp, resp, self.reduction)
    # A response token left of the response slots would count as 0: a NaN
    # instead stops the run at the loss check rather than training on it.
    return jnp.where(jnp.any(resp[:, :first], axis=1), jnp.nan, lp)

  def anchor_logprobs(self, params, batch):
    """Anchor log-probs in micro-batches of `selfplay.minibatch_size` examples."""
    if params is not None:  # None: the base of LoRA adapters, never offloaded
      params = roles.fetch(params, self.ref_placement)
    mb = self.micro

    def lp(tok, attn, resp):
      return jnp.concatenate([self._seq_logps(params, tok[i:i + mb], attn[i:i + mb],
                                              resp[i:i + mb], self.frozen)
                              for i in range(0, tok.shape[0], mb)])

    if isinstance(batch, PairBatch):
      return PairLogps(lp(batch.tok_w, batch.attn_w, batch.resp_w),
                       lp(batch.tok_l, batch.attn_l, batch.resp_l))
    return lp(batch.tok, batch.attn, batch.resp)
