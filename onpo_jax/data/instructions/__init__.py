"""Prompt sets shipped with the package (their licence is in this folder's LICENSE).

`constrained_prompts_train.jsonl` (220) and `constrained_prompts_eval.jsonl`
(40, held out): everyday instructions written for onpo_jax (CC0 1.0), each
stating 3 or 4 checkable constraints that its "constraints" field spells out
for `onpo_jax.oracles.verifiable` (docs/verifiable_preference.md). The files
read through the usual prompt pipeline (`data.source = 'files'`) and as an
evaluation prompt file (`eval.prompt_file`).
"""

from __future__ import annotations

import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_FILE = os.path.join(_HERE, "constrained_prompts_train.jsonl")
EVAL_FILE = os.path.join(_HERE, "constrained_prompts_eval.jsonl")
FILES = {"train": TRAIN_FILE, "eval": EVAL_FILE}


def read_rows(split: str) -> list[dict]:
  """The rows ({"id", "prompt", "constraints", "split"}) of the 'train' or 'eval' set."""
  if split not in FILES:
    raise ValueError(f"split must be one of {sorted(FILES)}; got {split!r}")
  with open(FILES[split], encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
