"""The verifiable preference (onpo_jax.oracles.verifiable) against a reference written here.

The reference counts words by scanning characters, finds bullets line by line
and decides the majority by comparing the two win counts with a loop, so it
shares no code (and no regular expression) with the module. The outputs are
integers and exact halves: comparisons are exact.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from onpo_jax.data import instructions
from onpo_jax.data import prompts
from onpo_jax.llm import alpaca_eval
from onpo_jax.oracles import verifiable as vf
from onpo_jax.testing import tiny_hf


# ------------------------------------------------------------ the reference


def _ref_words(text):
  """Maximal runs of alphanumerics / '_', joined across a single inner apostrophe."""
  words, cur, i = [], "", 0
  while i < len(text):
    ch = text[i]
    if ch.isalnum() or ch == "_":
      cur += ch
    elif ch in "'’" and cur and i + 1 < len(text) and (text[i + 1].isalnum() or text[i + 1] == "_"):
      cur += ch
    else:
      if cur:
        words.append(cur)
      cur = ""
    i += 1
  if cur:
    words.append(cur)
  return words


def _ref_violation(spec, response):
  words = [w.lower() for w in _ref_words(response)]
  t = spec["type"]
  if t == "max_words":
    return max(0, len(words) - spec["n"])
  if t == "min_words":
    return max(0, spec["n"] - len(words))
  if t == "keywords":
    return len([w for w in spec["words"] if w not in words])
  if t == "forbidden_words":
    return sum(words.count(w) for w in spec["words"])
  if t == "bullets":
    n = 0
    for line in response.split("\n"):
      s = line.lstrip()
      if len(s) > 2 and s[0] in "-*" and s[1] in " \t" and s[1:].strip():
        n += 1
    return abs(n - spec["n"])
  if t == "keyword_count":
    return max(0, spec["n"] - words.count(spec["word"]))
  if t == "no_commas":
    return len([c for c in response if c == ","])
  if t == "lowercase":
    return len([c for c in response if c.lower() != c])
  if t == "start_with":
    return 0 if response.strip().lower()[:len(spec["text"])] == spec["text"].lower() else 1
  if t == "end_with":
    s = response.strip().lower()
    return 0 if s[len(s) - len(spec["text"]):] == spec["text"].lower() else 1
  if t == "title":
    for line in response.split("\n"):
      for a in range(len(line) - 1):
        b = line.find(">>", a + 2) if line[a:a + 2] == "<<" else -1
        inside = line[a + 2:b]
        if b > 0 and inside and "<" not in inside and ">" not in inside:
          return 0
    return 1
  raise AssertionError(t)


def _ref_pref(specs, a, b):
  wins_a = wins_b = 0
  for s in specs:
    va, vb = _ref_violation(s, a), _ref_violation(s, b)
    if va < vb:
      wins_a += 1
    elif vb < va:
      wins_b += 1
  if wins_a == wins_b:
    return 0.5
  return 1.0 if wins_a > wins_b else 0.0


# ----------------------------------------------------------------- fixtures

SPECS = [
    {"type": "max_words", "n": 8},
    {"type": "min_words", "n": 5},
    {"type": "keywords", "words": ["sun", "rain"]},
    {"type": "forbidden_words", "words": ["hot"]},
    {"type": "bullets", "n": 2},
    {"type": "end_with", "text": "Stay dry."},
    {"type": "start_with", "text": "Well"},
    {"type": "no_commas"},
    {"type": "lowercase"},
    {"type": "keyword_count", "word": "rain", "n": 2},
    {"type": "title"},
]

RESPONSES = [
    "",
    "Well, the sun is hot. Stay dry.",
    "well the sun and rain don't mix, rain or not. stay dry.",
    "<<Weather>>\n- sun\n- rain\nStay dry.",
    "  - Hot sun\n* hot rain, hot wind\n-not a bullet\n   *   rain again  ",
    "Rain's coming: RAIN, rain_fall and sun-light <<x\ny>> <<>> <<ok title>>",
    "WELL WELL WELL hot hot HOT sun, sun, sun.",
    "the cat's toys aren’t here Stay dry.   ",
]


def test_every_constraint_type_matches_the_reference():
  assert {s["type"] for s in SPECS} == set(vf.CONSTRAINT_FIELDS)
  for spec, response in itertools.product(SPECS, RESPONSES):
    c = vf.parse_constraint(spec, "test")
    assert vf.violation(c, response) == _ref_violation(spec, response), (spec, response)


def test_hand_counted_cases():
  c = lambda **s: vf.parse_constraint(s, "test")
  assert vf.count_words("don't stop, it’s 9 o'clock") == 5
  assert vf.violation(c(type="max_words", n=3), "one two three four five") == 2
  assert vf.violation(c(type="min_words", n=10), "one two three") == 7
  assert vf.violation(c(type="keywords", words=["Sun", "moon"]), "The SUN sets.") == 1
  assert vf.violation(c(type="forbidden_words", words=["hot"]), "Hot, hotter, hot!") == 2
  assert vf.violation(c(type="bullets", n=3), "- a\n* b\n-c\n  - d") == 0
  assert vf.violation(c(type="no_commas"), "a, b, c") == 2
  assert vf.violation(c(type="lowercase"), "Hello World") == 2
  assert vf.violation(c(type="keyword_count", word="tea", n=3), "tea? Tea! teapot") == 1
  assert vf.violation(c(type="start_with", text="Sure"), "  sure thing") == 0
  assert vf.violation(c(type="end_with", text="The end."), "...and that is the end.\n") == 0
  assert vf.violation(c(type="title"), "<<A title>> text") == 0
  assert vf.violation(c(type="title"), "<<>> text") == 1


def test_majority_preference_matches_the_reference_and_is_antisymmetric():
  cons = vf.parse_constraints(SPECS, "test")
  pref = vf.preference_matrix(cons, RESPONSES)
  for i, j in itertools.product(range(len(RESPONSES)), repeat=2):
    assert pref[i, j] == _ref_pref(SPECS, RESPONSES[i], RESPONSES[j])
  np.testing.assert_array_equal(pref + pref.T, np.ones_like(pref))
  np.testing.assert_array_equal(np.diag(pref), np.full(len(RESPONSES), 0.5))


def test_a_condorcet_cycle_is_found():
  # Three criteria, three responses, each response first on two and last on one.
  cons = vf.parse_constraints([{"type": "max_words", "n": 1},
                               {"type": "keyword_count", "word": "yes", "n": 3},
                               {"type": "no_commas"}], "test")
  # violations (words over 1, "yes" missing to 3, commas):
  x = "no,"          # (0, 3, 1)
  y = "yes yes,,"    # (1, 1, 2)
  z = "yes no no"    # (2, 2, 0)
  pref = vf.preference_matrix(cons, [x, y, z])
  assert pref[0, 1] == pref[1, 2] == pref[2, 0] == 1.0  # x ≻ y ≻ z ≻ x
  counts = vf.intransitive_triples(pref)
  assert counts == vf.TripleCounts(triples=1, decisive=1, cyclic=1, weak_cyclic=1)
  # i ≻ j, j ~ k, k ≻ i: no strict cycle, but no utility model gives it either.
  tie = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.5, 0.5]])
  assert vf.intransitive_triples(tie) == vf.TripleCounts(1, 0, 0, 1)
  # A transitive order with a tie at the top is fine.
  ok = np.array([[0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0.0, 0.0, 0.5]])
  assert vf.intransitive_triples(ok) == vf.TripleCounts(1, 0, 0, 0)
  assert counts.cyclic_fraction == 1.0


def test_intransitive_triples_matches_a_brute_force_count():
  rng = np.random.default_rng(0)
  for n in (3, 5, 7):
    upper = rng.choice([0.0, 0.5, 1.0], size=(n, n))
    pref = np.triu(upper, 1) + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(n)
    cyc = dec = 0
    weak = set()
    for t in itertools.permutations(range(n), 3):
      i, j, k = t
      strict = all(pref[p, q] != 0.5 for p, q in ((i, j), (j, k), (k, i)))
      dec += strict
      cyc += strict and pref[i, j] == 1.0 and pref[j, k] == 1.0 and pref[k, i] == 1.0
      # Weak stochastic transitivity: P(i≻j) ≥ ½ and P(j≻k) ≥ ½ imply P(i≻k) ≥ ½,
      # strictly when one premise is strict.
      if pref[i, j] >= 0.5 and pref[j, k] >= 0.5 and (
          pref[i, k] < 0.5 or (max(pref[i, j], pref[j, k]) > 0.5 and pref[i, k] == 0.5)):
        weak.add(frozenset(t))
    # Each unordered triple appears 6 times as a permutation; a cycle 3 times in one direction.
    got = vf.intransitive_triples(pref)
    assert got.triples == n * (n - 1) * (n - 2) // 6
    assert got.decisive == dec // 6
    assert got.cyclic == cyc // 3
    assert got.weak_cyclic == len(weak)


@pytest.mark.parametrize("spec, message", [
    ({"type": "max_word", "n": 3}, "unknown constraint type 'max_word'"),
    ({"type": "max_words"}, "needs 'n' as int"),
    ({"type": "max_words", "n": 0}, "needs n >= 1"),
    ({"type": "max_words", "n": True}, "needs 'n' as int"),
    ({"type": "keywords", "words": []}, "non-empty 'words'"),
    ({"type": "keywords", "words": ["two words"]}, "is not a single word"),
    ({"type": "end_with", "text": "  "}, "non-empty 'text'"),
    ({"type": "no_commas", "n": 2}, "unknown fields ['n']"),
    ("max_words", "an object with a string 'type'"),
])
def test_bad_constraints_are_named(spec, message):
  with pytest.raises(ValueError, match="prompts.jsonl:7") as e:
    vf.parse_constraint(spec, "prompts.jsonl:7")
  assert message in str(e.value)


def test_bad_prompt_rows_are_named():
  good = [{"type": "no_commas"}, {"type": "lowercase"}, {"type": "title"}]
  with pytest.raises(ValueError, match="row 2: missing 'constraints'"):
    vf.constraints_from_records([{"prompt": "a", "constraints": good}, {"prompt": "b"}])
  with pytest.raises(ValueError, match="at least 3 constraints"):
    vf.constraints_from_records([{"prompt": "a", "constraints": good[:2]}])
  with pytest.raises(ValueError, match="appears earlier with other constraints"):
    vf.constraints_from_records([{"prompt": "a", "constraints": good},
                                 {"prompt": "a ", "constraints": good[::-1]}])


WORDS = ("write about rain in three words yes no sun the hot - Stay dry. , <<T>>").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  import transformers
  path = tiny_hf.make_tiny_tokenizer(str(tmp_path_factory.mktemp("vtok")), WORDS)
  return transformers.AutoTokenizer.from_pretrained(path)


def _rows(tokenizer, texts, width):
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  tok = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), bool)
  for r, s in enumerate(ids):
    tok[r, :len(s)], mask[r, :len(s)] = s, True
  return tok, mask


def test_oracle_on_token_batches_equals_the_text_preference(tokenizer):
  prompt = "write about rain in three words"
  specs = [{"type": "max_words", "n": 3}, {"type": "keywords", "words": ["rain"]},
           {"type": "forbidden_words", "words": ["hot"]}]
  oracle = vf.VerifiableOracle(tokenizer, vf.constraints_from_records(
      [{"prompt": prompt, "constraints": specs}]))
  p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  oracle.register_conversations([p_ids], [(("user", prompt),)])
  texts = ["rain rain rain", "hot sun", "the rain the hot sun", "yes", "rain"]
  pairs = list(itertools.product(range(len(texts)), repeat=2))
  a_tok, a_mask = _rows(tokenizer, [texts[i] for i, _ in pairs], 8)
  b_tok, b_mask = _rows(tokenizer, [texts[j] for _, j in pairs], 8)
  n = len(pairs)
  pt = np.tile(np.asarray(p_ids, np.int32), (n, 1))
  p = oracle.preference_prob(jnp.asarray(pt), jnp.ones_like(pt, bool), a_tok, a_mask, b_tok,
                             b_mask)
  assert p.dtype == jnp.float32
  want = [_ref_pref(specs, texts[i], texts[j]) for i, j in pairs]
  np.testing.assert_array_equal(np.asarray(p), want)
  with pytest.raises(ValueError, match="no constraints for prompt 'yes no'"):
    other = np.asarray([tokenizer("yes no", add_special_tokens=False)["input_ids"]], np.int32)
    oracle.preference_prob(other, np.ones_like(other, bool), a_tok[:1], a_mask[:1],
                           b_tok[:1], b_mask[:1])


def test_bundled_prompt_sets_parse_and_read_through_the_pipeline():
  tables = {}
  for split, path in instructions.FILES.items():
    rows = instructions.read_rows(split)
    assert {r["split"] for r in rows} == {split}
    tables[split] = vf.constraints_from_records(rows, path)
    assert len(tables[split]) == len(rows)
    # The prompt pipeline and the evaluation reader take the same files.
    records = prompts.read_prompt_file(path)
    assert [r.messages for r in records] == [(("user", r["prompt"]),) for r in rows]
    assert alpaca_eval.read_instructions(path)[0] == [r["prompt"] for r in rows]
  assert [len(tables[s]) for s in ("train", "eval")] == [220, 40]
  assert not set(tables["train"]) & set(tables["eval"])  # held out
  types = [c.type for t in tables.values() for cons in t.values() for c in cons]
  assert set(types) == set(vf.CONSTRAINT_FIELDS)


def test_game_statistics_on_a_condorcet_prompt_and_a_transitive_one():
  from onpo_jax.llm import verifiable_game  # pylint: disable=g-import-not-at-top
  cycle = vf.parse_constraints([{"type": "max_words", "n": 1},
                                {"type": "keyword_count", "word": "yes", "n": 3},
                                {"type": "no_commas"}], "test")
  chain = vf.parse_constraints([{"type": "max_words", "n": 1}, {"type": "no_commas"},
                                {"type": "lowercase"}], "test")
  out = verifiable_game.game_statistics(
      [cycle, chain], [["no,", "yes yes,,", "yes no no", "no,"], ["a", "a b", "A, b c"]])
  assert out["responses"] == 7 and out["distinct_responses"] == 6
  assert (out["triples"], out["decisive_triples"], out["cyclic_triples"],
          out["weak_cyclic_triples"]) == (2, 2, 1, 1)
  assert out["prompts_with_a_cycle"] == 0.5 and out["cyclic_fraction_per_prompt_mean"] == 0.5
  # "a" meets all three of its constraints; nothing else meets all of its own.
  assert out["all_satisfied"] == 1 / 7
  assert out["satisfied_by_type"]["lowercase"] == 2 / 3
