"""Which port pool a node draws from: NodePortPools, else the default pool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from berth.allocator.ranges import PortRange
from berth.api.nodeportpool import NodePortPool


@dataclass(frozen=True)
class PoolConfig:
    """The ranges a node offers and the ports inside them Berth must not use."""

    name: str
    ranges: tuple[PortRange, ...]
    reserved: tuple[PortRange, ...] = ()

    @property
    def size(self) -> int:
        """Ports offered, reserved ones excluded."""
        total = sum(r.size for r in self.ranges)
        for span in _merge(self.reserved):
            for r in self.ranges:
                if span.overlaps(r):
                    total -= min(span.end, r.end) - max(span.start, r.start) + 1
        return total

    @classmethod
    def of(cls, pool: NodePortPool) -> PoolConfig:
        spec = pool.spec
        return cls(
            pool.name,
            tuple(sorted(r.to_range() for r in spec.ranges)),
            tuple(sorted(p.to_range() for p in spec.reserved or ())),
        )


#: Below the Linux ephemeral range (32768-60999) and the NodePort range
#: (30000-32767): the kernel never hands these ports to an outgoing connection.
DEFAULT_POOL = PoolConfig("default", (PortRange(20000, 29999),), ())


def _merge(spans: Sequence[PortRange]) -> list[PortRange]:
    merged: list[PortRange] = []
    for span in sorted(spans):
        if merged and span.start <= merged[-1].end + 1:
            last = merged[-1]
            merged[-1] = PortRange(last.start, max(last.end, span.end))
        else:
            merged.append(span)
    return merged


def pool_matches(pool: NodePortPool, node_labels: Mapping[str, str]) -> bool:
    """Whether the pool's node selector covers a node with these labels."""
    selector = pool.spec.node_selector
    return selector is None or selector.matches(node_labels)


def choose_pool(
    pools: Sequence[NodePortPool], node_labels: Mapping[str, str], default: PoolConfig
) -> PoolConfig:
    """The pool for a node: the matching pool with the highest priority (ties: the
    name that sorts first), or ``default`` when none matches."""
    matching = [p for p in pools if pool_matches(p, node_labels)]
    if not matching:
        return default
    best = min(matching, key=lambda p: (-p.spec.priority, p.name))
    return PoolConfig.of(best)
