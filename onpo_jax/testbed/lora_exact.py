"""LoRA in the testbed's exact mode: ONPO rounds trained through low-rank adapters.

Exact-mode regressions (`testbed.exact`) have a unique minimiser over tables
(`exact.regression_solution`), so what a parameterisation of the policy must
reproduce is the policy table log π(y | x) after each round, not any parameter.
This module trains the same decoder through LoRA factors (Hu et al., arXiv
2106.09685, eq. 3: W = W0 + (α/r)·a @ b, `models.lora`) on the engine's own
exact path (`exact_backend.ExactRegression` with a `param_map`, `onpo_step`'s
two phases, Gauss–Newton in table space), next to full-parameter training and
the tabular shadow (`testbed.shadow`).

The trained tree is a pure dict

    {"adapters": {"layers.0.attn.q": {"a": ..., "b": ...}, ...},
     "full": {"embed": ..., "layers.0.attn_norm.scale": ..., ...}}

and `to_network` maps it onto the base's parameter state: every adapted kernel
becomes W0 + (α/r)·a@b, every leaf named in "full" is replaced by the trained
value (PEFT's `modules_to_save`), every other leaf is the frozen base. With
`train_rest=False`, "full" is empty and only the factors train (plain LoRA);
with `train_rest=True` it holds every leaf that no adapter covers (embeddings,
norms, lm_head), so that the adapted model's parameters are a superset of the
base's degrees of freedom once the ranks are full (`full_rank_config`).

`TableRounds` runs T exact rounds of one method for a batch of seeds and keeps
every round's table, for either parameterisation, so two runs can be compared
table by table (`tests/test_lora_testbed.py`, `benchmarks/lora_testbed.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from onpo_jax.models import lora
from onpo_jax.testbed import shadow
from onpo_jax.testbed import trajectories


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key(path) -> str:
  """"layers.0.attn_norm.scale" of a tree path (the adapter tree's key convention)."""
  return lora.key_of(tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
                           for k in path))


def full_rank_config(base_params, *, dtype: str = "float64",
                     target_modules=lora.ALL_LINEAR) -> lora.LoraConfig:
  """A LoraConfig whose rank on every targeted module is min(in, out) of its kernel.

  At r = min(in, out) the product a@b (a: [in, r], b: [r, out]) reaches every
  [in, out] matrix, so W0 + a@b is any kernel: the adapted projections lose no
  degree of freedom against training the kernels themselves (Hu et al. §4.1
  note that LoRA then "roughly converges to training the original model").
  α = r on every module, so the scale α/r of eq. 3 is 1.

  Args:
    base_params: the base's parameter state (concrete or abstract).
    dtype: the adapters' dtype (float64 for exact mode's precision).
    target_modules: the projections to adapt (all seven by default).
  """
  shapes = {}
  for path, x in lora.flat_params(base_params).items():
    if len(path) == 4 and path[0] == "layers" and tuple(path[2:]) in lora.MODULE_OF:
      m = lora.MODULE_OF[tuple(path[2:])]
      n_in = lora.PROJECTIONS[m][1]
      shape = tuple(int(d) for d in x.shape)
      shapes[m] = min(math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  ranks = {m: shapes[m] for m in target_modules if m in shapes}
  return lora.LoraConfig(rank=1, alpha=1.0, target_modules=tuple(target_modules),
                         rank_pattern=ranks, alpha_pattern={m: float(r) for m, r in ranks.items()},
                         dtype=dtype)


def rank_config(rank: int, *, dtype: str = "float64",
                target_modules=lora.ALL_LINEAR) -> lora.LoraConfig:
  """Rank `rank` on every targeted module, α = r (scale 1, as `full_rank_config`)."""
  return lora.LoraConfig(rank=int(rank), alpha=float(rank), target_modules=tuple(target_modules),
                         dtype=dtype)


def rest_keys(base_params, config: lora.LoraConfig) -> tuple[str, ...]:
  """Keys of the leaves no adapter of `config` covers (embeddings, norms, lm_head)."""
  adapted = set(lora.targets(base_params, config))
  return tuple(k for k in (lora.key_of(p) for p in lora.flat_params(base_params))
               if k not in adapted)


def init_params(base_params, config: lora.LoraConfig, key, *, train_rest: bool) -> dict:
  """The trained tree at the start: fresh adapters (b = 0) and, with train_rest, the base's rest.

  `to_network` of it is the base exactly: a@b = 0 adds nothing, and the "full"
  leaves start at the base's values.

  Args:
    base_params: the base's parameter state (the SFT policy).
    config: the adapters' LoraConfig.
    key: PRNG key of the factors a (Kaiming-uniform, `lora.init_adapters`).
    train_rest: whether the leaves no adapter covers train too (PEFT
      `modules_to_save`); False is plain LoRA.

  Returns:
    {"adapters": adapter tree, "full": {key: array}} in config.dtype.
  """
  dtype = jnp.dtype(config.dtype)
  flat = {lora.key_of(p): x for p, x in lora.flat_params(base_params).items()}
  full = ({k: jnp.asarray(flat[k], dtype) for k in rest_keys(base_params, config)}
          if train_rest else {})
  return {"adapters": lora.init_adapters(base_params, config, key), "full": full}


def to_network(tree: dict, base_params, config: lora.LoraConfig):
  """The network's parameter state of a trained tree (`init_params`): pure, differentiable.

  Kernels: W0 + (α/r)·a@b (Hu et al. eq. 3, `lora.merge`, the base through
  stop_gradient); leaves in tree["full"]: the trained values; the rest: the
  frozen base. Gradients reach the factors and the "full" leaves only.
  """
  merged = lora.merge(base_params, tree["adapters"], config)
  full = tree["full"]
  if not full:
    return merged

  def one(path, leaf):
    k = _key(path)
    if k not in full:
      return leaf
    return leaf.replace(full[k]) if _is_var(leaf) else full[k]

  return jax.tree_util.tree_map_with_path(one, merged, is_leaf=_is_var)


@dataclasses.dataclass(frozen=True)
class LoraMap:
  """`ExactRegression(param_map=...)` of LoRA: (tree, inputs) -> the network's parameters.

  A frozen dataclass, so it hashes by value and a compiled solve is reused by
  every map with the same config. The frozen base of each seed is the fourth
  entry of the regression's `inputs` (after the prompts, masks and responses),
  so the seeds' bases are stacked and traced, not baked into the program.
  """
  config: lora.LoraConfig

  def __call__(self, tree, inputs):
    return to_network(tree, inputs[3], self.config)


class TableRounds:
  """T exact rounds of one method on the engine, keeping every round's policy table.

  The same driver as `trajectories.ExactRounds` (data from π_t, `Engine.train`
  with a Gauss–Newton `ExactRegression`, all seeds in one vmapped solve), for
  either parameterisation: full parameters (`lora_config=None`) or LoRA.

  Args:
    config: a seed's exact config (`exact_part.exact_config`): methods and
      step sizes.
    graphdef: the policy architecture.
    lora_config: None (full-parameter training) or the adapters' LoraConfig.
    train_rest: with LoRA, whether the leaves no adapter covers train too.
    tol, max_steps, residual_tol, stall_steps: the regressions' stopping rule
      (`ExactRegression`).
  """

  def __init__(self, config, graphdef, *, lora_config=None, train_rest: bool = False,
               tol: float, max_steps: int, residual_tol=None, stall_steps=None):
    self.config, self.lora_config, self.train_rest = config, lora_config, bool(train_rest)
    self.exact = trajectories.ExactRounds(
        config, graphdef, tol=tol, max_steps=max_steps, residual_tol=residual_tol,
        stall_steps=stall_steps, param_map=None if lora_config is None else LoraMap(lora_config))
    self.regression, self.engine = self.exact.regression, self.exact.engine

  def initial(self, starts, key=None):
    """(stacked trained tree, stacked regression inputs) at the seeds' SFT starts."""
    inputs = [tuple(s.world.inputs) for s in starts]
    stack = trajectories.stack_trees
    if self.lora_config is None:
      return stack([s.sft_params for s in starts]), stack(inputs)
    key = jax.random.key(0) if key is None else key
    trees = [init_params(s.sft_params, self.lora_config, jax.random.fold_in(key, i),
                         train_rest=self.train_rest) for i, s in enumerate(starts)]
    return stack(trees), stack([x + (s.sft_params,) for x, s in zip(inputs, starts)])

  def run(self, starts, name: str, num_rounds: int, *, key=None) -> list[dict]:
    """T rounds of `name` from each seed's SFT start, all seeds at once.

    Args:
      starts: the seeds' `world.Start`s (same architecture).
      name: a method of `shadow.SHADOW_METHODS` (e.g. 'onpo_two_step').
      num_rounds: T.
      key: PRNG key of the LoRA factors a (seed i uses fold_in(key, i)).

    Returns:
      Per seed: 'tables' [T+1, C, |Y|] (row 0 = the start), 'shadow' [T+1, C, |Y|]
      (the tabular shadow's iterates), 'tracking_kl' [T+1] (KL(network ‖
      shadow), mean over prompts), and per round [T] the worst regression
      'residual', 'grad_norm' and the total Gauss–Newton 'steps'.
    """
    params0, inputs = self.initial(starts, key)
    pref = jnp.stack([s.world.pref for s in starts])
    self.regression.inputs = inputs
    tables, per_round, _ = self.exact.train_rounds(name, params0, self.regression.table(params0),
                                                   pref, num_rounds)
    logp = np.asarray(jnp.stack(tables, axis=1))  # [S, T+1, C, |Y|]
    outs = []
    for i, s in enumerate(starts):
      tab = shadow.shadow_iterates(name, self.config, s.world.pref, s.sft_table, num_rounds)
      outs.append({"tables": logp[i], "shadow": np.asarray(tab),
                   "tracking_kl": np.asarray(shadow.tracking_kl(jnp.asarray(logp[i]), tab)),
                   **{k: v[i] for k, v in per_round.items()}})
    return outs


def max_table_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """max over prompts and responses of |log π_a − log π_b|, per round: [..., C, |Y|] -> [...]."""
  return np.max(np.abs(np.asarray(a) - np.asarray(b)), axis=(-2, -1))


def max_prob_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """max over prompts and responses of |π_a − π_b| of two log tables, per round."""
  return np.max(np.abs(np.exp(np.asarray(a)) - np.exp(np.asarray(b))), axis=(-2, -1))


def frozen_head_floor(base_params) -> float:
  """The lowest token log-probability a network with the base's final norm and lm_head can give.

  The logits are z = (s ∘ h/rms(h)) @ W with the final RMSNorm's scale s and
  the unembedding W [D, V] (`layers.rms_norm`: rms(h) = √(mean h² + ε), so
  ‖h/rms(h)‖ < √D). By Cauchy–Schwarz z_v' − z_v ≤ M_v'v = √D·‖s ∘ (W_v' − W_v)‖,
  hence log p(v) = −log Σ_v' exp(z_v' − z_v) ≥ −log(1 + Σ_{v'≠v} exp(M_v'v)).
  Adapters on the projections only change h, so no LoRA of any rank that
  leaves s and W frozen gets a token conditional below this floor.

  Returns:
    min over tokens v of −log(1 + Σ_{v'≠v} exp(M_v'v)) (nats, < 0).
  """
  flat = {lora.key_of(p): np.asarray(x, np.float64) for p, x in lora.flat_params(base_params).items()}
  w, s = flat["lm_head"], flat["final_norm.scale"]
  d, v = w.shape
  margins = np.sqrt(d) * np.linalg.norm(s[:, None, None] * (w[:, :, None] - w[:, None, :]),
                                        axis=0)  # [V, V]: M[v', v]
  return float(np.min(-np.log1p(np.sum(np.exp(margins), axis=0) - 1.0)))


def min_token_logprob(table: np.ndarray, responses: np.ndarray, vocab_size: int) -> np.ndarray:
  """The smallest token conditional log p(y_t | x, y_<t) a sequence table implies: [..., C, |Y|] -> [...].

  A table over every response of length L fixes each prefix's probability (the
  sum over its completions), so p(y_t | y_<t) = π(y_≤t)/π(y_<t). A network
  that produces the table must produce these conditionals; `frozen_head_floor`
  bounds what a frozen head can produce.

  Args:
    table: [..., C, |Y|] log π, responses in the order of `responses`.
    responses: [|Y|, L] int, every response (`env.enumerate_responses`).
    vocab_size: V.
  """
  table = np.asarray(table, np.float64)
  responses = np.asarray(responses)
  n_y, length = responses.shape
  pi = np.exp(table)
  worst = np.full(table.shape[:-2], np.inf)
  prev = np.sum(pi, axis=-1, keepdims=True)  # π(empty prefix) per prompt, [..., C, 1]
  prev_code = np.zeros(n_y, np.int64)
  for t in range(length):
    code = prev_code * vocab_size + responses[:, t]
    ids, inv = np.unique(code, return_inverse=True)
    marg = np.zeros(table.shape[:-1] + (len(ids),))
    for j in range(len(ids)):
      marg[..., j] = np.sum(pi[..., inv == j], axis=-1)
    # The parent of prefix j is the length-t prefix of any response carrying it.
    prefix_of = np.unique(prev_code, return_inverse=True)[1]
    first = np.array([np.argmax(inv == j) for j in range(len(ids))])
    parent_marg = prev[..., prefix_of[first]]
    cond = np.log(marg) - np.log(parent_marg)
    worst = np.minimum(worst, np.min(cond, axis=(-2, -1)))
    prev, prev_code = marg, code
  return worst


def onpo_solve_bound(pref, shadow_tables, eta: float, residual_tol: float) -> np.ndarray:
  """A first-order bound on max |π_network − π_shadow| after each round of ONPO two_step.

  Each regression stops at an excess loss ρ ≤ residual_tol over its tabular
  minimiser π* (`exact.regression_residual`). For the λ_p pair weights that
  excess is ρ = (2/C)·Σ_c Var_{π_t(·|c)}(d_c), d = log π_θ − log π* (the
  unordered pair (y, y') carries weight π_t(y)π_t(y')/C and the weights sum to
  ½), so per prompt Var_{π_t}(d) ≤ Cρ/2 and, with m = E_{π_t} d,
  |d_y − m| ≤ √(Cρ / (2π_t(y))). To first order in d, π_θ(y) − π*(y) =
  π*(y)(d_y − E_{π*} d), hence

      max_y |π_θ(y) − π*(y)| ≤ 2 · max_y π*(y)/√π_t(y) · √(Cρ/2).

  The aux regression of round t has π* = π'_{t+1}, the policy regression
  π* = π_{t+1}, both with data from π_t; the shadow's tables stand for them
  (they differ from the network's by what is bounded here). The bound after
  round t sums the bounds of the 2t regressions so far: first order, and
  assuming no amplification by the later targets (π'_t enters them with gain 1,
  π_t through η·r_t); a test checks that assumption on the full-parameter run.

  Args:
    pref: [C, |Y|, |Y|] the game.
    shadow_tables: [T+1, C, |Y|] log π_1..π_{T+1} of the shadow (`shadow.shadow_iterates`).
    eta: ONPO's η.
    residual_tol: ρ, each regression's residual tolerance.

  Returns:
    [T+1] the bound after each round (0 at the start).
  """
  from onpo_jax.tabular import exact as tabular_exact  # local: only this bound needs it

  logp = np.asarray(shadow_tables, np.float64)
  pref = np.asarray(pref, np.float64)
  c = logp.shape[1]
  out = np.zeros(logp.shape[0])
  for t in range(logp.shape[0] - 1):
    pi_t = np.exp(logp[t])
    r_t = np.asarray(tabular_exact.win_rate_vs_policy(pref, pi_t))
    # π_{t+1} ∝ π'_{t+1}·exp(η r_t), so π'_{t+1} ∝ π_{t+1}·exp(−η r_t).
    aux = logp[t + 1] - eta * r_t
    aux = aux - np.log(np.sum(np.exp(aux), axis=-1, keepdims=True))
    step = 0.0
    for target in (aux, logp[t + 1]):
      kappa = np.max(np.exp(target) / np.sqrt(pi_t))
      step += 2.0 * kappa * np.sqrt(c * residual_tol / 2.0)
    out[t + 1] = out[t] + step
  return out
