"""A pod's port plan: the blocks it needs, frozen into the pod at creation.

The plan travels in an annotation so that allocation depends only on the pod
itself: editing the InferenceDeployment later never changes what a running
pod was promised (I3), and a restarted operator needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.allocator import Assignment, BlockRequest
from berth.api.presets import EnvBinding, ResolvedBlock, ResolvedRole, port_env
from berth.names import ANNOTATION_PORT_PLAN


class PlanError(ValueError):
    """The pod's plan annotation is missing or unreadable."""


@dataclass(frozen=True)
class PortPlan:
    role: ResolvedRole
    first_rank: int

    def requests(self) -> list[BlockRequest]:
        return [BlockRequest(b.name, b.size, b.align) for b in self.role.blocks]

    def env(self, assignment: Assignment) -> dict[str, str]:
        """Env var name -> value, as the per-pod ConfigMap carries them."""
        return port_env(self.role, assignment.blocks, self.first_rank)

    def env_names(self) -> list[str]:
        return [binding.name for block in self.role.blocks for binding in block.env]

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
        return json.dumps({"firstRank": self.first_rank, "blocks": blocks}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> PortPlan:
        try:
            data: dict[str, Any] = json.loads(text)
            blocks = tuple(
                ResolvedBlock(
                    name=b["name"],
                    size=int(b["size"]),
                    align=int(b["align"]),
                    env=tuple(EnvBinding(n, v, int(p)) for n, v, p in b["env"]),
                )
                for b in data["blocks"]
            )
            return cls(ResolvedRole(blocks=blocks), int(data["firstRank"]))
        except (ValueError, KeyError, TypeError) as error:
            raise PlanError(f"unreadable {ANNOTATION_PORT_PLAN} annotation: {error}") from error

    @classmethod
    def of_pod(cls, annotations: Mapping[str, str]) -> PortPlan:
        text = annotations.get(ANNOTATION_PORT_PLAN)
        if text is None:
            raise PlanError(f"pod has no {ANNOTATION_PORT_PLAN} annotation")
        return cls.decode(text)
