"""Model-based preference oracles: a pairwise LM judge and a BT reward model.

Both implement `onpo_jax.oracle.Oracle` (P(a ≻ b | x) with P(a≻b) + P(b≻a) = 1
exactly) on the policy's token batches.

* `PairwiseJudgeOracle` ("pair-pm" style; ONPO arXiv 2502.16852 §5 uses
  RLHFlow's pairwise preference model, INPO arXiv 2407.00617 §5 likewise): our
  NNX `Decoder` reads a template holding the context and responses A and B, and
  p(A | order) = softmax over the next-token logits of the "A" and "B" tokens at
  the last position. Both orders go through the model in one batch and

      P(a ≻ b | x) = ½ · ( p(A | x, a, b) + 1 − p(A | x, b, a) ),

  which cancels the judge's position bias (BASELINES.md, "Oracle contract").
* `RewardModelOracle`: a decoder with a scalar head (HF
  `*ForSequenceClassification`: `score.weight [num_labels, hidden]`, reward read
  at the last non-pad token), P(a ≻ b | x) = σ(r(x, a) − r(x, b)). One kind of
  oracle among several, not the interface (BASELINES.md convention 4).

Text path: policy tokens are decoded with the policy tokenizer, put in the
oracle's template, tokenised with the oracle's tokenizer, left-padded (length
rounded up to `pad_multiple` to bound recompiles) and run in micro-batches.

Exact symmetry: each pair is put in a canonical order (`oracle.canonical_order`)
before anything is computed, so the same sequences sit in the same batch rows
whichever order the caller used; the result is then mapped to the caller's order
with 1 − q, which is exact for q ∈ [½, 1] (Sterbenz), see
`order_averaged_preference`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import string
from typing import Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from onpo_jax import oracle as oracle_lib
from onpo_jax.models import hf_io
from onpo_jax.models import sharding as model_sharding
from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.decoder import positions_from_mask

# The prompt format of RLHFlow's pair-preference model; the judge answers with
# the label of the better response.
PAIR_PM_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"
_JUDGE_FIELDS = ("context", "response_a", "response_b")
_REWARD_FIELDS = ("context", "response")


# ------------------------------------------------------------------ pure math


def order_averaged_preference(choice_logits_fs: jax.Array, choice_logits_sf: jax.Array
                              ) -> jax.Array:
  """P(first ≻ second) from the judge's "A"/"B" logits in both orders.

  p_fs = softmax(choice_logits_fs)[0] is the judge's P("A") with `first` shown
  as A; p_sf the same with `second` shown as A. Then (BASELINES.md, "Oracle
  contract"; ONPO arXiv 2502.16852 §5)

      P(first ≻ second) = ½ (p_fs + 1 − p_sf) = ½ + d,   d = ½ (p_fs − p_sf),

  returned as ½ + |d| when d ≥ 0 and 1 − (½ + |d|) otherwise: ½ + |d| lies in
  [½, 1], so 1 − it is exact and swapping first/second (d -> −d, bit-exact)
  gives values that add up to 1 exactly.

  Args:
    choice_logits_fs: [N, 2] logits of ("A", "B") at the last position, order
      (first, second).
    choice_logits_sf: [N, 2] the same for order (second, first).

  Returns:
    [N] P(first ≻ second), dtype of the inputs.
  """
  if choice_logits_fs.ndim != 2 or choice_logits_fs.shape[-1] != 2:
    raise ValueError(f"choice_logits_fs must be [N, 2]; got shape {choice_logits_fs.shape}")
  if choice_logits_sf.shape != choice_logits_fs.shape:
    raise ValueError(f"choice_logits_sf must have shape {choice_logits_fs.shape}; "
                     f"got {choice_logits_sf.shape}")
  p_fs = jax.nn.softmax(choice_logits_fs, axis=-1)[:, 0]
  p_sf = jax.nn.softmax(choice_logits_sf, axis=-1)[:, 0]
  d = 0.5 * (p_fs - p_sf)
  hi = 0.5 + jnp.abs(d)
  return jnp.where(d >= 0, hi, 1.0 - hi)


def to_caller_order(q_first: jax.Array, a_first: jax.Array, same: jax.Array) -> jax.Array:
  """P(a ≻ b) from P(first ≻ second): q if a is first, else 1 − q; ½ if a == b."""
  if not q_first.shape == a_first.shape == same.shape:
    raise ValueError(f"q_first, a_first, same must share a shape; got {q_first.shape}, "
                     f"{a_first.shape}, {same.shape}")
  return jnp.where(same, jnp.full_like(q_first, 0.5), jnp.where(a_first, q_first, 1.0 - q_first))


def last_real_index(mask: jax.Array) -> jax.Array:
  """[B, L] bool -> [B] index of each row's last True (the last non-pad token)."""
  if mask.ndim != 2:
    raise ValueError(f"mask must be [B, L]; got shape {mask.shape}")
  return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)


# --------------------------------------------------------------- text helpers


def check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask) -> None:
  """Shapes of an oracle batch (module docstring); ValueError names the argument."""
  shape = lambda x: tuple(np.shape(x))
  if len(shape(prompt_tokens)) != 2 or shape(prompt_mask) != shape(prompt_tokens):
    raise ValueError(f"prompt_tokens and prompt_mask must both be [N, P]; got "
                     f"{shape(prompt_tokens)} and {shape(prompt_mask)}")
  n = shape(prompt_tokens)[0]
  for name, tok, mask in (("a", a_tokens, a_mask), ("b", b_tokens, b_mask)):
    if len(shape(tok)) != 2 or shape(tok)[0] != n or shape(mask) != shape(tok):
      raise ValueError(f"{name}_tokens and {name}_mask must both be [N={n}, R]; got "
                       f"{shape(tok)} and {shape(mask)}")
  if n == 0:
    raise ValueError("the batch is empty (N = 0)")


def check_template(template: str, fields: Sequence[str], name: str = "template") -> None:
  """Raises ValueError unless `template` uses exactly the `{field}`s given."""
  used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  if used != set(fields):
    raise ValueError(f"{name} must contain exactly the fields {sorted(fields)}; "
                     f"got {sorted(used)} in {template!r}")


def resolve_choice_token_ids(tokenizer, labels: Sequence[str] = ("A", "B")) -> tuple[int, int]:
  """Token ids of the judge's answer labels.

  Raises:
    ValueError: a label is not exactly one token of the judge tokenizer, or both
      labels map to the same token.
  """
  if len(labels) != 2:
    raise ValueError(f"labels must be two strings, got {labels!r}")
  ids = []
  for label in labels:
    toks = tokenizer.encode(label, add_special_tokens=False)
    if len(toks) != 1:
      raise ValueError(f"judge tokenizer encodes label {label!r} as {len(toks)} tokens {toks}; "
                       "the judge needs single-token labels")
    ids.append(int(toks[0]))
  if ids[0] == ids[1] or ids[0] == getattr(tokenizer, "unk_token_id", None):
    raise ValueError(f"labels {labels!r} map to token ids {ids}; expected two distinct known tokens")
  return ids[0], ids[1]


def decode_rows(tokenizer, tokens: np.ndarray, mask: np.ndarray,
                skip_special_tokens: bool = True) -> list[str]:
  """Decodes each row's real tokens (mask True)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  return [tokenizer.decode(t[m].tolist(), skip_special_tokens=skip_special_tokens)
          for t, m in zip(tokens, mask)]


def decode_contexts(tokenizer, prompt_tokens, prompt_mask, context_fn=None) -> list[str]:
  """The judge's `{context}` for each templated policy prompt.

  Without `context_fn`, the prompt decoded without special tokens: right for
  templates whose role markers are special tokens only. Otherwise the full
  decoded prompt (chat markup included) goes through `context_fn(text) -> str`,
  e.g. to rewrite Llama-3 headers as "user: ..." turns.
  """
  if context_fn is None:
    return decode_rows(tokenizer, prompt_tokens, prompt_mask)
  return [context_fn(t) for t in decode_rows(tokenizer, prompt_tokens, prompt_mask, False)]


def encode_left_padded(tokenizer, texts: Sequence[str], *, max_length: int, pad_multiple: int,
                       add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray, int]:
  """Tokenises and left-pads `texts`; keeps the last `max_length` tokens of longer ones.

  The end of a judge / reward input holds the question asked of the model, so
  the cut comes from the left.

  Returns:
    (tokens [M, L] int32, mask [M, L] bool, number truncated); L is the longest
    row rounded up to `pad_multiple`, at most `max_length`.
  """
  seqs = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
  n_trunc = sum(len(s) > max_length for s in seqs)
  if n_trunc:
    logging.warning("%d of %d oracle inputs exceed max_length=%d and lose their first tokens",
                    n_trunc, len(seqs), max_length)
  seqs = [s[-max_length:] for s in seqs]
  longest = max(len(s) for s in seqs)
  length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  tokens = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    tokens[i, length - len(s):] = s
    mask[i, length - len(s):] = True
  return tokens, mask, n_trunc


def _micro_batches(fn, tokens: np.ndarray, mask: np.ndarray, micro_batch_size: int) -> np.ndarray:
  """fn on row blocks of a fixed size (the last block padded by repeating row 0)."""
  m = tokens.shape[0]
  n_pad = -m % micro_batch_size
  # Repeated real rows, not empty ones: a fully masked row has no last token.
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], n_pad, 0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], n_pad, 0)])
  outs = [np.asarray(fn(jnp.asarray(tokens[i:i + micro_batch_size]),
                        jnp.asarray(mask[i:i + micro_batch_size])))
          for i in range(0, tokens.shape[0], micro_batch_size)]
  return np.concatenate(outs)[:m]


def _chat_or_plain(tokenizer, content: str, use_chat_template: bool,
                   messages: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
  if not use_chat_template:
    return content
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("use_chat_template=True but the oracle tokenizer has no chat_template")
  msgs = messages if messages is not None else [{"role": "user", "content": content}]
  return tokenizer.apply_chat_template(msgs, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------- LM judge


@functools.partial(jax.jit, static_argnums=0)
def _choice_logits(graphdef, state, tokens, mask, choice_ids):
  """[B, 2] logits of the choice tokens after the last column (left-padded rows)."""
  model = nnx.merge(graphdef, state)
  h, _ = model.hidden_states(tokens, positions_from_mask(mask), mask)
  return model.logits_from_hidden(h[:, -1])[:, choice_ids]


class PairwiseJudgeOracle:
  """Pairwise LM judge (see module docstring).

  Attributes:
    vocab_size: the policy vocabulary this oracle reads (len(policy_tokenizer)).
    choice_ids: judge token ids of the two labels.
    num_truncated: judge inputs cut to `max_length` so far.
  """

  def __init__(self, model: Decoder, judge_tokenizer, policy_tokenizer, *,
               template: str = PAIR_PM_TEMPLATE, use_chat_template: bool = True,
               labels: Sequence[str] = ("A", "B"), max_length: int = 4096,
               micro_batch_size: int = 8, pad_multiple: int = 64, context_fn=None):
    """Args:
      model: the judge decoder.
      judge_tokenizer: its transformers tokenizer.
      policy_tokenizer: decodes the policy's token batches.
      template: with `{context}`, `{response_a}`, `{response_b}`.
      use_chat_template: wrap the filled template as one user turn of the judge's
        chat template (add_generation_prompt=True); otherwise tokenise it as is,
        with the tokenizer's special tokens (BOS).
      labels: the judge's answer tokens for "A is better" and "B is better".
      max_length: longest judge input in tokens (longer ones lose their start).
      micro_batch_size: rows per forward pass.
      pad_multiple: input lengths are rounded up to a multiple of this.
      context_fn: see `decode_contexts`.
    """
    check_template(template, _JUDGE_FIELDS)
    for name, v in (("max_length", max_length), ("micro_batch_size", micro_batch_size),
                    ("pad_multiple", pad_multiple)):
      if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    self.graphdef, self.state = nnx.split(model)
    self.judge_tokenizer, self.policy_tokenizer = judge_tokenizer, policy_tokenizer
    self.template, self.use_chat_template = template, use_chat_template
    self.choice_ids = resolve_choice_token_ids(judge_tokenizer, labels)
    self.max_length, self.micro_batch_size, self.pad_multiple = max_length, micro_batch_size, pad_multiple
    self.vocab_size = len(policy_tokenizer)
    self.context_fn = context_fn
    self.num_truncated = 0

  def judge_text(self, context: str, response_a: str, response_b: str) -> str:
    """The exact text the judge reads for one ordered pair."""
    filled = self.template.format(context=context, response_a=response_a, response_b=response_b)
    return _chat_or_plain(self.judge_tokenizer, filled, self.use_chat_template)

  def choice_logits(self, texts: Sequence[str]) -> np.ndarray:
    """[M, 2] judge logits of the two labels after each text."""
    tokens, mask, n_trunc = encode_left_padded(
        self.judge_tokenizer, texts, max_length=self.max_length, pad_multiple=self.pad_multiple,
        add_special_tokens=not self.use_chat_template)
    self.num_truncated += n_trunc
    ids = jnp.asarray(self.choice_ids, jnp.int32)
    fn = lambda t, m: _choice_logits(self.graphdef, self.state, t, m, ids)
    return _micro_batches(fn, tokens, mask, self.micro_batch_size)

  def preference_prob_text(self, contexts: Sequence[str], responses_first: Sequence[str],
                           responses_second: Sequence[str]) -> jax.Array:
    """[N] P(first ≻ second | context) from texts, both orders in one batch."""
    if not len(contexts) == len(responses_first) == len(responses_second) > 0:
      raise ValueError(f"contexts, responses_first, responses_second must be equally long and "
                       f"non-empty; got {len(contexts)}, {len(responses_first)}, "
                       f"{len(responses_second)}")
    texts = ([self.judge_text(c, f, s) for c, f, s in zip(contexts, responses_first, responses_second)]
             + [self.judge_text(c, s, f) for c, f, s in zip(contexts, responses_first, responses_second)])
    logits = jnp.asarray(self.choice_logits(texts))
    n = len(contexts)
    return order_averaged_preference(logits[:n], logits[n:])

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask
                      ) -> jax.Array:
    """P(a ≻ b | x) [N] float32; P(a≻b) + P(b≻a) == 1 exactly, P(a≻a) == ½."""
    check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    ft, fm, st, sm, a_first, same = oracle_lib.canonical_order(
        jnp.asarray(a_tokens), jnp.asarray(a_mask, bool), jnp.asarray(b_tokens),
        jnp.asarray(b_mask, bool))
    contexts = decode_contexts(self.policy_tokenizer, prompt_tokens, prompt_mask, self.context_fn)
    q = self.preference_prob_text(contexts, decode_rows(self.policy_tokenizer, ft, fm),
                                  decode_rows(self.policy_tokenizer, st, sm))
    return to_caller_order(q.astype(jnp.float32), a_first, same)


# ------------------------------------------------------------- reward model


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


class RewardModelOracle:
  """BT oracle from a `RewardModel`: P(a ≻ b | x) = σ(r(x, a) − r(x, b)).

  With `tokenizer=None` the reward model shares the policy's vocabulary and reads
  the concatenated tokens [left-padded prompt | right-padded response]
  directly; otherwise the text path of the module docstring is used, with the
  conversation (user: context, assistant: response) in the reward model's chat
  template, or `template` (fields `{context}`, `{response}`) when given.
  """

  def __init__(self, model: RewardModel, tokenizer=None, policy_tokenizer=None, *,
               template: str | None = None, max_length: int = 4096,
               micro_batch_size: int = 8, pad_multiple: int = 64, context_fn=None):
    if (tokenizer is None) != (policy_tokenizer is None):
      raise ValueError("give both tokenizer and policy_tokenizer (text path) or neither "
                       "(token path)")
    if template is not None:
      check_template(template, _REWARD_FIELDS)
    self.graphdef, self.state = nnx.split(model)
    self.tokenizer, self.policy_tokenizer, self.template = tokenizer, policy_tokenizer, template
    self.context_fn = context_fn
    self.max_length, self.micro_batch_size, self.pad_multiple = max_length, micro_batch_size, pad_multiple
    self.vocab_size = (len(policy_tokenizer) if policy_tokenizer is not None
                       else model.decoder.config.vocab_size)
    self.num_truncated = 0

  def reward_text(self, context: str, response: str) -> str:
    """The exact text the reward model scores."""
    if self.template is not None:
      return self.template.format(context=context, response=response)
    msgs = [{"role": "user", "content": context}, {"role": "assistant", "content": response}]
    return _chat_or_plain(self.tokenizer, "", True, msgs, add_generation_prompt=False)

  def rewards(self, prompt_tokens, prompt_mask, tokens, mask) -> jax.Array:
    """[N] float32 rewards r(x, y)."""
    fn = lambda t, m: _rewards(self.graphdef, self.state, t, m)
    if self.tokenizer is None:
      seq = np.concatenate([np.asarray(prompt_tokens), np.asarray(tokens)], axis=1).astype(np.int32)
      seq_mask = np.concatenate([np.asarray(prompt_mask, bool), np.asarray(mask, bool)], axis=1)
    else:
      texts = [self.reward_text(c, r) for c, r in zip(
          decode_contexts(self.policy_tokenizer, prompt_tokens, prompt_mask, self.context_fn),
          decode_rows(self.policy_tokenizer, tokens, mask))]
      seq, seq_mask, n_trunc = encode_left_padded(
          self.tokenizer, texts, max_length=self.max_length, pad_multiple=self.pad_multiple,
          add_special_tokens=self.template is not None)
      self.num_truncated += n_trunc
    return jnp.asarray(_micro_batches(fn, seq, seq_mask, self.micro_batch_size))

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask
                      ) -> jax.Array:
    """P(a ≻ b | x) [N] float32; P(a≻b) + P(b≻a) == 1 exactly, P(a≻a) == ½."""
    check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    ft, fm, st, sm, a_first, same = oracle_lib.canonical_order(
        jnp.asarray(a_tokens), jnp.asarray(a_mask, bool), jnp.asarray(b_tokens),
        jnp.asarray(b_mask, bool))
    n = ft.shape[0]
    # One batch for both responses: the same rows whichever order the caller used.
    r = self.rewards(np.concatenate([prompt_tokens, prompt_tokens]),
                     np.concatenate([prompt_mask, prompt_mask]),
                     np.concatenate([ft, st]), np.concatenate([fm, sm]))
    return to_caller_order(bt_preference(r[:n], r[n:]), a_first, same)


# ------------------------------------------------------------------ HF import


def _path_key(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def load_reward_model(path: str, *, mesh: jax.sharding.Mesh | None = None,
                      rules=None, **config_overrides) -> RewardModel:
  """Imports a local HF `*ForSequenceClassification` directory into a `RewardModel`.

  The decoder tensors have the causal-LM names (`model.*`, mapped by
  `hf_io.tensor_specs`); the head is `score.weight [num_labels, hidden]`, stored
  transposed. Tensors are read one at a time and placed with their sharding
  when `mesh` is given.

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
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    raw = json.load(f)
  num_labels = len(raw["id2label"]) if "id2label" in raw else int(raw.get("num_labels", 1))
  config = DecoderConfig.from_hf(path, **config_overrides)
  # (hf name, HF -> ours, expected HF shape from our shape)
  specs = {("decoder",) + k: (v.hf_name, v.to_ours, v.hf_shape) for k, v in
           hf_io.tensor_specs(config.replace(tie_word_embeddings=True)).items()}
  specs[("score",)] = ("score.weight", lambda a, s: a.T, lambda s: tuple(s)[::-1])
  files = hf_io.checkpoint_files(path)
  # An lm_head is harmless (unused); anything else means a different architecture.
  known = {v[0] for v in specs.values()} | {"lm_head.weight"}
  unexpected = sorted(n for n in files if n not in known and not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise ValueError(f"{path}: tensors not used by a {config.model_type} reward model: "
                     f"{unexpected[:10]}")
  abstract = nnx.eval_shape(lambda: RewardModel(config, num_labels=num_labels,
                                                rngs=nnx.Rngs(params=0)))
  graphdef, abstract_state = nnx.split(abstract)
  is_var = lambda x: isinstance(x, nnx.Variable)
  shard_of = {}
  if mesh is not None:
    shardings = model_sharding.state_shardings(abstract_state, mesh,
                                               rules or model_sharding.DEFAULT_RULES)
    jax.tree_util.tree_map_with_path(
        lambda p, v: shard_of.__setitem__(_path_key(p), v.get_value()), shardings, is_leaf=is_var)

  with contextlib.ExitStack() as stack:
    handles = {}

    def load(p, var):
      key = _path_key(p)
      hf_name, to_ours, hf_shape = specs[key]
      if hf_name not in files:
        raise KeyError(f"{path}: tensor {hf_name!r} not found")
      if files[hf_name] not in handles:
        handles[files[hf_name]] = stack.enter_context(safe_open(files[hf_name], framework="numpy"))
      arr = handles[files[hf_name]].get_tensor(hf_name)
      target = var.get_value()
      if tuple(arr.shape) != hf_shape(target.shape):
        raise ValueError(f"{path}: tensor {hf_name!r} has shape {tuple(arr.shape)}, expected "
                         f"{hf_shape(target.shape)}")
      arr = np.ascontiguousarray(to_ours(arr, target.shape).astype(target.dtype))
      return var.replace(jax.device_put(arr, shard_of[key]) if mesh is not None
                         else jax.device_put(arr))

    state = jax.tree_util.tree_map_with_path(load, abstract_state, is_leaf=is_var)
  return nnx.merge(graphdef, state)


def load_pairwise_judge(path: str, policy_tokenizer, *, tokenizer_path: str | None = None,
                        mesh: jax.sharding.Mesh | None = None, config_overrides=None,
                        **judge_kwargs) -> PairwiseJudgeOracle:
  """A `PairwiseJudgeOracle` from a local HF causal-LM directory (weights + tokenizer).

  Args:
    path: checkpoint directory (`hf_io.load_hf_checkpoint`).
    policy_tokenizer: decodes the policy's tokens.
    tokenizer_path: judge tokenizer directory; defaults to `path`.
    mesh: optional mesh for the judge's parameters.
    config_overrides: DecoderConfig fields, e.g. {'dtype': 'bfloat16'}.
    **judge_kwargs: `PairwiseJudgeOracle` options (template, labels, ...).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  model = hf_io.load_hf_checkpoint(path, mesh=mesh, **(config_overrides or {}))
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_path or path)
  return PairwiseJudgeOracle(model, tok, policy_tokenizer, **judge_kwargs)
