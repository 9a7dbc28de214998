"""The pairwise LM judge ("pair-pm"), the paper's oracle, on our NNX `Decoder`.

ONPO (arXiv 2502.16852 §5) and INPO (arXiv 2407.00617 §5) label pairs with
RLHFlow's pairwise preference model: a causal LM reads the conversation and two
responses shown as A and B, and p(A | order) is the softmax over its next-token
logits of the "A" and "B" tokens at the last position. Both orders go through
the model in one batch and P(a ≻ b | x) = ½ (p(A | x, a, b) + 1 − p(A | x, b, a)),
which cancels the judge's position bias (docs/baselines.md §7, "Oracle
contract"). The input format is a `JudgeFormat`; `JUDGE_PRESETS` names the
published one (`"rlhflow_pair_pm"`, the default) and a generic one (`"plain"`).
The judge reads the conversation behind each prompt, not the policy's chat
template (`text.Conversations`), and an input longer than `max_length` is cut
the same way in both orders (`JudgeInputs.fit`), so the order average compares
like with like; P(a ≻ b) + P(b ≻ a) == 1 exactly (`order_averaged_preference`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from onpo_jax import oracles as oracle_lib
from onpo_jax.models import loading
from onpo_jax.models import tokenizer as tok_lib
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.decoder import positions_from_mask
from onpo_jax.oracles import text as text_lib

# The prompt of RLHFlow's pair-preference model; the judge answers with the
# label of the better response.
PAIR_PM_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"
_JUDGE_FIELDS = ("context", "response_a", "response_b")
# An instruct model asked to compare two answers to a request (self_judge: the
# policy's own SFT model as the judge).
SELF_JUDGE_TEMPLATE = (
    "Which response follows the request better? Check every instruction the request "
    "gives.\n\nRequest: {context}\n\nResponse A: {response_a}\n\nResponse B: "
    "{response_b}\n\nAnswer with one letter, A or B.")


# ------------------------------------------------------------------ formats


def render_rlhflow_context(messages: Sequence[tuple[str, str]]) -> str:
  """The conversation as RLHFlow's pair-pm was trained to read it.

  The model card and the authors' annotation scripts render the conversation
  with the Jinja chat template

      "\\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\\n\\n<turn> user\\n
      {{ message['content'] }}{% else %}\\n\\n<turn> assistant\\n {{ message['content']
      }}{% endif %}{% endfor %}\\n\\n\\n"

  through `transformers`' `apply_chat_template`, which compiles templates with
  `trim_blocks` (the newline right after a block tag is dropped) and Jinja's
  default of dropping the template's final newline. What the judge reads is
  therefore "\\n", then "\\n<turn> user\\n {content}" or "\\n<turn> assistant\\n
  {content}" per message, then "\\n" (also what their published training
  examples show: "[CONTEXT] \\n\\n<turn> user\\n {question}\\n [RESPONSE A] ...").
  The template alternates the two markers by position; in the alternating
  user/assistant conversations the authors train and label on (their data
  preparation drops any other) that is the role, which is what is used here, and
  a system message, which the format has no marker for, is shown as a user turn.

  Args:
    messages: ((role, content), ...).

  Returns:
    The `{context}` text.
  """
  turns = "".join(f"\n<turn> {'assistant' if role == 'assistant' else 'user'}\n {content}"
                  for role, content in messages)
  return f"\n{turns}\n"


def render_plain_context(messages: Sequence[tuple[str, str]]) -> str:
  """A single message as its content; several as "role: content" lines."""
  if len(messages) == 1:
    return messages[0][1]
  return "\n".join(f"{role}: {content}" for role, content in messages)


@dataclasses.dataclass(frozen=True)
class JudgeFormat:
  """How a pairwise judge's input is rendered and tokenised.

  Attributes:
    template: text with the fields `{context}`, `{response_a}`, `{response_b}`.
    render_context: ((role, content), ...) -> the `{context}` text.
    use_chat_template: send the filled template as one user message through the
      judge tokenizer's chat template and tokenise the result without adding
      special tokens; otherwise tokenise the filled template as is, with the
      tokenizer's special tokens (e.g. BOS).
    add_generation_prompt: passed to the chat template.
    strip_bos_text: remove the text of the judge tokenizer's BOS token from the
      rendered chat string before tokenising.
    labels: the judge's answer tokens for "A is better" and "B is better".
  """

  template: str = PAIR_PM_TEMPLATE
  render_context: Callable[[Sequence[tuple[str, str]]], str] = render_rlhflow_context
  use_chat_template: bool = True
  add_generation_prompt: bool = False
  strip_bos_text: bool = True
  labels: tuple[str, str] = ("A", "B")


JUDGE_PRESETS = {
    # RLHFlow/pair-preference-model-LLaMA3-8B as its model card and the authors'
    # scripts call it: the filled template is the content of one user message,
    # rendered with the judge's chat template without a generation prompt,
    # every occurrence of the BOS text removed (`str.replace`), then tokenised
    # without special tokens.
    "rlhflow_pair_pm": JudgeFormat(),
    # The same template around the conversation's own text, asked as a user
    # turn followed by the assistant header, BOS kept: for judges without a
    # published format.
    "plain": JudgeFormat(render_context=render_plain_context, add_generation_prompt=True,
                         strip_bos_text=False),
    # An instruct model judging with a question in its own chat template, its
    # answer read at the start of the assistant turn (e.g. SmolLM2-Instruct
    # judging its own samples).
    "self_judge": JudgeFormat(template=SELF_JUDGE_TEMPLATE, render_context=render_plain_context,
                              add_generation_prompt=True, strip_bos_text=False),
}


def resolve_format(preset: str | JudgeFormat = "rlhflow_pair_pm", **overrides) -> JudgeFormat:
  """A `JudgeFormat` from a preset name (or a format) and field overrides (None = keep)."""
  if isinstance(preset, str):
    if preset not in JUDGE_PRESETS:
      raise ValueError(f"preset must be one of {sorted(JUDGE_PRESETS)} or a JudgeFormat; "
                       f"got {preset!r}")
    preset = JUDGE_PRESETS[preset]
  fmt = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
  text_lib.check_template(fmt.template, _JUDGE_FIELDS)
  return dataclasses.replace(fmt, labels=tuple(fmt.labels))


# ------------------------------------------------------------------ pure math


def order_averaged_preference(choice_logits_fs: jax.Array, choice_logits_sf: jax.Array
                              ) -> jax.Array:
  """P(first ≻ second) from the judge's "A"/"B" logits in both orders.

  p_fs = softmax(choice_logits_fs)[0] is the judge's P("A") with `first` shown
  as A; p_sf the same with `second` shown as A. Then (docs/baselines.md §7;
  ONPO arXiv 2502.16852 §5)

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
    raise ValueError(f"labels {labels!r} map to token ids {ids}; "
                     "expected two distinct known tokens")
  return ids[0], ids[1]


def _common_cap(len_a: int, len_b: int, room: int) -> int:
  """Largest R with min(len_a, R) + min(len_b, R) <= room (R >= 0); symmetric in a, b."""
  if room <= 0:
    return 0
  if len_a + len_b <= room:
    return max(len_a, len_b)
  short = min(len_a, len_b)
  # The shorter response is kept whole when it takes at most half the room.
  return room - short if 2 * short <= room else room // 2


def allocate_tokens(context_len: int, first_len: int, second_len: int, budget: int
                    ) -> tuple[int, int]:
  """How much of a too-long comparison to keep: (context tokens, response cap).

  Both responses are cut to the same cap R (each keeps its first min(len, R)
  tokens), the largest for which the whole context still fits; R never goes
  below a quarter of the budget, so a long conversation cannot squeeze the
  responses out. The context keeps its last tokens in what is left.

  Args:
    context_len, first_len, second_len: token counts of the three pieces.
    budget: tokens available for the three pieces together.

  Returns:
    (context tokens kept, response cap).
  """
  if budget <= 0:
    return 0, 0
  cap = max(_common_cap(first_len, second_len, budget - context_len), budget // 4)
  used = min(first_len, cap) + min(second_len, cap)
  return min(context_len, max(budget - used, 0)), cap


# ------------------------------------------------------------------ inputs


class JudgeInputs:
  """Renders, fits to `max_length` and tokenises the judge's inputs (module docstring).

  Attributes:
    tokenizer: the judge tokenizer.
    format: the `JudgeFormat`.
    max_length: longest judge input, in tokens.
  """

  def __init__(self, tokenizer, judge_format: JudgeFormat, max_length: int):
    self.tokenizer, self.format, self.max_length = tokenizer, judge_format, int(max_length)
    if judge_format.use_chat_template and not getattr(tokenizer, "chat_template", None):
      raise ValueError("use_chat_template=True but the judge tokenizer has no chat_template")

  def text(self, context: str, response_a: str, response_b: str) -> str:
    """The exact text the judge reads for one ordered pair (before any cut)."""
    fmt = self.format
    filled = fmt.template.format(context=context, response_a=response_a, response_b=response_b)
    if not fmt.use_chat_template:
      return filled
    out = text_lib.chat_or_plain(self.tokenizer, filled, True,
                                 add_generation_prompt=fmt.add_generation_prompt)
    bos = getattr(self.tokenizer, "bos_token", None)
    return out.replace(bos, "") if fmt.strip_bos_text and bos else out

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of full judge texts (`text`)."""
    if not texts:
      return []
    return [list(s) for s in self.tokenizer(
        list(texts), add_special_tokens=not self.format.use_chat_template)["input_ids"]]

  def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(s) for s in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def _decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False) if len(ids) else ""

  def fit_one(self, context: str, first: str, second: str
              ) -> tuple[list[int], list[int], tuple[str, str, str]]:
    """Token ids of both orders of one comparison, cut to `max_length` alike.

    Both responses are cut from their end to the same cap and the context from
    its start (`allocate_tokens`), once for the comparison, and both orders are
    rendered from the same three pieces: they show the same response texts. The
    template's own tokens are measured as the full length minus the pieces'
    lengths; tokens can merge across the pieces' boundaries, so the cut is
    re-measured and tightened until both orders fit. A template longer than
    `max_length` by itself leaves only the last `max_length` tokens.

    Returns:
      (ids with `first` shown as A, ids with `second` shown as A, the kept
      (context, first, second) texts).
    """
    length = self.max_length
    ids_fs, ids_sf = self.encode([self.text(context, first, second),
                                  self.text(context, second, first)])
    kept = (context, first, second)
    if max(len(ids_fs), len(ids_sf)) <= length:
      return ids_fs, ids_sf, kept
    c, f, s = self._pieces(kept)
    budget = length - (max(len(ids_fs), len(ids_sf)) - len(c) - len(f) - len(s))
    while True:
      n_ctx, cap = allocate_tokens(len(c), len(f), len(s), budget)
      # A cut response loses trailing whitespace: a chat template that trims the
      # message would drop it from the response shown second only.
      kept = (context if n_ctx >= len(c) else self._decode(c[len(c) - n_ctx:]),
              first if cap >= len(f) else self._decode(f[:cap]).rstrip(),
              second if cap >= len(s) else self._decode(s[:cap]).rstrip())
      ids_fs, ids_sf = self.encode([self.text(kept[0], kept[1], kept[2]),
                                    self.text(kept[0], kept[2], kept[1])])
      excess = max(len(ids_fs), len(ids_sf)) - length
      if excess <= 0:
        return ids_fs, ids_sf, kept
      if n_ctx == 0 and cap == 0:
        return ids_fs[-length:], ids_sf[-length:], ("", "", "")
      budget = min(budget, n_ctx + min(len(f), cap) + min(len(s), cap)) - excess

  def fit(self, contexts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
          ) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """`fit_one` over a batch, tokenising the inputs that fit in one call.

    Returns:
      (ids with firsts shown as A [N lists], ids with seconds shown as A,
      truncated [N] bool).
    """
    n = len(contexts)
    ids = self.encode([self.text(c, f, s) for c, f, s in zip(contexts, firsts, seconds)]
                      + [self.text(c, s, f) for c, f, s in zip(contexts, firsts, seconds)])
    fs, sf = ids[:n], ids[n:]
    truncated = np.zeros(n, bool)
    for i in range(n):
      if max(len(fs[i]), len(sf[i])) > self.max_length:
        fs[i], sf[i], _ = self.fit_one(contexts[i], firsts[i], seconds[i])
        truncated[i] = True
    return fs, sf, truncated


# ----------------------------------------------------------------- LM judge


@functools.partial(jax.jit, static_argnums=0)
def _choice_logits(graphdef, state, tokens, mask, choice_ids):
  """[B, 2] logits of the choice tokens after the last column (left-padded rows)."""
  model = nnx.merge(graphdef, state)
  h, _ = model.hidden_states(tokens, positions_from_mask(mask), mask)
  return model.logits_from_hidden(h[:, -1])[:, choice_ids]


class PairwiseJudgeOracle:
  """Pairwise LM judge (module docstring); an `onpo_jax.oracles.Oracle`.

  Truncation counters: `num_truncated_comparisons` counts comparisons whose input
  was cut to `max_length` (`JudgeInputs.fit_one`) and `num_truncated` the judge
  inputs that were cut (two per such comparison, one per order). Both only grow;
  read them once per round with `pop_truncation_counts()`, which also resets them.

  Attributes:
    vocab_size: the policy vocabulary this oracle reads (len(policy_tokenizer)).
    choice_ids: judge token ids of the two labels.
    format: the `JudgeFormat` in use.
    inputs: the `JudgeInputs` that render and fit the judge's inputs.
    conversations: the `text.Conversations` giving each prompt's messages.
  """

  def __init__(self, model: Decoder, judge_tokenizer, policy_tokenizer, *,
               preset: str | JudgeFormat = "rlhflow_pair_pm", template: str | None = None,
               use_chat_template: bool | None = None, labels: Sequence[str] | None = None,
               max_length: int = 4096, micro_batch_size: int = 8, pad_multiple: int = 64,
               context_fn: Callable[[str], str] | None = None):
    """Args:
      model: the judge decoder.
      judge_tokenizer: its transformers tokenizer.
      policy_tokenizer: decodes the policy's token batches.
      preset: a name in `JUDGE_PRESETS` or a `JudgeFormat`.
      template, use_chat_template, labels: override the preset's field (None
        keeps it).
      max_length: longest judge input in tokens (`JudgeInputs.fit_one`).
      micro_batch_size: rows per forward pass.
      pad_multiple: input lengths are rounded up to a multiple of this.
      context_fn: when given, the `{context}` is `context_fn(decoded prompt with
        its chat markup)` (`text.decode_contexts`) instead of the format's
        rendering of the prompt's conversation.
    """
    fmt = resolve_format(preset, template=template, use_chat_template=use_chat_template,
                         labels=None if labels is None else tuple(labels))
    for name, v in (("max_length", max_length), ("micro_batch_size", micro_batch_size),
                    ("pad_multiple", pad_multiple)):
      if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    self.graphdef, self.state = nnx.split(model)
    self.judge_tokenizer, self.policy_tokenizer = judge_tokenizer, policy_tokenizer
    self.format = fmt
    self.choice_ids = resolve_choice_token_ids(judge_tokenizer, fmt.labels)
    self.inputs = JudgeInputs(judge_tokenizer, fmt, max_length)
    self.max_length, self.micro_batch_size = max_length, micro_batch_size
    self.pad_multiple = pad_multiple
    self.vocab_size = len(policy_tokenizer)
    self.context_fn = context_fn
    self.conversations = text_lib.Conversations(policy_tokenizer)
    self.num_truncated = 0
    self.num_truncated_comparisons = 0

  def register_conversations(self, prompt_tokens: Sequence, messages: Sequence) -> None:
    """Gives the judge each prompt's messages (`text.Conversations.register`)."""
    self.conversations.register(prompt_tokens, messages)

  def pop_truncation_counts(self) -> dict[str, int]:
    """{"truncated_comparisons", "truncated_inputs"} since the last call; resets both."""
    out = {"truncated_comparisons": self.num_truncated_comparisons,
           "truncated_inputs": self.num_truncated}
    self.num_truncated = self.num_truncated_comparisons = 0
    return out

  def judge_text(self, context: str, response_a: str, response_b: str) -> str:
    """The exact text the judge reads for one ordered pair (before any cut)."""
    return self.inputs.text(context, response_a, response_b)

  def contexts(self, prompt_tokens, prompt_mask) -> list[str]:
    """The `{context}` of each prompt row."""
    if self.context_fn is not None:
      return text_lib.decode_contexts(self.policy_tokenizer, prompt_tokens, prompt_mask,
                                      self.context_fn)
    return [self.format.render_context(c) for c in self.conversations(prompt_tokens, prompt_mask)]

  def choice_logits(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[M, 2] judge logits of the two labels after each input (token ids, each fitting)."""
    tokens, mask = text_lib.left_pad(token_ids, pad_id=text_lib.pad_id(self.judge_tokenizer),
                                     pad_multiple=self.pad_multiple, max_length=self.max_length)
    ids = jnp.asarray(self.choice_ids, jnp.int32)
    fn = lambda t, m: _choice_logits(self.graphdef, self.state, t, m, ids)
    return text_lib.micro_batches(fn, tokens, mask, self.micro_batch_size)

  def preference_prob_text(self, contexts: Sequence[str], responses_first: Sequence[str],
                           responses_second: Sequence[str]) -> jax.Array:
    """[N] P(first ≻ second | context) from texts, both orders in one batch."""
    if not len(contexts) == len(responses_first) == len(responses_second) > 0:
      raise ValueError(f"contexts, responses_first, responses_second must be equally long and "
                       f"non-empty; got {len(contexts)}, {len(responses_first)}, "
                       f"{len(responses_second)}")
    fs, sf, truncated = self.inputs.fit(contexts, responses_first, responses_second)
    n_trunc = int(truncated.sum())
    if n_trunc:
      logging.warning("%d of %d judge comparisons exceed max_length=%d; both orders are cut "
                      "alike (responses from their end, then the context from its start)",
                      n_trunc, len(contexts), self.max_length)
    self.num_truncated_comparisons += n_trunc
    self.num_truncated += 2 * n_trunc
    logits = jnp.asarray(self.choice_logits(fs + sf))
    n = len(contexts)
    return order_averaged_preference(logits[:n], logits[n:])

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask
                      ) -> jax.Array:
    """P(a ≻ b | x) [N] float32; P(a≻b) + P(b≻a) == 1 exactly, P(a≻a) == ½."""
    text_lib.check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    ft, fm, st, sm, a_first, same = oracle_lib.canonical_order(
        jnp.asarray(a_tokens), jnp.asarray(a_mask, bool), jnp.asarray(b_tokens),
        jnp.asarray(b_mask, bool))
    q = self.preference_prob_text(self.contexts(prompt_tokens, prompt_mask),
                                  text_lib.decode_rows(self.policy_tokenizer, ft, fm),
                                  text_lib.decode_rows(self.policy_tokenizer, st, sm))
    return text_lib.to_caller_order(q.astype(jnp.float32), a_first, same)


def load_pairwise_judge(path: str, policy_tokenizer, *, tokenizer_path: str | None = None,
                        mesh: jax.sharding.Mesh | None = None, config_overrides=None,
                        preset: str | JudgeFormat = "rlhflow_pair_pm",
                        **judge_kwargs) -> PairwiseJudgeOracle:
  """A `PairwiseJudgeOracle` from a local checkpoint (weights + tokenizer).

  Args:
    path: HF checkpoint directory or GGUF file (`models.load_checkpoint`).
    policy_tokenizer: decodes the policy's tokens.
    tokenizer_path: judge tokenizer directory; defaults to `path`.
    mesh: optional mesh for the judge's parameters.
    config_overrides: DecoderConfig fields, e.g. {'dtype': 'bfloat16'}.
    preset: the input format, a name in `JUDGE_PRESETS` or a `JudgeFormat`.
    **judge_kwargs: other `PairwiseJudgeOracle` options (template, labels, ...).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  model = loading.load_checkpoint(path, mesh=mesh, **(config_overrides or {}))
  tok_path = tokenizer_path or path
  tok = (tok_lib.load_tokenizer(tok_path) if loading.is_gguf(tok_path)
         else transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True))
  return PairwiseJudgeOracle(model, tok, policy_tokenizer, preset=preset, **judge_kwargs)
