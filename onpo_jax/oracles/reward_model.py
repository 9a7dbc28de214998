"""A Bradley–Terry reward model as an oracle: P(a ≻ b | x) = σ(r(x, a) − r(x, b)).

`RewardModel` is our NNX `Decoder` with a linear score head, as HF
`*ForSequenceClassification` (`score.weight [num_labels, hidden]`, the reward
read at the last non-pad token), imported by `load_reward_model` through
`onpo_jax.models.hf_io`. `RewardModelOracle` implements `onpo_jax.oracles.Oracle`
either on the policy's own tokens (a reward model sharing the policy's
vocabulary) or through the text path of `onpo_jax.oracles.text`, and is exactly
symmetric (P(a≻b) + P(b≻a) = 1, `bt_preference`). It is one kind of oracle among
several, not the interface: nothing reduces a general preference to a reward
(docs/baselines.md §7).
"""

from __future__ import annotations

import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from onpo_jax import oracles as oracle_lib
from onpo_jax.models import hf_io
from onpo_jax.models import sharding as model_sharding
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.decoder import positions_from_mask
from onpo_jax.oracles import text as text_lib

_REWARD_FIELDS = ("context", "response")
_SCORE = "score.weight"


def last_real_index(mask: jax.Array) -> jax.Array:
  """[B, L] bool -> [B] index of each row's last True (the last non-pad token)."""
  if mask.ndim != 2:
    raise ValueError(f"mask must be [B, L]; got shape {mask.shape}")
  return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def bt_preference(r_a: jax.Array, r_b: jax.Array) -> jax.Array:
  """Bradley–Terry P(a ≻ b) = σ(r_a − r_b), exactly symmetric under a <-> b.

  Args:
    r_a, r_b: [N] rewards.

  Returns:
    [N]; `bt_preference(r_a, r_b) + bt_preference(r_b, r_a) == 1` exactly,
    because r_a − r_b == −(r_b − r_a) in floating point.
  """
  if r_a.shape != r_b.shape or r_a.ndim != 1:
    raise ValueError(f"r_a and r_b must both be [N]; got {r_a.shape} and {r_b.shape}")
  return oracle_lib.symmetric_sigmoid(r_a - r_b)


class RewardModel(nnx.Module):
  """Decoder + linear score head, as HF `*ForSequenceClassification`.

  The reward is `score(h_last)[label]` with h_last the final-norm hidden state of
  the last non-pad token (HF pools the same token). The decoder is built with
  tied embeddings because a reward model never unembeds: no lm_head is allocated.
  """

  def __init__(self, config: DecoderConfig, *, num_labels: int = 1, rngs: nnx.Rngs):
    if num_labels < 1:
      raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    self.decoder = Decoder(config.replace(tie_word_embeddings=True), rngs=rngs)
    self.score = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), (config.hidden_size, num_labels), jnp.float32)
         ).astype(config.jnp_param_dtype), out_sharding=("embed", None), eager_sharding=False)

  def __call__(self, tokens: jax.Array, mask: jax.Array, label: int = 0) -> jax.Array:
    """[B, L] tokens and bool mask (any padding) -> [B] float32 rewards."""
    mask = mask.astype(bool)
    h, _ = self.decoder.hidden_states(tokens, positions_from_mask(mask), mask)
    last = jnp.take_along_axis(h, last_real_index(mask)[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,dk->bk", last, self.score[...].astype(last.dtype),
                      preferred_element_type=jnp.float32)[:, label]


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, mask)


class RewardModelOracle:
  """BT oracle from a `RewardModel`: P(a ≻ b | x) = σ(r(x, a) − r(x, b)).

  With `tokenizer=None` the reward model shares the policy's vocabulary and reads
  the concatenated tokens [left-padded prompt | right-padded response]
  directly; otherwise the policy's tokens are decoded and the conversation
  (user: context, assistant: response) is put in the reward model's chat
  template, or in `template` (fields `{context}`, `{response}`) when given, and
  inputs longer than `max_length` lose their first tokens.

  Truncation counters (text path): `num_truncated` counts reward-model inputs cut
  to `max_length`, `num_truncated_comparisons` the comparisons with at least one
  such input; `pop_truncation_counts()` reads and resets both.

  Attributes:
    vocab_size: the policy vocabulary this oracle reads.
  """

  def __init__(self, model: RewardModel, tokenizer=None, policy_tokenizer=None, *,
               template: str | None = None, max_length: int = 4096,
               micro_batch_size: int = 8, pad_multiple: int = 64, context_fn=None):
    """Args:
      model: the reward model.
      tokenizer: its transformers tokenizer (text path), or None (token path).
      policy_tokenizer: decodes the policy's tokens (text path only).
      template: text with `{context}` and `{response}`, instead of the chat
        template.
      max_length: longest input in tokens (text path).
      micro_batch_size: rows per forward pass.
      pad_multiple: input lengths are rounded up to a multiple of this.
      context_fn: see `text.decode_contexts`.
    """
    if (tokenizer is None) != (policy_tokenizer is None):
      raise ValueError("give both tokenizer and policy_tokenizer (text path) or neither "
                       "(token path)")
    if template is not None:
      text_lib.check_template(template, _REWARD_FIELDS)
    self.graphdef, self.state = nnx.split(model)
    self.tokenizer, self.policy_tokenizer, self.template = tokenizer, policy_tokenizer, template
    self.context_fn = context_fn
    self.max_length, self.micro_batch_size = max_length, micro_batch_size
    self.pad_multiple = pad_multiple
    self.vocab_size = (len(policy_tokenizer) if policy_tokenizer is not None
                       else model.decoder.config.vocab_size)
    self.num_truncated = 0
    self.num_truncated_comparisons = 0

  def pop_truncation_counts(self) -> dict[str, int]:
    """{"truncated_comparisons", "truncated_inputs"} since the last call; resets both."""
    out = {"truncated_comparisons": self.num_truncated_comparisons,
           "truncated_inputs": self.num_truncated}
    self.num_truncated = self.num_truncated_comparisons = 0
    return out

  def reward_text(self, context: str, response: str) -> str:
    """The exact text the reward model scores."""
    if self.template is not None:
      return self.template.format(context=context, response=response)
    msgs = [{"role": "user", "content": context}, {"role": "assistant", "content": response}]
    return text_lib.chat_or_plain(self.tokenizer, "", True, msgs, add_generation_prompt=False)

  def _rewards(self, prompt_tokens, prompt_mask, tokens, mask) -> tuple[jax.Array, np.ndarray]:
    fn = lambda t, m: _rewards(self.graphdef, self.state, t, m)
    if self.tokenizer is None:
      seq = np.concatenate([np.asarray(prompt_tokens), np.asarray(tokens)], axis=1).astype(np.int32)
      seq_mask = np.concatenate([np.asarray(prompt_mask, bool), np.asarray(mask, bool)], axis=1)
      truncated = np.zeros(seq.shape[0], bool)
    else:
      texts = [self.reward_text(c, r) for c, r in zip(
          text_lib.decode_contexts(self.policy_tokenizer, prompt_tokens, prompt_mask,
                                   self.context_fn),
          text_lib.decode_rows(self.policy_tokenizer, tokens, mask))]
      seq, seq_mask, truncated = text_lib.encode_left_padded(
          self.tokenizer, texts, max_length=self.max_length, pad_multiple=self.pad_multiple,
          add_special_tokens=self.template is not None)
    self.num_truncated += int(truncated.sum())
    return jnp.asarray(text_lib.micro_batches(fn, seq, seq_mask, self.micro_batch_size)), truncated

  def rewards(self, prompt_tokens, prompt_mask, tokens, mask) -> jax.Array:
    """[N] float32 rewards r(x, y)."""
    return self._rewards(prompt_tokens, prompt_mask, tokens, mask)[0]

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask
                      ) -> jax.Array:
    """P(a ≻ b | x) [N] float32; P(a≻b) + P(b≻a) == 1 exactly, P(a≻a) == ½."""
    text_lib.check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    ft, fm, st, sm, a_first, same = oracle_lib.canonical_order(
        jnp.asarray(a_tokens), jnp.asarray(a_mask, bool), jnp.asarray(b_tokens),
        jnp.asarray(b_mask, bool))
    n = ft.shape[0]
    # One batch for both responses: the same rows whichever order the caller used.
    r, truncated = self._rewards(np.concatenate([prompt_tokens, prompt_tokens]),
                                 np.concatenate([prompt_mask, prompt_mask]),
                                 np.concatenate([ft, st]), np.concatenate([fm, sm]))
    self.num_truncated_comparisons += int((truncated[:n] | truncated[n:]).sum())
    return text_lib.to_caller_order(bt_preference(r[:n], r[n:]), a_first, same)


def load_reward_model(path: str, *, mesh: jax.sharding.Mesh | None = None,
                      rules=None, **config_overrides) -> RewardModel:
  """Imports a local HF `*ForSequenceClassification` directory into a `RewardModel`.

  The decoder tensors have the causal-LM names and are read by
  `hf_io.load_hf_checkpoint` (one tensor at a time, each placed with its
  sharding when `mesh` is given); the head `score.weight [num_labels, hidden]`,
  stored transposed relative to ours, is read here the same way.

  Args:
    path: directory with config.json and safetensors weights.
    mesh: optional mesh to place parameters on (logical names -> `rules`).
    rules: (logical, mesh_axis) pairs; default `sharding.DEFAULT_RULES`.
    **config_overrides: DecoderConfig fields (e.g. dtype='bfloat16').

  Raises:
    KeyError / ValueError / FileNotFoundError: naming the directory and the
      tensor that is missing, mis-shaped or unused.
  """
  path = os.fspath(path)
  rules = rules or model_sharding.DEFAULT_RULES
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    raw = json.load(f)
  num_labels = len(raw["id2label"]) if "id2label" in raw else int(raw.get("num_labels", 1))
  files = hf_io.checkpoint_files(path)
  # Checked first: a causal-LM checkpoint given by mistake fails before any loading.
  if _SCORE not in files:
    raise KeyError(f"{path}: tensor {_SCORE!r} not found; expected a "
                   f"*ForSequenceClassification checkpoint")
  # A reward model never unembeds: tied embeddings allocate no lm_head, and a
  # stored lm_head is then ignored.
  decoder = hf_io.load_hf_checkpoint(path, mesh=mesh, rules=rules, extra_tensors=(_SCORE,),
                                     **{**config_overrides, "tie_word_embeddings": True})
  model = nnx.eval_shape(lambda: RewardModel(decoder.config, num_labels=num_labels,
                                             rngs=nnx.Rngs(params=0)))
  target = model.score.get_value()
  with safe_open(files[_SCORE], framework="numpy") as f:
    arr = f.get_tensor(_SCORE)
  if tuple(arr.shape) != tuple(target.shape)[::-1]:
    raise ValueError(f"{path}: tensor {_SCORE!r} has shape {tuple(arr.shape)}, expected "
                     f"{tuple(target.shape)[::-1]}")
  arr = np.ascontiguousarray(arr.T.astype(target.dtype))
  if mesh is not None:
    sharding = model_sharding.state_shardings(nnx.state(model), mesh, rules)["score"]
    placed = jax.device_put(arr, sharding.get_value())
  else:
    placed = jax.device_put(arr)
  model.decoder = decoder
  model.score = model.score.replace(placed)
  return model
