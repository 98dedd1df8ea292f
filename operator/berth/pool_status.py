"""NodePortPool status: how many nodes a pool covers, its size, what is in use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from berth.api import NodePortPool
from berth.api.pools import PoolConfig
from berth.ledger.records import NodeLedger


@dataclass(frozen=True)
class PoolUsage:
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
    ledgers: Mapping[str, NodeLedger],
) -> dict[str, PoolUsage]:
    """Usage per pool name; ``pool_of_node`` says which pool each node draws from."""
    usage = {}
    for pool in pools:
        nodes = [node for node, name in pool_of_node.items() if name == pool.name]
        used = 0
        for node in nodes:
            ledger = ledgers.get(node)
            if ledger is not None:
                used += sum(a.ports() for a in ledger.pool.assignments())
        usage[pool.name] = PoolUsage(len(nodes), PoolConfig.of(pool).size, used)
    return usage
