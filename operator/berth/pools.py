"""Pools: the port ranges a node hands out from, which pool a node gets, and usage.

A NodePortPool (the API object) declares ranges, reserved ports and a node
selector; a node uses the matching pool with the highest priority, else the
operator's default pool. :class:`Pool` is that choice resolved to ranges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from berth.allocator import intervals
from berth.allocator.ranges import PortRange
from berth.api import NodePortPool


@dataclass(frozen=True)
class Pool:
    """The ranges a node offers and the ports inside them Berth must not use."""

    name: str
    ranges: tuple[PortRange, ...]
    reserved: tuple[PortRange, ...] = ()

    @property
    def size(self) -> int:
        """Ports offered, reserved ones excluded."""
        starts, ends = intervals.normalise(self.ranges)
        return intervals.total(*intervals.without(starts, ends, self.reserved))

    @classmethod
    def of(cls, pool: NodePortPool) -> Pool:
        spec = pool.spec
        return cls(
            pool.name,
            tuple(sorted(r.to_range() for r in spec.ranges)),
            tuple(sorted(p.to_range() for p in spec.reserved or ())),
        )


def pool_matches(pool: NodePortPool, node_labels: Mapping[str, str]) -> bool:
    """Whether the pool's node selector covers a node with these labels."""
    selector = pool.spec.node_selector
    return selector is None or selector.matches(node_labels)


def choose_pool(
    pools: Sequence[NodePortPool], node_labels: Mapping[str, str], default: Pool
) -> Pool:
    """The pool for a node: the matching pool with the highest priority (ties: the
    name that sorts first), or ``default`` when none matches."""
    matching = [p for p in pools if pool_matches(p, node_labels)]
    if not matching:
        return default
    best = min(matching, key=lambda p: (-p.spec.priority, p.name))
    return Pool.of(best)


@dataclass(frozen=True)
class PoolUsage:
    """What a NodePortPool's status reports: nodes it covers, its size, ports in use."""

    nodes: int
    ports: int
    used: int

    def as_status(self, generation: int | None) -> dict[str, int | None]:
        return {
            "observedGeneration": generation,
            "nodes": self.nodes,
            "ports": self.ports,
            "used": self.used,
        }


def pool_usage(
    pools: Iterable[NodePortPool],
    pool_of_node: Mapping[str, str],
    used_on_node: Mapping[str, int],
) -> dict[str, PoolUsage]:
    """Usage per pool name; ``pool_of_node`` says which pool each node draws from."""
    usage = {}
    for pool in pools:
        nodes = [node for node, name in pool_of_node.items() if name == pool.name]
        used = sum(used_on_node.get(node, 0) for node in nodes)
        usage[pool.name] = PoolUsage(len(nodes), Pool.of(pool).size, used)
    return usage
