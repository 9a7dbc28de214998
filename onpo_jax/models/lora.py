"""LoRA adapters over one frozen decoder, as pure functions of its parameter state.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv
2106.09685, eq. (3): h = W0 x + ΔW x = W0 x + B A x, with ΔW scaled by α/r
(§4.1). The decoder multiplies on the right (x @ W, kernels stored [in, out]),
so here the same update reads

    W = W0 + (α/r) · a @ b,   a: [in, r] (= Aᵀ),   b: [r, out] (= Bᵀ).

Kernels keep heads as their own axes (q: [D, H, d], o: [H, d, D]; see
`layers.py`), and so do the factors: `a` has the kernel's input axes plus r,
`b` has r plus its output axes, so a tensor-parallel rule that splits heads
splits the factors the same way. The adapter tree is a pure dict

    {"layers.0.attn.q": {"a": [D, r], "b": [r, H, d]},
     "layers.0.attn.o": {"a": [H, d, r], "b": [r, D]}, ...}

that any optax optimizer, `onpo_step`, orbax and `jax.grad` take as it is.
Roles over one base: the policy is an adapter tree, ONPO's auxiliary π' is
`onpo_step`'s copy of that tree, and the reference is the base alone
(`merge(base, None, ...)` is the base) or a fixed adapter tree.

`merge(base, adapters, config)` returns a parameter state of the base's
structure, so `nnx.merge(graphdef, merge(base, adapters, config))` is the
adapted model; the base enters through `stop_gradient`, so gradients reach `a`
and `b` only. A is drawn as PEFT draws it (Kaiming-uniform, bound 1/√in) and B
is zero, so a fresh adapter leaves the model unchanged.

Errors a run must meet before any work: `LoraConfigError` (a target module the
model lacks, a rank outside [1, min(in, out)]) and `BaseMismatchError`
(adapters restored onto another base: shapes or fingerprint differ). The PEFT
format and the base fingerprint live in `lora_io.py`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from onpo_jax.infra import checks
from onpo_jax.models.partitioning import logical_to_spec

# HF / PEFT module name -> (path inside a block, number of input axes of the
# kernel, HF parent module). The decoder has all seven in every block.
PROJECTIONS: dict[str, tuple[tuple[str, str], int, str]] = {
    "q_proj": (("attn", "q"), 1, "self_attn"),
    "k_proj": (("attn", "k"), 1, "self_attn"),
    "v_proj": (("attn", "v"), 1, "self_attn"),
    "o_proj": (("attn", "o"), 2, "self_attn"),
    "gate_proj": (("mlp", "gate"), 1, "mlp"),
    "up_proj": (("mlp", "up"), 1, "mlp"),
    "down_proj": (("mlp", "down"), 1, "mlp"),
}
ALL_LINEAR = tuple(PROJECTIONS)
# (sub-module, kernel) path inside a block -> PEFT module name.
MODULE_OF = {sub: name for name, (sub, _, _) in PROJECTIONS.items()}
DTYPES = ("float32", "bfloat16", "float64")
# Logical name of the rank axis: no sharding rule names it, so it is replicated
# (r is small; splitting it would add a collective to every merge).
RANK_AXIS = "lora_rank"


class LoraConfigError(ValueError):
  """A LoRA setting that cannot apply to this model (names the config field)."""


class BaseMismatchError(ValueError):
  """Adapters that belong to another base model (shapes or fingerprint differ)."""


def _pairs(value) -> tuple:
  items = dict(value or {}).items()
  return tuple(sorted((str(k), v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how (the `config.lora` section; PEFT's LoraConfig names).

  Attributes:
    rank: r, the inner width of each adapter (PEFT `r`).
    alpha: α; each update is scaled by α/r (PEFT `lora_alpha`).
    target_modules: projection names (`ALL_LINEAR`), or "all-linear".
    dropout: must be 0: dropout acts on the adapter's input activations
      (B A drop(x)), which merged weights never see.
    rank_pattern: {module name: rank} overriding `rank` (PEFT `rank_pattern`).
    alpha_pattern: {module name: α} overriding `alpha` (PEFT `alpha_pattern`).
    dtype: storage and merge dtype of the adapters (`config.lora.adapter_dtype`).
  """
  rank: int = 16
  alpha: float = 32.0
  target_modules: tuple[str, ...] = ALL_LINEAR
  dropout: float = 0.0
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  dtype: str = "float32"

  def __post_init__(self):
    targets = self.target_modules
    if isinstance(targets, str):
      targets = ALL_LINEAR if targets == "all-linear" else (targets,)
    object.__setattr__(self, "target_modules", tuple(dict.fromkeys(str(t) for t in targets)))
    object.__setattr__(self, "rank_pattern", _pairs(self.rank_pattern))
    object.__setattr__(self, "alpha_pattern", _pairs(self.alpha_pattern))
    if not self.target_modules:
      raise LoraConfigError("config.lora.target_modules: expected at least one module")
    for field, r in (("rank", self.rank),) + tuple(
        (f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern):
      if not checks.is_int(r, 1):
        raise LoraConfigError(f"config.lora.{field}: expected an int >= 1, got {r!r}")
    for field, a in (("alpha", self.alpha),) + tuple(
        (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern):
      if not checks.is_real(a) or not a > 0:
        raise LoraConfigError(f"config.lora.{field}: expected a finite number > 0, got {a!r}")
    for field, pattern in (("rank_pattern", self.rank_pattern),
                           ("alpha_pattern", self.alpha_pattern)):
      extra = [k for k, _ in pattern if k not in self.target_modules]
      if extra:
        raise LoraConfigError(f"config.lora.{field}: {extra} are not in target_modules "
                              f"{list(self.target_modules)}")
    if self.dropout != 0:
      raise LoraConfigError(
          f"config.lora.dropout: got {self.dropout!r}; adapters are merged into the weights "
          "(W0 + (α/r)·a@b), which never see the adapter's input activations that dropout "
          "acts on; use 0.0")
    if self.dtype not in DTYPES:
      raise LoraConfigError(
          f"config.lora.adapter_dtype: expected one of {DTYPES}, got {self.dtype!r}")

  def rank_of(self, module: str) -> int:
    """r of `module` (its `rank_pattern` entry, else `rank`)."""
    return int(dict(self.rank_pattern).get(module, self.rank))

  def scale_of(self, module: str) -> float:
    """α/r of `module`, as PEFT computes its `scaling`."""
    return float(dict(self.alpha_pattern).get(module, self.alpha)) / self.rank_of(module)

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "LoraConfig":
    """The LoraConfig of a `config.lora` section (`configs/llm_common.py`)."""
    get = section.get
    return cls(rank=get("rank", 16), alpha=get("alpha", 32.0),
               target_modules=get("target_modules", ALL_LINEAR),
               dropout=get("dropout", 0.0), rank_pattern=get("rank_pattern") or {},
               alpha_pattern=get("alpha_pattern") or {},
               dtype=get("adapter_dtype", "float32"))


class Target(NamedTuple):
  """One adapted kernel."""
  key: str  # adapter-tree key, e.g. "layers.0.attn.q"
  path: tuple  # its path in the parameter state, e.g. ("layers", 0, "attn", "q")
  module: str  # PEFT module name, e.g. "q_proj"
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  rank: int
  scale: float


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key_path(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _value(leaf):
  return leaf.get_value() if _is_var(leaf) else leaf


def flat_params(params) -> dict[tuple, Any]:
  """{state path: array-like} of a parameter state (nnx.State or pure dict)."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]
  return {_key_path(p): _value(x) for p, x in flat}


def key_of(path: tuple) -> str:
  """Adapter-tree key of a state path: ("layers", 0, "attn", "q") -> "layers.0.attn.q"."""
  return ".".join(str(p) for p in path)


def targets(base_params, config: LoraConfig) -> dict[str, Target]:
  """The kernels `config` adapts, checked against what the model really has.

  Works on abstract states (`jax.eval_shape` / `nnx.eval_shape`), so a run
  can check its config before loading any weight.

  Raises:
    LoraConfigError: a target module the model lacks, or a rank outside
      [1, min(in, out)] of a targeted kernel.
  """
  found: dict[str, list] = {}
  for path, x in flat_params(base_params).items():
    if len(path) == 4 and path[0] == "layers" and tuple(path[2:]) in MODULE_OF:
      found.setdefault(MODULE_OF[tuple(path[2:])], []).append((path, x))
  have = [m for m in PROJECTIONS if m in found]
  for m in config.target_modules:
    if m not in found:
      raise LoraConfigError(f"config.lora.target_modules: {m!r} is not a projection of this "
                            f"model; it has {', '.join(have)}")
  out = {}
  for m in config.target_modules:
    n_in = PROJECTIONS[m][1]
    r = config.rank_of(m)
    for path, x in sorted(found[m], key=lambda e: e[0][1]):
      shape = tuple(int(d) for d in x.shape)
      in_shape, out_shape = shape[:n_in], shape[n_in:]
      limit = min(math.prod(in_shape), math.prod(out_shape))
      if r > limit:
        field = f"rank_pattern[{m!r}]" if m in dict(config.rank_pattern) else "rank"
        raise LoraConfigError(
            f"config.lora.{field}: r={r} exceeds min(in, out) = {limit} of {m} "
            f"({math.prod(in_shape)} -> {math.prod(out_shape)}); at r = {limit} the update "
            f"already reaches every {m} matrix")
      key = key_of(path)
      out[key] = Target(key, path, m, in_shape, out_shape, r, config.scale_of(m))
  return out


def _fold(key, name: str):
  # A per-kernel stream keyed by its name: adding a target never redraws the others.
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def init_adapters(base_params, config: LoraConfig, key) -> dict:
  """A fresh adapter tree: a ~ U(±1/√in) as PEFT's Kaiming init, b = 0.

  Args:
    base_params: the base's parameter state (concrete or abstract).
    config: what to adapt.
    key: a jax PRNG key.

  Returns:
    {target key: {"a": in_shape + (r,), "b": (r,) + out_shape}} in config.dtype.
  """
  dtype = jnp.dtype(config.dtype)
  out = {}
  for t in targets(base_params, config).values():
    fan_in = math.prod(t.in_shape)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(_fold(key, t.key), t.in_shape + (t.rank,), jnp.float32,
                           -bound, bound)
    out[t.key] = {"a": a.astype(dtype), "b": jnp.zeros((t.rank,) + t.out_shape, dtype)}
  return out


def check_adapters(base_params, adapters: Mapping, config: LoraConfig) -> dict[str, Target]:
  """Checks that `adapters` fit this base and config; returns the targets.

  Raises:
    LoraConfigError: adapters for other modules than config.lora.target_modules.
    BaseMismatchError: a factor's shape does not fit this base's kernel.
  """
  tgt = targets(base_params, config)
  missing, extra = sorted(set(tgt) - set(adapters)), sorted(set(adapters) - set(tgt))
  if missing or extra:
    raise LoraConfigError(
        f"config.lora.target_modules={list(config.target_modules)}: the adapters lack "
        f"{missing[:4]} and hold {extra[:4]}; they were made for other target modules")
  for k, t in tgt.items():
    want = {"a": t.in_shape + (t.rank,), "b": (t.rank,) + t.out_shape}
    for f, shape in want.items():
      got = tuple(adapters[k][f].shape)
      if got != shape:
        raise BaseMismatchError(
            f"adapters[{k!r}][{f!r}] has shape {got}; this base with rank {t.rank} needs "
            f"{shape}: the adapters belong to another base model or rank")
  return tgt


def merged_kernel(w, a, b, scale: float, dtype=None):
  """W0 + scale · a @ b (Hu et al. eq. 3), in the adapter dtype, cast to `dtype`.

  Args:
    w: the frozen kernel, in_shape + out_shape (any dtype, e.g. bfloat16).
    a: in_shape + (r,).
    b: (r,) + out_shape.
    scale: α/r.
    dtype: result dtype; None keeps w's dtype (the model's parameter dtype).
  """
  compute = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), w.dtype)
  # The rank-r product at full precision: accelerators would otherwise round
  # f32 operands to bf16 passes, and this product is small.
  delta = jnp.tensordot(a.astype(compute), b.astype(compute), axes=1,
                        precision=jax.lax.Precision.HIGHEST)
  out = jax.lax.stop_gradient(w).astype(compute) + jnp.asarray(scale, compute) * delta
  return out.astype(w.dtype if dtype is None else dtype)


def merge(base_params, adapters: Mapping | None, config: LoraConfig, *, dtype=None):
  """The base's parameter state with each targeted kernel replaced by W0 + (α/r)·a@b.

  Args:
    base_params: nnx.State of the base (or a pure dict), frozen: every leaf
      enters through stop_gradient. May be stored in bfloat16.
    adapters: an adapter tree (`init_adapters`), or None for the base itself
      (the reference).
    config: the LoraConfig the adapters were made with.
    dtype: dtype of the merged kernels; None keeps the base's. A bfloat16
      kernel drops an update below its spacing; with a bfloat16 compute dtype
      the layers round kernels to bfloat16 anyway (as they round full
      fine-tuning's float32 master weights), so only a float32 forward pass
      over a bfloat16 base needs dtype=float32.

  Returns:
    A tree of the base's structure: `nnx.merge(graphdef, merged)` is the model.
  """
  if adapters is None:
    return base_params
  tgt = check_adapters(base_params, adapters, config)
  by_path = {t.path: t for t in tgt.values()}

  def one(path, leaf):
    t = by_path.get(_key_path(path))
    w = _value(leaf)
    if t is None:
      new = jax.lax.stop_gradient(w)  # frozen like the kernels, so no gradient reaches the base
    else:
      f = adapters[t.key]
      new = merged_kernel(w, f["a"], f["b"], t.scale, dtype)
    return leaf.replace(new) if _is_var(leaf) else new

  return jax.tree_util.tree_map_with_path(one, base_params, is_leaf=_is_var)


def num_adapter_params(base_params, config: LoraConfig) -> int:
  """Σ r·(in + out) over the targeted kernels."""
  return sum(t.rank * (math.prod(t.in_shape) + math.prod(t.out_shape))
             for t in targets(base_params, config).values())


# ----------------------------------------------------------------- sharding


def _split_axes(kernel_axes, n_in: int, t: Target):
  is_spec = isinstance(kernel_axes, PartitionSpec)
  axes = tuple(kernel_axes) + (None,) * (len(t.in_shape + t.out_shape) - len(kernel_axes))
  rank = None if is_spec else RANK_AXIS
  a, b = (*axes[:n_in], rank), (rank, *axes[n_in:])
  return {"a": PartitionSpec(*a), "b": PartitionSpec(*b)} if is_spec else {"a": a, "b": b}


def adapter_axes(base_axes, base_params, config: LoraConfig) -> dict:
  """Per-factor axes of the adapter tree from the kernels' axes.

  Args:
    base_axes: a tree of the base's structure whose leaves are the kernels'
      logical names (tuples) or PartitionSpecs.
    base_params: the base state (for the targets).
    config: the LoraConfig.

  Returns:
    {key: {"a": in axes + (rank,), "b": (rank,) + out axes}}, the rank axis
    RANK_AXIS for names and None (replicated) for PartitionSpecs.
  """
  flat = jax.tree_util.tree_flatten_with_path(
      base_axes, is_leaf=lambda x: isinstance(x, (tuple, PartitionSpec)) or _is_var(x))[0]
  axes_of = {_key_path(p): _value(x) for p, x in flat}
  return {k: _split_axes(axes_of[t.path], PROJECTIONS[t.module][1], t)
          for k, t in targets(base_params, config).items()}


def adapter_shardings(base_state, config: LoraConfig, mesh, rules) -> dict:
  """NamedShardings of the adapter tree over `mesh`, from the kernels' logical names.

  Args:
    base_state: the base's nnx.State (its Params carry `out_sharding` names).
    config: the LoraConfig.
    mesh: the run's mesh.
    rules: logical -> mesh axis rules (`sharding.DEFAULT_RULES`).
  """
  names = jax.tree.map(lambda v: tuple(v.get_metadata().get("out_sharding")
                                       or (None,) * v.get_value().ndim),
                       base_state, is_leaf=_is_var)
  tgt = targets(base_state, config)
  out = {}
  for k, f in adapter_axes(names, base_state, config).items():
    t = tgt[k]
    shapes = {"a": t.in_shape + (t.rank,), "b": (t.rank,) + t.out_shape}
    out[k] = {n: NamedSharding(mesh, logical_to_spec(f[n], rules, dict(mesh.shape), shapes[n]))
              for n in ("a", "b")}
  return out
