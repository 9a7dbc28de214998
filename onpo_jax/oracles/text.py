"""The host-side text path shared by the model-based oracles (`judge`, `reward_model`).

Those oracles receive the policy's token batches (`onpo_jax.oracles.base`) but
their models read text: each pair is put in a canonical order
(`base.canonical_order`), the policy's tokens are decoded, the prompt is mapped
back to the conversation it was rendered from (`Conversations`), the oracle's
own input is rendered and tokenised, rows are left-padded to a length rounded up
to `pad_multiple` (bounding recompiles) and run in fixed-size micro-batches, and
the result is mapped back to the caller's order with `to_caller_order`, which is
exact because q ∈ [½, 1] maps to 1 − q without rounding (Sterbenz).
"""

from __future__ import annotations

import hashlib
import string
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Message = tuple[str, str]  # (role, content)
Conversation = tuple[Message, ...]

# Stands in for a prompt's content when probing a chat template; a word no
# template rewrites and no prompt contains.
_PROBE = "ONPOPROBECONTENT"


def check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask) -> None:
  """Shapes of an oracle batch; ValueError names the argument."""
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


def to_caller_order(q_first: jax.Array, a_first: jax.Array, same: jax.Array) -> jax.Array:
  """P(a ≻ b) from P(first ≻ second): q if a is first, else 1 − q; ½ if a == b."""
  if not q_first.shape == a_first.shape == same.shape:
    raise ValueError(f"q_first, a_first, same must share a shape; got {q_first.shape}, "
                     f"{a_first.shape}, {same.shape}")
  return jnp.where(same, jnp.full_like(q_first, 0.5), jnp.where(a_first, q_first, 1.0 - q_first))


# ------------------------------------------------------------------ decoding


def decode_rows(tokenizer, tokens: np.ndarray, mask: np.ndarray,
                skip_special_tokens: bool = True) -> list[str]:
  """Decodes each row's real tokens (mask True)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  return [tokenizer.decode(t[m].tolist(), skip_special_tokens=skip_special_tokens)
          for t, m in zip(tokens, mask)]


def decode_contexts(tokenizer, prompt_tokens, prompt_mask, context_fn=None) -> list[str]:
  """A context string for each templated policy prompt, from its tokens alone.

  Without `context_fn`, the prompt decoded without special tokens: right for
  templates whose role markers are special tokens only. Otherwise the full
  decoded prompt (chat markup included) goes through `context_fn(text) -> str`,
  e.g. to rewrite Llama-3 headers as "user: ..." turns. `Conversations`
  recovers the messages themselves.
  """
  if context_fn is None:
    return decode_rows(tokenizer, prompt_tokens, prompt_mask)
  return [context_fn(t) for t in decode_rows(tokenizer, prompt_tokens, prompt_mask, False)]


def special_token_texts(tokenizer) -> tuple[str, ...]:
  """The text of every special token of `tokenizer` (added special tokens included)."""
  texts = set(getattr(tokenizer, "all_special_tokens", ()))
  for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
    if getattr(tok, "special", False):
      texts.add(tok.content)
  return tuple(sorted(t for t in texts if t))


def prompt_key(tokens) -> bytes:
  """A short key of a prompt's real token ids (the same ids give the same key)."""
  return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class Conversations:
  """The conversation (role, content messages) behind each policy prompt.

  A judge trained on its own rendering of the conversation must not read the
  policy's chat template (e.g. "user\\n\\n{q}assistant\\n\\n" is what a Llama-3
  prompt decodes to without its special tokens). Oracles ask this object for
  the messages of each prompt row, found in this order:

  1. messages registered for the prompt's exact real tokens (`register`); the
     run registers its prompt set (`onpo_jax.data.prompts.PromptRecord.messages`
     and the tokens `PromptSet` keeps), which is exact for any template and for
     multi-turn prompts;
  2. a single user turn recovered by matching the decoded prompt (special
     tokens kept) against the policy's chat template rendered around a probe
     content, with surrounding whitespace ignored;
  3. the prompt decoded without special tokens, as one user turn.

  Rows resolved by step 3 although the policy tokenizer has a chat template are
  logged once per instance: their context is probably wrong for the judge.
  """

  def __init__(self, policy_tokenizer):
    self.tokenizer = policy_tokenizer
    self._registered: dict[bytes, Conversation] = {}
    self._affixes = self._template_affixes(policy_tokenizer)
    self._specials = special_token_texts(policy_tokenizer)
    self._warned = False

  def __len__(self) -> int:
    return len(self._registered)

  @staticmethod
  def _template_affixes(tokenizer) -> tuple[str, str] | None:
    if not getattr(tokenizer, "chat_template", None):
      return None
    try:
      text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                           add_generation_prompt=True)
    except Exception:  # pylint: disable=broad-except
      # A template that rejects this probe cannot be inverted; later steps apply.
      return None
    if text.count(_PROBE) != 1:
      return None
    before, after = text.split(_PROBE)
    return before.strip(), after.strip()

  def register(self, prompt_tokens: Sequence, messages: Sequence[Sequence[Message]]) -> None:
    """Records the conversation of each prompt.

    Args:
      prompt_tokens: per prompt, its real token ids (1-D, no padding), exactly as
        the policy reads them (after any length limit).
      messages: per prompt, its ((role, content), ...) messages.
    """
    if len(prompt_tokens) != len(messages):
      raise ValueError(f"prompt_tokens and messages must be equally long; got "
                       f"{len(prompt_tokens)} and {len(messages)}")
    for toks, msgs in zip(prompt_tokens, messages):
      conv = tuple((str(r), str(c)) for r, c in msgs)
      if not conv:
        raise ValueError("every prompt needs at least one message")
      self._registered[prompt_key(toks)] = conv

  def _recover(self, ids: list[int]) -> Conversation:
    if self._affixes is not None:
      before, after = self._affixes
      text = self.tokenizer.decode(ids, skip_special_tokens=False).strip()
      if (len(text) >= len(before) + len(after) and text.startswith(before)
          and text.endswith(after)):
        content = text[len(before):len(text) - len(after)].strip()
        # Markup left inside means more than one turn: not this template's single turn.
        if not any(s in content for s in self._specials):
          return (("user", content),)
      if not self._warned:
        self._warned = True
        logging.warning("a prompt is neither registered nor a single turn of the policy's chat "
                        "template; the judge reads it decoded without special tokens. Register "
                        "the prompt set's conversations to give the judge the real messages.")
    return (("user", self.tokenizer.decode(ids, skip_special_tokens=True)),)

  def __call__(self, prompt_tokens, prompt_mask) -> list[Conversation]:
    """The conversation of each row of a left-padded [N, P] prompt batch."""
    out = []
    for t, m in zip(np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)):
      ids = t[m].tolist()
      conv = self._registered.get(prompt_key(ids))
      out.append(conv if conv is not None else self._recover(ids))
    return out


# --------------------------------------------------------------- tokenising


def chat_or_plain(tokenizer, content: str, use_chat_template: bool,
                  messages: Sequence[dict] | None = None, add_generation_prompt: bool = True
                  ) -> str:
  """`content` as is, or `messages` (default: one user turn of `content`) in the chat template."""
  if not use_chat_template:
    return content
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("use_chat_template=True but the oracle tokenizer has no chat_template")
  msgs = list(messages) if messages is not None else [{"role": "user", "content": content}]
  return tokenizer.apply_chat_template(msgs, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def left_pad(seqs: Sequence[Sequence[int]], *, pad_id: int, pad_multiple: int, max_length: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to [M, L]; L is the longest rounded up to `pad_multiple`.

  Returns:
    (tokens [M, L] int32, mask [M, L] bool), L at most `max_length`; every
    sequence must already fit.
  """
  longest = max(len(s) for s in seqs)
  if longest > max_length:
    raise ValueError(f"a sequence of {longest} tokens exceeds max_length={max_length}")
  length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  return tokens, mask


def pad_id(tokenizer) -> int:
  """The id written in padding (masked out, so any valid id works)."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_left_padded(tokenizer, texts: Sequence[str], *, max_length: int, pad_multiple: int,
                       add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenises and left-pads `texts`; keeps the last `max_length` tokens of longer ones.

  The end of an oracle input holds the question asked of the model, so the cut
  comes from the left.

  Returns:
    (tokens [M, L] int32, mask [M, L] bool, truncated [M] bool); L is the
    longest row rounded up to `pad_multiple`, at most `max_length`.
  """
  seqs = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
  truncated = np.asarray([len(s) > max_length for s in seqs], bool)
  if truncated.any():
    logging.warning("%d of %d oracle inputs exceed max_length=%d and lose their first tokens",
                    int(truncated.sum()), len(seqs), max_length)
  tokens, mask = left_pad([s[-max_length:] for s in seqs], pad_id=pad_id(tokenizer),
                          pad_multiple=pad_multiple, max_length=max_length)
  return tokens, mask, truncated


def micro_batches(fn: Callable, tokens: np.ndarray, mask: np.ndarray, micro_batch_size: int
                  ) -> np.ndarray:
  """`fn(tokens, mask)` on row blocks of a fixed size, outputs concatenated.

  The last block is filled by repeating row 0, so every call has the same shape
  (one compilation); real rows are used because a fully masked row has no last
  token.
  """
  m = tokens.shape[0]
  n_pad = -m % micro_batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], n_pad, 0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], n_pad, 0)])
  outs = [np.asarray(fn(jnp.asarray(tokens[i:i + micro_batch_size]),
                        jnp.asarray(mask[i:i + micro_batch_size])))
          for i in range(0, tokens.shape[0], micro_batch_size)]
  return np.concatenate(outs)[:m]
