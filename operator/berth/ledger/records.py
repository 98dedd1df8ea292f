"""A node's ledger as ConfigMap data: one key per holder, readable by humans.

Layout (``data`` of ConfigMap ``berth-ledger.<node>``)::

    pool:   "default 20000-29999 reserved=22000-22009"
    <uid>:  "<namespace> <pod> <deployment> <role> http=20000,nixl=20001-20008"

Pod UIDs never collide with ``pool``, and every value is a short line, so a
node holding hundreds of pods stays a few tens of KiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from berth.allocator import Assignment, NodePool
from berth.allocator.ranges import PortRange
from berth.api.pools import PoolConfig

POOL_KEY = "pool"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds an assignment: enough to find the pod and to audit it."""

    namespace: str
    pod: str
    uid: str
    deployment: str = ""
    role: str = ""


def encode_pool(pool: PoolConfig) -> str:
    ranges = ",".join(map(str, pool.ranges))
    reserved = ",".join(map(str, pool.reserved))
    return f"{pool.name} {ranges} reserved={reserved}"


def decode_pool(text: str) -> PoolConfig:
    name, ranges, reserved = text.split(" ")
    return PoolConfig(
        name, _parse_ranges(ranges), _parse_ranges(reserved.removeprefix("reserved="))
    )


def _parse_ranges(text: str) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(part) for part in text.split(",") if part)


@dataclass
class NodeLedger:
    """One node's allocations plus who holds them; the allocator stays pure."""

    node: str
    pool_config: PoolConfig
    pool: NodePool
    holders: dict[str, Holder]
    resource_version: str | None = None
    node_uid: str | None = None  # the Node that owns (and garbage-collects) the ledger

    @classmethod
    def empty(cls, node: str, pool_config: PoolConfig) -> NodeLedger:
        return cls(node, pool_config, NodePool(pool_config.ranges, pool_config.reserved), {})

    def encode(self) -> dict[str, str]:
        data = {POOL_KEY: encode_pool(self.pool_config)}
        for uid, text in self.pool.encode().items():
            h = self.holders[uid]
            data[uid] = f"{h.namespace} {h.pod} {h.deployment or '-'} {h.role or '-'} {text}"
        return data

    @classmethod
    def decode(
        cls, node: str, data: Mapping[str, str], resource_version: str | None = None
    ) -> NodeLedger:
        pool_config = decode_pool(data[POOL_KEY])
        holders: dict[str, Holder] = {}
        records: dict[str, str] = {}
        for uid, line in data.items():
            if uid == POOL_KEY:
                continue
            namespace, pod, deployment, role, blocks = line.split(" ", 4)
            holders[uid] = Holder(namespace, pod, uid, deployment.strip("-"), role.strip("-"))
            records[uid] = blocks
        pool = NodePool.decode(pool_config.ranges, pool_config.reserved, records)
        return cls(node, pool_config, pool, holders, resource_version)

    def held(self) -> list[tuple[Holder, Assignment]]:
        return [(self.holders[a.owner], a) for a in self.pool.assignments()]
