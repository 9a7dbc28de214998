"""The pair-pm judge's published input format and its symmetric truncation.

RLHFlow's pair preference model (the paper's judge) was trained on one exact
input; these tests pin it on a tiny Llama-3-style tokenizer (byte-level BPE
without merges, so every byte is one token and the expected ids are written
down independently: byte b has id b) with Llama-3's chat template and BOS
"<|begin_of_text|>", and compare the whole oracle with the authors' recipe run
through transformers and PyTorch.
"""

import re

import numpy as np
import pytest
import torch
import transformers

from onpo_jax.oracles import judge
from onpo_jax.oracles import text
from onpo_jax.testing import tiny_hf
import tolerances

BOS, PAD, HEADER_START, HEADER_END, EOT = 256, 257, 258, 259, 260
SPECIALS = {"<|begin_of_text|>": BOS, "<|end_of_text|>": PAD, "<|start_header_id|>": HEADER_START,
            "<|end_header_id|>": HEADER_END, "<|eot_id|>": EOT}
# Meta-Llama-3-8B-Instruct's chat template (the judge is a fine-tuned Llama-3-8B).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The context template of the model card and the authors' annotation scripts.
RLHFLOW_CONTEXT_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n "
    "{{ message['content'] }}{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}"
    "{% endfor %}\n\n\n")
PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


def _byte_chars():
  """GPT-2's byte -> printable character table (what a ByteLevel BPE vocabulary holds)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def make_llama3_style_tokenizer(path) -> str:
  """Byte-level BPE (byte b -> id b), Llama-3 special tokens, chat template and BOS."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab = {c: b for b, c in _byte_chars().items()}
  vocab.update(SPECIALS)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", BOS)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
      pad_token="<|end_of_text|>", clean_up_tokenization_spaces=False,
      additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
  fast.chat_template = LLAMA3_CHAT_TEMPLATE
  fast.padding_side = "left"
  fast.save_pretrained(path)
  return str(path)


def _ids(s: str) -> list[int]:
  return list(s.encode("utf-8"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = make_llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_tok"))
  return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def plain_tok(tok):
  """The authors' `tokenizer_plain`: the judge tokenizer with the context template."""
  other = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
  other.chat_template = RLHFLOW_CONTEXT_TEMPLATE
  return other


def _authors_input_ids(tok, plain_tok, messages, response_a, response_b):
  """The model card's recipe, verbatim in substance, for one ordered pair."""
  context = plain_tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                          tokenize=False)
  prompt = PROMPT_TEMPLATE.format(context=context, response_A=response_a, response_B=response_b)
  rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
  return tok.encode(rendered.replace(tok.bos_token, ""), add_special_tokens=False)


CONVERSATIONS = [
    (("user", "What is 2+2?"),),
    (("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?")),
]


def test_rlhflow_context_matches_the_published_template(plain_tok):
  for messages in CONVERSATIONS:
    want = plain_tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         tokenize=False)
    assert judge.render_rlhflow_context(messages) == want
  assert judge.render_rlhflow_context(CONVERSATIONS[0]) == "\n\n<turn> user\n What is 2+2?\n"
  assert judge.render_rlhflow_context(CONVERSATIONS[1]) == (
      "\n\n<turn> user\n Name a colour.\n<turn> assistant\n Blue.\n<turn> user\n Another one?\n")


def test_rlhflow_preset_exact_string_and_ids(tok, plain_tok):
  inputs = judge.JudgeInputs(tok, judge.JUDGE_PRESETS["rlhflow_pair_pm"], max_length=4096)
  context = judge.render_rlhflow_context(CONVERSATIONS[0])
  got = inputs.text(context, "4", "5")
  # One user message, no generation prompt, BOS text removed; the Llama-3 template
  # trims the message, so the template's final " \n" is gone.
  body = "[CONTEXT] \n\n<turn> user\n What is 2+2?\n [RESPONSE A] 4 [RESPONSE B] 5"
  assert got == "<|start_header_id|>user<|end_header_id|>\n\n" + body + "<|eot_id|>"
  want_ids = [HEADER_START] + _ids("user") + [HEADER_END] + _ids("\n\n" + body) + [EOT]
  assert inputs.encode([got]) == [want_ids]
  assert want_ids == _authors_input_ids(tok, plain_tok, CONVERSATIONS[0], "4", "5")
  assert judge.resolve_choice_token_ids(tok, judge.JUDGE_PRESETS["rlhflow_pair_pm"].labels) == (
      ord("A"), ord("B"))
  for messages in CONVERSATIONS:
    ids = inputs.encode([inputs.text(judge.render_rlhflow_context(messages), "Yes.", "No.")])[0]
    assert ids == _authors_input_ids(tok, plain_tok, messages, "Yes.", "No.")
    assert BOS not in ids
  # The generic preset keeps BOS and asks with the assistant header.
  plain = judge.JudgeInputs(tok, judge.JUDGE_PRESETS["plain"], max_length=4096)
  assert plain.text("What is 2+2?", "4", "5") == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] What is 2+2? "
      "[RESPONSE A] 4 [RESPONSE B] 5<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_format_overrides_and_errors(tok):
  fmt = judge.resolve_format("rlhflow_pair_pm", use_chat_template=False, labels=["B", "A"])
  assert fmt.labels == ("B", "A") and not fmt.use_chat_template
  assert fmt.render_context is judge.render_rlhflow_context
  assert judge.resolve_format(fmt) == fmt
  with pytest.raises(ValueError, match="preset must be one of"):
    judge.resolve_format("pairrm")
  with pytest.raises(ValueError, match="template must contain exactly the fields"):
    judge.resolve_format("plain", template="{context} {response_a}")


def _policy_prompt_ids(tok, messages):
  rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                     tokenize=False, add_generation_prompt=True)
  return tok(rendered, add_special_tokens=False)["input_ids"]


def test_conversations_recover_single_turns_and_use_registered_ones(tok):
  conv = text.Conversations(tok)
  ids = [_policy_prompt_ids(tok, m) for m in CONVERSATIONS]
  length = max(map(len, ids)) + 3
  pt = np.full((2, length), PAD, np.int32)
  pm = np.zeros((2, length), bool)
  for i, row in enumerate(ids):
    pt[i, length - len(row):], pm[i, length - len(row):] = row, True
  got = conv(pt, pm)
  # A single turn is read back from the Llama-3 markup; the multi-turn prompt,
  # unregistered, falls back to its text without special tokens.
  assert got[0] == CONVERSATIONS[0]
  assert got[1] == (("user", tok.decode(ids[1], skip_special_tokens=True)),)
  conv.register([np.asarray(ids[1], np.int32)], [CONVERSATIONS[1]])
  assert conv(pt, pm) == CONVERSATIONS
  with pytest.raises(ValueError, match="equally long"):
    conv.register(ids, CONVERSATIONS[:1])


# ------------------------------------------------------------- truncation


def _responses_shown(decoded: str) -> tuple[str, str, str]:
  m = re.fullmatch(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n\[CONTEXT\] (.*) "
                   r"\[RESPONSE A\] (.*) \[RESPONSE B\] (.*)<\|eot_id\|>", decoded, re.DOTALL)
  assert m, decoded
  return m.group(1), m.group(2), m.group(3)


LONG_CONTEXT = judge.render_rlhflow_context(
    (("user", "Tell me about rivers. " * 6), ("assistant", "Rivers flow downhill. " * 5),
     ("user", "And about lakes, briefly?")))
SHORT_CONTEXT = judge.render_rlhflow_context((("user", "And about lakes?"),))
LONG_A = "Lakes are still bodies of water, fed by rivers and rain. " * 4
LONG_B = "A lake is a basin of fresh water. " * 5


@pytest.mark.parametrize("context,max_length", [(LONG_CONTEXT, 120), (LONG_CONTEXT, 200),
                                                (LONG_CONTEXT, 330), (SHORT_CONTEXT, 200),
                                                (SHORT_CONTEXT, 330)])
def test_truncation_shows_both_orders_the_same_text(tok, context, max_length):
  inputs = judge.JudgeInputs(tok, judge.JUDGE_PRESETS["rlhflow_pair_pm"], max_length)
  full_fs = inputs.encode([inputs.text(context, LONG_A, LONG_B)])[0]
  assert len(full_fs) > max_length
  ids_fs, ids_sf, kept = inputs.fit_one(context, LONG_A, LONG_B)
  assert len(ids_fs) <= max_length and len(ids_sf) <= max_length
  ctx_fs, a_fs, b_fs = _responses_shown(tok.decode(ids_fs))
  ctx_sf, a_sf, b_sf = _responses_shown(tok.decode(ids_sf))
  # The response shown first in one order is shown second in the other, unchanged.
  assert (a_fs, b_fs) == (b_sf, a_sf) == (kept[1], kept[2])
  assert ctx_fs == ctx_sf == kept[0]
  # Responses lose their end, the context its start.
  assert LONG_A.startswith(a_fs) and LONG_B.startswith(b_fs)
  assert context.endswith(ctx_fs)
  cut_a, cut_b = len(a_fs) < len(LONG_A.strip()), len(b_fs) < len(LONG_B.strip())
  assert cut_a or cut_b
  if cut_a and cut_b:  # one cap for both (byte tokens: a cap in characters, less
    # the trailing space a cut response loses)
    assert abs(len(kept[1]) - len(kept[2])) <= 1
  # The context is cut only when the responses are cut too, and the whole
  # budget is used (up to the space dropped at a cut and merged boundaries).
  if ctx_fs != context:
    assert cut_a and cut_b
  else:
    assert context == SHORT_CONTEXT
  assert max(len(ids_fs), len(ids_sf)) >= max_length - 3


def test_batch_fit_marks_only_long_comparisons(tok):
  inputs = judge.JudgeInputs(tok, judge.JUDGE_PRESETS["rlhflow_pair_pm"], 200)
  short = judge.render_rlhflow_context(CONVERSATIONS[0])
  fs, sf, truncated = inputs.fit([short, LONG_CONTEXT], ["4", LONG_A], ["5", LONG_B])
  np.testing.assert_array_equal(truncated, [False, True])
  assert fs[0] == inputs.encode([inputs.text(short, "4", "5")])[0]
  assert sf[0] == inputs.encode([inputs.text(short, "5", "4")])[0]
  assert max(map(len, fs + sf)) <= 200


def test_allocate_tokens_is_symmetric_and_fits():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    lc, lf, ls = rng.integers(0, 300, 3)
    budget = int(rng.integers(-5, 400))
    n_ctx, cap = judge.allocate_tokens(lc, lf, ls, budget)
    assert (n_ctx, cap) == judge.allocate_tokens(lc, ls, lf, budget)
    used = n_ctx + min(lf, cap) + min(ls, cap)
    assert used <= max(budget, 0) and 0 <= n_ctx <= lc
    if lc + lf + ls <= budget:
      assert (n_ctx, min(lf, cap), min(ls, cap)) == (lc, lf, ls)
    elif budget > 0:
      assert used >= budget - 1  # nothing left unused but an odd token
      if n_ctx < lc:  # the context is cut only when the responses are at their floor
        assert cap <= budget // 4 or min(lf, cap) + min(ls, cap) == lf + ls


# ----------------------------------------------------------- whole oracle


@pytest.fixture(scope="module")
def judge_assets(tok, tmp_path_factory):
  ckpt = tiny_hf.make_tiny_checkpoint(str(tmp_path_factory.mktemp("llama3_judge")), "llama",
                                      seed=11, vocab_size=264, max_position_embeddings=512)
  return dict(ckpt=ckpt, hf=tiny_hf.load_hf_model(ckpt))


def _batch(tok, conversations, resp_a, resp_b):
  prompts = [_policy_prompt_ids(tok, m) for m in conversations]
  p_len = max(map(len, prompts))
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [EOT]
  r_len = max(len(enc(r)) for r in resp_a + resp_b)
  n = len(prompts)
  pt, pm = np.full((n, p_len), PAD, np.int32), np.zeros((n, p_len), bool)
  for i, p in enumerate(prompts):
    pt[i, p_len - len(p):], pm[i, p_len - len(p):] = p, True
  out = [pt, pm]
  for resps in (resp_a, resp_b):
    t, m = np.full((n, r_len), PAD, np.int32), np.zeros((n, r_len), bool)
    for i, r in enumerate(resps):
      t[i, :len(enc(r))], m[i, :len(enc(r))] = enc(r), True
    out += [t, m]
  return prompts, out


def test_oracle_matches_the_authors_recipe(tok, plain_tok, judge_assets):
  conversations = CONVERSATIONS + [(("user", "Is the sky blue?"),)]
  resp_a, resp_b = ["4", "Red.", "Yes, on a clear day."], ["Four.", "Green!", "No."]
  prompts, batch = _batch(tok, conversations, resp_a, resp_b)
  oracle = judge.load_pairwise_judge(judge_assets["ckpt"], tok, tokenizer_path=tok.name_or_path,
                                     micro_batch_size=4, pad_multiple=16)
  assert oracle.format == judge.JUDGE_PRESETS["rlhflow_pair_pm"]
  oracle.register_conversations([np.asarray(prompts[1])], [conversations[1]])
  assert oracle.contexts(batch[0], batch[1]) == [
      judge.render_rlhflow_context(m) for m in conversations]
  got = np.asarray(oracle.preference_prob(*batch))

  magnitudes, want = [], []
  for messages, a, b in zip(conversations, resp_a, resp_b):
    p_first = []
    for x, y in ((a, b), (b, a)):
      ids = _authors_input_ids(tok, plain_tok, messages, x, y)
      with torch.no_grad():
        logits = judge_assets["hf"](torch.tensor([ids])).logits[0, -1].double().numpy()
      magnitudes.append(np.abs(logits).max())
      pair = logits[[ord("A"), ord("B")]]
      p_first.append(np.exp(pair[0] - np.logaddexp(pair[0], pair[1])))
    want.append(0.5 * (p_first[0] + 1.0 - p_first[1]))
  # As tests/test_judge.py, with the accumulation depth of tolerances.DECODER_DEPTH
  # grown by the softmax and value sums over up to 160 positions instead of 16
  # (4 per layer and position: 2 layers × 2 sums), halved for a probability.
  rtol = (tolerances.DECODER_DEPTH + 4 * (160 - 16)) * tolerances.F32_EPS / 2
  assert max(len(_authors_input_ids(tok, plain_tok, m, a, b))
             for m, a, b in zip(conversations, resp_a, resp_b)) <= 160
  tolerances.assert_close_rel(got, want, rtol=rtol, scale=max(magnitudes),
                              what="rlhflow pair-pm judge probabilities / max|logit|")
  assert np.ptp(got) > 1e-3
  assert oracle.pop_truncation_counts() == {"truncated_comparisons": 0, "truncated_inputs": 0}


def test_oracle_truncation_counts_and_symmetry(tok, judge_assets):
  conversations = [CONVERSATIONS[0], (("user", "Tell me about rivers and lakes. " * 4),)]
  prompts, batch = _batch(tok, conversations, ["4", LONG_A], ["5", LONG_B])
  oracle = judge.load_pairwise_judge(judge_assets["ckpt"], tok, tokenizer_path=tok.name_or_path,
                                     max_length=160, micro_batch_size=4, pad_multiple=16)
  pt, pm, at, am, bt, bm = batch
  p_ab = np.asarray(oracle.preference_prob(pt, pm, at, am, bt, bm))
  p_ba = np.asarray(oracle.preference_prob(pt, pm, bt, bm, at, am))
  np.testing.assert_array_equal(p_ab + p_ba, np.ones(2, np.float32))
  # The second comparison is too long in both calls, the first never.
  assert (oracle.num_truncated_comparisons, oracle.num_truncated) == (2, 4)
  assert oracle.pop_truncation_counts() == {"truncated_comparisons": 2, "truncated_inputs": 4}
  assert (oracle.num_truncated_comparisons, oracle.num_truncated) == (0, 0)
