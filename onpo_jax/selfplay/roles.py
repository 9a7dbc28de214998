"""Roles of a self-play run and where each one's parameters live.

Four models take part in a round (docs/baselines.md, "Anchors"): the policy π
(trained), ONPO's auxiliary policy π' (kept inside `onpo_step`'s state, so it
follows the policy's placement), the frozen reference π_ref = SFT and the
frozen judge. Which mesh each role runs on and whether it waits in pinned host
memory between uses is configuration (`role_placements`), not code: the engine
and the backends only call `fetch` before a use and `park` after it.
"""

from __future__ import annotations

import dataclasses
import enum

import jax


class Role(enum.Enum):
  POLICY = "policy"
  AUX = "aux"
  REF = "ref"
  JUDGE = "judge"


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a role's parameters live.

  Attributes:
    mesh: the device mesh its computations run on (None: the default device).
    offload: keep the parameters in pinned host memory except while used.
  """

  mesh: jax.sharding.Mesh | None = None
  offload: bool = False


def to_memory(tree, kind: str):
  """Moves every array of `tree` to memory kind `kind` ('pinned_host' | 'device')."""
  def move(x):
    if not isinstance(x, jax.Array):
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(kind))
  return jax.tree.map(move, tree)


def park(tree, placement: Placement):
  """`tree` where it waits between uses (pinned host memory when offloaded)."""
  return to_memory(tree, "pinned_host") if placement.offload else tree


def fetch(tree, placement: Placement):
  """`tree` on device, ready for a computation."""
  return to_memory(tree, "device") if placement.offload else tree


def role_placements(config, mesh=None, judge_mesh=None) -> dict[Role, Placement]:
  """Placement of every role from a config with optional `ref.offload` / `judge.offload`.

  The auxiliary policy shares the policy's placement (it lives in the policy's
  optimizer state); the judge may run on its own mesh (on several hosts each
  host judges its share of a batch on its local devices).
  """
  offload = lambda section: bool(config.get(section, {}).get("offload", False))
  policy = Placement(mesh)
  return {Role.POLICY: policy, Role.AUX: policy, Role.REF: Placement(mesh, offload("ref")),
          Role.JUDGE: Placement(judge_mesh or mesh, offload("judge"))}
