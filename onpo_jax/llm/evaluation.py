"""Evaluation of the `llm` job: AlpacaEval-format generations and judged win rates.

Each evaluation decodes the `eval.prompt_file` instructions with the current
policy (greedy unless `eval.temperature` > 0) and asks the run's oracle, and
each judge of `eval.judges`, whether each answer beats the reference answer:
the SFT policy's own generations with the same decoding settings, or an
AlpacaEval outputs file (`eval.reference_outputs`). Each win rate and its
confidence interval come from `alpaca_eval.win_rate`; the generations are
AlpacaEval records, so the official AlpacaEval 2.0 annotator can score the same
files.
"""

from __future__ import annotations

import re

import numpy as np

from onpo_jax import sampler as sampler_lib
from onpo_jax.data import prompts
from onpo_jax.llm import alpaca_eval
from onpo_jax.llm import config as llm_config
from onpo_jax.llm.backend import MicroBatchedSampler
from onpo_jax.oracles import verifiable


def prompt_constraints(path: str, instructions) -> list | None:
  """Each instruction's constraints when the prompt file carries them, else None.

  Raises:
    ValueError: naming the file when only some of its records have constraints.
  """
  rows = prompts.read_json_rows(path)[:len(instructions)]
  have = ["constraints" in r for r in rows if isinstance(r, dict)]
  if not any(have):
    return None
  if not all(have):
    raise ValueError(f"{path}: {have.count(False)} of {len(have)} records have no "
                     "'constraints'; give every record constraints or none")
  table = verifiable.constraints_from_records(rows, path)
  return [table[s.strip()] for s in instructions]


def example_lines(instructions, before, after, count: int, width: int = 160) -> list[str]:
  """Log lines showing the first `count` instructions with two answers to each.

  Args:
    instructions: the evaluation instructions.
    before: the reference (SFT) answers, in the same order.
    after: the current policy's answers.
    count: how many instructions to show.
    width: characters kept of each text (line breaks shown as one ⏎).
  """

  def cut(text: str) -> str:
    text = re.sub(r"\s*\n\s*", " ⏎ ", text.strip())
    return text if len(text) <= width else text[:width - 1] + "…"

  lines = []
  for i, (x, b, a) in enumerate(zip(instructions[:count], before, after)):
    lines += [f"  example {i + 1}: {cut(x)}", f"    before: {cut(b)}", f"    after:  {cut(a)}"]
  return lines


class Evaluator:
  """AlpacaEval-format generations and the oracles' win rates against a reference.

  The reference is the SFT policy's own generations (same decoding settings)
  or, with `eval.reference_outputs`, an AlpacaEval outputs file whose
  instructions must match the prompt file's, in order.

  Args:
    config: the llm config (`eval`, `data`, `sampling` and `judge` sections).
    tokenizer: the policy's tokenizer.
    graphdef: the policy's graphdef.
    model_config: its DecoderConfig.
    oracle: the run's oracle (`preference_prob`).
    eos_ids: token ids that end a response.
    pad_id: id written after EOS.
    judges: {name: oracle} of further judges of the same answers (`eval.judges`).
  """

  def __init__(self, config, tokenizer, graphdef, model_config, oracle, *, eos_ids, pad_id,
               judges=None):
    from onpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    ec = config.eval
    instructions, datasets = alpaca_eval.read_instructions(ec.prompt_file)
    if ec.max_prompts:
      instructions, datasets = instructions[:ec.max_prompts], datasets[:ec.max_prompts]
    self.instructions, self.datasets = instructions, datasets
    self.constraints = prompt_constraints(ec.prompt_file, instructions)
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
    sampling = llm_config.sampling_config(
        config, max_new_tokens=int(ec.max_new_tokens),
        temperature=1.0 if greedy else float(ec.temperature), greedy=greedy,
        eos_ids=tuple(eos_ids), pad_id=int(pad_id))
    self.sampler = MicroBatchedSampler(
        sampler_lib.Sampler(graphdef, sampling, model_config=model_config),
        ec.micro_batch_size, eos_ids)
    self.tokenizer, self.config = tokenizer, config
    # "" is the rounds' oracle: its metrics keep their plain names.
    self.oracles = {"": oracle, **(judges or {})}
    self.reference = None  # (tokens, mask, texts)

  def generate(self, params, key):
    """(tokens [n, N], mask [n, N], texts) of the policy's answers."""
    out = self.sampler(params, self.prompt_tokens, self.prompt_mask, key)
    texts = [self.tokenizer.decode(t[m].tolist(), skip_special_tokens=True)
             for t, m in zip(out.tokens, out.mask)]
    return out.tokens, out.mask, texts

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

  def constraint_metrics(self, texts) -> dict[str, float]:
    """Constraint satisfaction of answers to a constrained prompt file ({} otherwise)."""
    if self.constraints is None:
      return {}
    return verifiable.satisfaction(self.constraints, texts)

  def reference_metrics(self) -> dict[str, float]:
    """Mean length and constraint satisfaction of the reference answers."""
    tokens, mask, texts = self.reference
    return dict(mean_response_tokens=float(np.mean(np.asarray(mask).sum(axis=1))),
                **self.constraint_metrics(texts))

  def evaluate(self, params, key, generator: str):
    """(AlpacaEval records, {judge name: WinRate vs the reference}, mean response tokens).

    The rounds' oracle is named "", `eval.judges` by their names.
    """
    tokens, mask, texts = self.generate(params, key)
    ref_tokens, ref_mask, _ = self.reference
    win_rates = {}
    for name, oracle in self.oracles.items():
      section = self.config.eval.judges[name] if name else self.config.judge
      prefs = alpaca_eval.oracle_preferences(
          oracle, self.prompt_tokens, self.prompt_mask, tokens, mask, ref_tokens, ref_mask,
          micro_batch_size=int(section.micro_batch_size))
      win_rates[name] = alpaca_eval.win_rate(prefs, float(self.config.eval.confidence))
    records = alpaca_eval.make_records(self.instructions, texts, generator, self.datasets)
    return records, win_rates, float(np.mean(mask.sum(axis=1)))

  def examples(self, texts) -> list[str]:
    """Log lines of the first `eval.show_examples` prompts: reference answer, then `texts`."""
    return example_lines(self.instructions, self.reference[2], texts,
                         int(self.config.eval.show_examples))
