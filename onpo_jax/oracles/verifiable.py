"""A verifiable general preference: checkable constraints, majority over criteria.

Each prompt carries constraints a program can check (IFEval-style: word limits,
required and forbidden words, bullet counts, how to start and end, no commas,
lowercase, a title). Each constraint is a criterion with a graded violation
v_k(y) >= 0 (0 = satisfied; e.g. the number of words over the limit). Response a
is preferred to b when it does better on more criteria than b does
(docs/verifiable_preference.md):

  P(a ≻ b | x) = 1 if W(a, b) > W(b, a), 0 if W(a, b) < W(b, a), ½ otherwise,
  W(a, b) = #{k : v_k(a) < v_k(b)}.

So P(a ≻ b) + P(b ≻ a) = 1 exactly and P(a ≻ a) = ½. With three or more
criteria the majority can cycle (Condorcet): a ≻ b ≻ c ≻ a. No reward r
explains such a preference, so this is a real-text game outside the
Bradley–Terry model; `intransitive_triples` measures how often it cycles on a
set of responses.

Everything here works on text (host side, numpy); `VerifiableOracle` wraps it
in the token-batch `Oracle` interface of `onpo_jax.oracles.base`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from onpo_jax.data import prompts
from onpo_jax.oracles import text as text_lib

# type -> fields it needs (besides "type"), with their Python types.
CONSTRAINT_FIELDS: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "min_words": {"n": int},
    "keywords": {"words": list},
    "forbidden_words": {"words": list},
    "bullets": {"n": int},
    "end_with": {"text": str},
    "start_with": {"text": str},
    "no_commas": {},
    "lowercase": {},
    "keyword_count": {"word": str, "n": int},
    "title": {},
}

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_BULLET = re.compile(r"^\s*[-*]\s+\S", re.MULTILINE)
_TITLE = re.compile(r"<<[^\n<>]+>>")


@dataclasses.dataclass(frozen=True)
class Constraint:
  """One checkable instruction of a prompt.

  Attributes:
    type: one of `CONSTRAINT_FIELDS`.
    n: the count of `max_words`, `min_words`, `bullets`, `keyword_count`.
    words: the words of `keywords`, `forbidden_words` (one word for `keyword_count`).
    text: the phrase of `start_with`, `end_with`.
  """
  type: str
  n: int = 0
  words: tuple[str, ...] = ()
  text: str = ""


def parse_constraint(spec: Any, where: str) -> Constraint:
  """A `Constraint` from its JSON object; ValueError names `where` and the field.

  Args:
    spec: e.g. {"type": "max_words", "n": 40} or {"type": "keywords", "words": ["sun"]}.
    where: the location quoted in errors (file and line).
  """
  if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
    raise ValueError(f"{where}: a constraint must be an object with a string 'type'; got "
                     f"{spec!r:.80}")
  kind = spec["type"]
  if kind not in CONSTRAINT_FIELDS:
    raise ValueError(f"{where}: unknown constraint type {kind!r}; expected one of "
                     f"{sorted(CONSTRAINT_FIELDS)}")
  fields = CONSTRAINT_FIELDS[kind]
  extra = set(spec) - set(fields) - {"type"}
  if extra:
    raise ValueError(f"{where}: constraint {kind!r} has unknown fields {sorted(extra)}; "
                     f"expected {sorted(fields)}")
  for name, typ in fields.items():
    value = spec.get(name)
    if not isinstance(value, typ) or isinstance(value, bool):
      raise ValueError(f"{where}: constraint {kind!r} needs {name!r} as {typ.__name__}; got "
                       f"{value!r:.80}")
  n = int(spec.get("n", 0))
  if "n" in fields and n < 1:
    raise ValueError(f"{where}: constraint {kind!r} needs n >= 1; got {n}")
  words = tuple(spec.get("words", ())) + ((spec["word"],) if "word" in spec else ())
  if "words" in fields and not words:
    raise ValueError(f"{where}: constraint {kind!r} needs a non-empty 'words' list")
  for w in words:
    if not isinstance(w, str) or _WORD.fullmatch(w) is None:
      raise ValueError(f"{where}: constraint {kind!r}: {w!r} is not a single word")
  text = spec.get("text", "")
  if "text" in fields and not text.strip():
    raise ValueError(f"{where}: constraint {kind!r} needs a non-empty 'text'")
  return Constraint(kind, n=n, words=tuple(w.lower() for w in words), text=text.strip())


def parse_constraints(specs: Any, where: str, min_count: int = 3) -> tuple[Constraint, ...]:
  """A prompt's constraints; at least `min_count` (a majority needs three to cycle)."""
  if not isinstance(specs, (list, tuple)) or len(specs) < min_count:
    raise ValueError(f"{where}: 'constraints' must be a list of at least {min_count} "
                     f"constraints; got {specs!r:.80}")
  return tuple(parse_constraint(s, f"{where} constraint {i}") for i, s in enumerate(specs))


# ---------------------------------------------------------------- checking


def count_words(response: str) -> int:
  """Words of `response`: runs of letters / digits, apostrophes inside a word kept."""
  return len(_WORD.findall(response))


def word_occurrences(response: str, word: str) -> int:
  """Whole-word, case-insensitive occurrences of `word` in `response`."""
  return sum(1 for w in _WORD.findall(response.lower()) if w == word)


def violation(c: Constraint, response: str) -> int:
  """How far `response` is from satisfying `c`: 0 when it does, larger is worse.

  max_words / min_words: words over / under the limit; keywords: listed words
  missing; forbidden_words: their occurrences; bullets: |bullet lines − n|;
  keyword_count: occurrences missing to reach n; no_commas: commas; lowercase:
  uppercase letters; start_with / end_with (case-insensitive, surrounding
  whitespace ignored) and title (a `<<title>>`): 0 or 1.
  """
  k = c.type
  if k == "max_words":
    return max(0, count_words(response) - c.n)
  if k == "min_words":
    return max(0, c.n - count_words(response))
  if k == "keywords":
    return sum(1 for w in c.words if word_occurrences(response, w) == 0)
  if k == "forbidden_words":
    return sum(word_occurrences(response, w) for w in c.words)
  if k == "bullets":
    return abs(len(_BULLET.findall(response)) - c.n)
  if k == "keyword_count":
    return max(0, c.n - word_occurrences(response, c.words[0]))
  if k == "no_commas":
    return response.count(",")
  if k == "lowercase":
    return sum(1 for ch in response if ch.isupper())
  if k == "start_with":
    return int(not response.strip().lower().startswith(c.text.lower()))
  if k == "end_with":
    return int(not response.strip().lower().endswith(c.text.lower()))
  if k == "title":
    return int(_TITLE.search(response) is None)
  raise ValueError(f"unknown constraint type {k!r}")


def violations(constraints: Sequence[Constraint], responses: Sequence[str]) -> np.ndarray:
  """[len(responses), len(constraints)] int64 violations."""
  return np.asarray([[violation(c, r) for c in constraints] for r in responses],
                    np.int64).reshape(len(responses), len(constraints))


def majority_preference(v_a: np.ndarray, v_b: np.ndarray) -> np.ndarray:
  """P(a ≻ b) from violations [..., K]: 1, ½ or 0 by the criteria each wins (module doc)."""
  v_a, v_b = np.asarray(v_a), np.asarray(v_b)
  wins_a = np.sum(v_a < v_b, axis=-1)
  wins_b = np.sum(v_b < v_a, axis=-1)
  return np.where(wins_a > wins_b, 1.0, np.where(wins_a < wins_b, 0.0, 0.5))


def preference_matrix(constraints: Sequence[Constraint], responses: Sequence[str]) -> np.ndarray:
  """P[i, j] = P(y_i ≻ y_j) over `responses` to one prompt; P + Pᵀ = 1."""
  v = violations(constraints, responses)
  return majority_preference(v[:, None, :], v[None, :, :])


@dataclasses.dataclass(frozen=True)
class TripleCounts:
  """Triples {i, j, k} of distinct responses and how their preferences look.

  Attributes:
    triples: all triples counted.
    decisive: triples whose three pairs are all strict (no ½).
    cyclic: triples whose strict preferences form a cycle i ≻ j ≻ k ≻ i.
    weak_cyclic: triples with an order i, j, k where P(i ≻ j), P(j ≻ k) and
      P(k ≻ i) are all ≥ ½ and one is > ½ (e.g. i ≻ j, j ~ k, k ≻ i): they
      violate weak stochastic transitivity, which every utility model
      (Bradley–Terry, Thurstone) satisfies. `cyclic` triples are among them.
  """
  triples: int
  decisive: int
  cyclic: int
  weak_cyclic: int = 0

  def __add__(self, other: "TripleCounts") -> "TripleCounts":
    return TripleCounts(self.triples + other.triples, self.decisive + other.decisive,
                        self.cyclic + other.cyclic, self.weak_cyclic + other.weak_cyclic)

  @property
  def cyclic_fraction(self) -> float:
    """Cyclic triples over all triples (0 when there are none)."""
    return self.cyclic / self.triples if self.triples else 0.0

  @property
  def weak_cyclic_fraction(self) -> float:
    """Triples violating weak stochastic transitivity over all triples."""
    return self.weak_cyclic / self.triples if self.triples else 0.0

  @property
  def cyclic_fraction_of_decisive(self) -> float:
    """Cyclic triples over decisive triples (0 when there are none)."""
    return self.cyclic / self.decisive if self.decisive else 0.0


def intransitive_triples(pref: np.ndarray) -> TripleCounts:
  """Counts the cyclic triples of a preference matrix over distinct responses.

  Args:
    pref: [n, n] with pref[i, j] = P(y_i ≻ y_j) ∈ {0, ½, 1} (the responses must be
      distinct: equal texts tie on every criterion and never cycle).
  """
  pref = np.asarray(pref)
  if pref.ndim != 2 or pref.shape[0] != pref.shape[1]:
    raise ValueError(f"pref must be a square matrix; got shape {pref.shape}")
  triples = decisive = cyclic = weak = 0
  for i, j, k in itertools.combinations(range(pref.shape[0]), 3):
    triples += 1
    forward = (pref[i, j], pref[j, k], pref[k, i])  # i → j → k → i
    backward = tuple(1.0 - p for p in forward)  # i → k → j → i
    weak += int(any(min(c) >= 0.5 and max(c) > 0.5 for c in (forward, backward)))
    if 0.5 in forward:
      continue
    decisive += 1
    cyclic += int(forward[0] == forward[1] == forward[2])  # all 1 or all 0: a cycle
  return TripleCounts(triples, decisive, cyclic, weak)


# ------------------------------------------------------------------- oracle


def _row_prompt(row: Any) -> str | None:
  """A row's prompt text: its 'prompt' (prompt sets) or 'instruction' (AlpacaEval files)."""
  if not isinstance(row, Mapping):
    return None
  value = row.get("prompt", row.get("instruction"))
  return value.strip() if isinstance(value, str) and value.strip() else None


def constraints_from_records(rows: Sequence[Mapping], where: str = "prompts"
                             ) -> dict[str, tuple[Constraint, ...]]:
  """{prompt text: constraints} from rows with a 'prompt' (or 'instruction') and 'constraints'.

  Raises:
    ValueError: naming the row for a missing or malformed field, or one prompt
      text given two different constraint lists.
  """
  out: dict[str, tuple[Constraint, ...]] = {}
  for i, row in enumerate(rows, start=1):
    at = f"{where} row {i}"
    key = _row_prompt(row)
    if key is None:
      raise ValueError(f"{at}: needs a non-empty string 'prompt' (or 'instruction')")
    if "constraints" not in row:
      raise ValueError(f"{at}: missing 'constraints' (the verifiable judge needs them)")
    cons = parse_constraints(row["constraints"], at)
    if out.get(key, cons) != cons:
      raise ValueError(f"{at}: prompt {key[:60]!r} appears earlier with other constraints")
    out[key] = cons
  return out


def constraints_from_files(paths: Sequence[str]) -> dict[str, tuple[Constraint, ...]]:
  """`constraints_from_records` over the rows of several files (JSONL or a JSON list)."""
  out: dict[str, tuple[Constraint, ...]] = {}
  for path in paths:
    for key, cons in constraints_from_records(prompts.read_json_rows(path), path).items():
      if out.get(key, cons) != cons:
        raise ValueError(f"{path}: prompt {key[:60]!r} has other constraints in an earlier file")
      out[key] = cons
  return out


def satisfaction(constraints: Sequence[Sequence[Constraint]], responses: Sequence[str]
                 ) -> dict[str, float]:
  """How well responses meet their prompts' constraints (one response per prompt).

  Returns:
    {"constraints_satisfied": fraction of all constraints met,
     "all_satisfied": fraction of responses meeting all of theirs}.
  """
  if len(constraints) != len(responses) or not responses:
    raise ValueError(f"constraints and responses must be equally long and non-empty; got "
                     f"{len(constraints)} and {len(responses)}")
  met = [violations(c, [r])[0] == 0 for c, r in zip(constraints, responses)]
  return {"constraints_satisfied": float(np.concatenate(met).mean()),
          "all_satisfied": float(np.mean([m.all() for m in met]))}


class VerifiableOracle:
  """The majority-of-criteria preference as an `Oracle` over token batches.

  Responses are decoded with the policy tokenizer (special tokens dropped); the
  prompt's last user message, recovered by `text.Conversations`, selects its
  constraints.

  Args:
    policy_tokenizer: decodes the policy's prompts and responses.
    constraints: {user message text: constraints}, e.g. `constraints_from_records`.
  """

  def __init__(self, policy_tokenizer, constraints: Mapping[str, Sequence[Constraint]]):
    if not constraints:
      raise ValueError("constraints is empty: the verifiable judge needs the prompts' "
                       "constraints")
    self.tokenizer = policy_tokenizer
    self.vocab_size = len(policy_tokenizer)
    self.constraints = {k.strip(): tuple(v) for k, v in constraints.items()}
    self.conversations = text_lib.Conversations(policy_tokenizer)

  def register_conversations(self, prompt_tokens, messages) -> None:
    """The messages behind each prompt (see `text.Conversations.register`)."""
    self.conversations.register(prompt_tokens, messages)

  def prompt_constraints(self, prompt_tokens, prompt_mask) -> list[tuple[Constraint, ...]]:
    """Each prompt row's constraints; ValueError quoting a prompt that has none."""
    out = []
    for conv in self.conversations(prompt_tokens, prompt_mask):
      user = [c for r, c in conv if r == "user"]
      key = user[-1].strip() if user else ""
      if key not in self.constraints:
        raise ValueError(f"the verifiable judge has no constraints for prompt {key[:80]!r}; "
                         "every prompt needs a 'constraints' list in the prompt file")
      out.append(self.constraints[key])
    return out

  def response_texts(self, tokens, mask) -> list[str]:
    return text_lib.decode_rows(self.tokenizer, tokens, mask)

  def preference_prob(self, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask):
    """P(a ≻ b | x) [N] float32 in {0, ½, 1} (see the module docstring)."""
    text_lib.check_pair_batch(prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask)
    cons = self.prompt_constraints(prompt_tokens, prompt_mask)
    a_text = self.response_texts(a_tokens, a_mask)
    b_text = self.response_texts(b_tokens, b_mask)
    p = [float(majority_preference(violations(c, [a])[0], violations(c, [b])[0]))
         for c, a, b in zip(cons, a_text, b_text)]
    return jnp.asarray(p, jnp.float32)
