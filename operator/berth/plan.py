"""A pod's port plan: the blocks it needs and how each block reaches the engine.

An engine preset (berth.engines) turns a role into a :class:`RolePlan`; a
pod's :class:`PortPlan` adds the first data-parallel rank it holds. The plan
is frozen into the pod at creation (annotation ``berth.dev/port-plan``), so
allocation depends only on the pod and editing the InferenceDeployment never
changes what a running pod was promised (I3 in docs/design.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from berth.allocator import Assignment, BlockRequest
from berth.allocator.ranges import PortRange
from berth.api import RoleSpec
from berth.names import ANNOTATION_PORT_PLAN

EnvValue = Literal["start", "rankBase"]
GroupSource = Literal["leaderAddress", "leaderBlock", "firstRank"]


class PlanError(ValueError):
    """A plan that cannot be read, or whose ports cannot be turned into env."""


@dataclass(frozen=True)
class EnvBinding:
    """An env var carrying a block's port: its first port, or the rank base.

    ``value == "rankBase"`` yields ``blockStart - firstGlobalRank * ports_per_rank``:
    engines add the *global* DP rank to a base port, so a pod holding ranks
    ``s..`` must get a base that lands rank ``s`` on its block's first port.
    """

    name: str
    value: EnvValue
    ports_per_rank: int = 0

    def port(self, span: PortRange, first_rank: int) -> int:
        if self.value == "start":
            return span.start
        return span.start - first_rank * self.ports_per_rank


@dataclass(frozen=True)
class PlanBlock:
    """A block a pod needs: ``size`` contiguous ports, first one a multiple of ``align``."""

    name: str
    size: int
    align: int = 1
    env: tuple[EnvBinding, ...] = ()


@dataclass(frozen=True)
class GroupEnv:
    """Env a pod of a DP group that spans pods takes from its group.

    ``leaderAddress``: the address of the group's leader (the pod holding rank
    0: ``status.hostIP`` with hostNetwork, else ``status.podIP``);
    ``leaderBlock``: the first port of the leader's block ``block``;
    ``firstRank``: the pod's own first global DP rank. The leader gets its own
    values, so one set of args serves every pod of the role.
    """

    name: str
    source: GroupSource
    block: str = ""


@dataclass(frozen=True)
class RolePlan:
    """The port side of every pod of one role: blocks, bind-address and fixed env."""

    blocks: tuple[PlanBlock, ...]
    #: Env vars that get the pod's own IP from the downward API.
    bind_address_env: tuple[str, ...] = ()
    #: Fixed env vars the preset needs.
    static_env: dict[str, str] = field(default_factory=dict)
    #: Informational (not frozen into pods, so not compared): the preset and
    #: the rule set applied, e.g. ``>=0.11.1``.
    preset: str = field(default="custom", compare=False)
    rules: str = field(default="", compare=False)
    #: Env the operator fills from the pod's DP group (multi-pod groups only).
    group_env: tuple[GroupEnv, ...] = ()
    #: Ports the preset cannot pin, for the deployment's status (not frozen).
    warnings: tuple[str, ...] = field(default=(), compare=False)


def first_global_rank(role: RoleSpec, pod_index: int) -> int:
    """The first global DP rank pod ``pod_index`` of the role holds."""
    if pod_index < 0:
        raise ValueError(f"pod index must be >= 0, not {pod_index}")
    return (pod_index % role.pods_per_group) * role.dp_local


@dataclass(frozen=True)
class PortPlan:
    """One pod's plan: its role's blocks plus the first DP rank it holds."""

    role: RolePlan
    first_rank: int

    def requests(self) -> list[BlockRequest]:
        return [BlockRequest(b.name, b.size, b.align) for b in self.role.blocks]

    def env_names(self) -> list[str]:
        return [binding.name for block in self.role.blocks for binding in block.env]

    def env(self, assignment: Assignment) -> dict[str, str]:
        """Env var name -> port (as text), as the per-pod ConfigMap carries them."""
        env: dict[str, str] = {}
        for block in self.role.blocks:
            span = assignment.blocks.get(block.name)
            if span is None:
                raise PlanError(f"no ports assigned for block {block.name!r}")
            if span.size < block.size:
                raise PlanError(
                    f"block {block.name!r} needs {block.size} ports, got {span} ({span.size})"
                )
            for binding in block.env:
                port = binding.port(span, self.first_rank)
                if port < 1:
                    raise PlanError(
                        f"{binding.name}: rank base {span.start} - {self.first_rank} x "
                        f"{binding.ports_per_rank} = {port} is not a port; give the node a "
                        "pool with higher ports or size the block perGlobalDataParallelRank"
                    )
                env[binding.name] = str(port)
        return env

    def group_env_names(self) -> list[str]:
        return [g.name for g in self.role.group_env]

    def group_env(self, leader: Assignment, leader_address: str) -> dict[str, str]:
        """The group env of this pod, given its group leader's assignment and address."""
        env: dict[str, str] = {}
        for group in self.role.group_env:
            if group.source == "leaderAddress":
                env[group.name] = leader_address
            elif group.source == "firstRank":
                env[group.name] = str(self.first_rank)
            else:
                span = leader.blocks.get(group.block)
                if span is None:
                    raise PlanError(f"the group leader has no block {group.block!r}")
                env[group.name] = str(span.start)
        return env

    def encode(self) -> str:
        blocks = [
            {
                "name": b.name,
                "size": b.size,
                "align": b.align,
                "env": [[e.name, e.value, e.ports_per_rank] for e in b.env],
            }
            for b in self.role.blocks
        ]
        data: dict[str, Any] = {"firstRank": self.first_rank, "blocks": blocks}
        if self.role.group_env:  # absent from older pods' plans, which decode as before
            data["groupEnv"] = [[g.name, g.source, g.block] for g in self.role.group_env]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> PortPlan:
        try:
            data: dict[str, Any] = json.loads(text)
            blocks = tuple(
                PlanBlock(
                    name=b["name"],
                    size=int(b["size"]),
                    align=int(b["align"]),
                    env=tuple(EnvBinding(n, v, int(p)) for n, v, p in b["env"]),
                )
                for b in data["blocks"]
            )
            group = tuple(GroupEnv(n, s, b) for n, s, b in data.get("groupEnv", ()))
            return cls(RolePlan(blocks=blocks, group_env=group), int(data["firstRank"]))
        except (ValueError, KeyError, TypeError) as error:
            raise PlanError(f"unreadable {ANNOTATION_PORT_PLAN} annotation: {error}") from error

    @classmethod
    def of_pod(cls, annotations: Mapping[str, str]) -> PortPlan:
        text = annotations.get(ANNOTATION_PORT_PLAN)
        if text is None:
            raise PlanError(f"pod has no {ANNOTATION_PORT_PLAN} annotation")
        return cls.decode(text)
