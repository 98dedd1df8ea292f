"""The ledger layer: its ConfigMap encoding, and CAS retries between writers.

``CasStore`` keeps ConfigMap data with resourceVersions and refuses stale
writes exactly as the API server does; it stands in for the API server only
where the point is the retry logic, not the wire (integration tests cover that).
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from berth.allocator import BlockRequest, PoolExhausted
from berth.allocator.ranges import PortRange
from berth.ledger.ledgers import Ledgers
from berth.ledger.records import Holder, NodeLedger, decode_pool, encode_pool
from berth.ledger.store import LedgerConflict
from berth.pools import Pool

POOL = Pool("gpu", (PortRange(20000, 20099),), (PortRange(20010, 20019),))
REQUEST = [BlockRequest("http", 1), BlockRequest("nixl", 8)]


class CasStore:
    def __init__(self) -> None:
        self.data: dict[str, tuple[str, dict[str, str]]] = {}
        self.versions = itertools.count(1)
        self.writes = 0
        self.conflicts = 0

    async def load(self, node: str) -> NodeLedger | None:
        await asyncio.sleep(0)
        if node not in self.data:
            return None
        version, data = self.data[node]
        return NodeLedger.decode(node, data, version)

    async def save(self, ledger: NodeLedger, node_uid: str | None = None) -> None:
        await asyncio.sleep(0)  # let other writers interleave
        current = self.data.get(ledger.node)
        if (current[0] if current else None) != ledger.resource_version:
            self.conflicts += 1
            raise LedgerConflict("stale")
        version = str(next(self.versions))
        self.data[ledger.node] = (version, ledger.encode())
        ledger.resource_version = version
        self.writes += 1

    async def list(self) -> list[NodeLedger]:
        return [
            NodeLedger.decode(node, data, version) for node, (version, data) in self.data.items()
        ]


def holder(i: int) -> Holder:
    return Holder("ns", f"pod-{i}", f"uid-{i}", "dep", "decode")


def test_pool_line_round_trips() -> None:
    assert decode_pool(encode_pool(POOL)) == POOL
    bare = Pool("default", (PortRange(20000, 29999),))
    assert decode_pool(encode_pool(bare)) == bare


def test_ledger_encoding_round_trips_and_stays_small() -> None:
    ledger = NodeLedger.empty("node-a", Pool("default", (PortRange(20000, 29999),)))
    for i in range(300):
        ledger.allocator.allocate(f"uid-{i}", REQUEST)
        ledger.holders[f"uid-{i}"] = holder(i)
    data = ledger.encode()
    again = NodeLedger.decode("node-a", data)
    assert again.encode() == data
    assert [a for _, a in again.held()] == [a for _, a in ledger.held()]
    assert again.holders == ledger.holders
    assert sum(len(k) + len(v) for k, v in data.items()) < 64 * 1024  # far below 1 MiB


async def test_allocation_is_idempotent_per_pod() -> None:
    store = CasStore()
    ledgers = Ledgers(store)  # type: ignore[arg-type]
    first = await ledgers.allocate("node-a", holder(1), REQUEST, POOL)
    again = await ledgers.allocate("node-a", holder(1), REQUEST, POOL)
    assert first.fresh and not again.fresh
    assert again.assignment == first.assignment
    assert store.writes == 1


async def test_two_writers_on_one_node_never_share_a_port() -> None:
    """Two operator processes with their own caches: CAS makes one of them retry."""
    store = CasStore()
    a, b = Ledgers(store), Ledgers(store)  # type: ignore[arg-type]
    await a.allocate("node-a", holder(0), REQUEST, POOL)  # both caches go stale below
    await b.allocate("node-a", holder(99), REQUEST, POOL)
    results = await asyncio.gather(
        *((a if i % 2 else b).allocate("node-a", holder(i), REQUEST, POOL) for i in range(1, 9))
    )
    assert store.conflicts > 0
    ledger = await store.load("node-a")
    assert ledger is not None
    held = sorted(r for _, asg in ledger.held() for r in asg.blocks.values())
    for left, right in itertools.pairwise(held):
        assert left.end < right.start
    assert {r.holder.uid for r in results} <= set(ledger.holders)


async def test_release_frees_exactly_and_exhaustion_is_typed() -> None:
    store = CasStore()
    ledgers = Ledgers(store)  # type: ignore[arg-type]
    big = [BlockRequest("all", 80)]
    await ledgers.allocate("node-a", holder(1), big, POOL)
    with pytest.raises(PoolExhausted) as error:
        await ledgers.allocate("node-a", holder(2), big, POOL)
    assert error.value.requested == 80
    freed = await ledgers.release("node-a", ["uid-1", "uid-unknown"])
    assert [h.uid for h, _ in freed] == ["uid-1"]
    again = await ledgers.allocate("node-a", holder(2), big, POOL)
    assert again.fresh


async def test_pool_change_keeps_live_allocations(caplog: pytest.LogCaptureFixture) -> None:
    store = CasStore()
    ledgers = Ledgers(store)  # type: ignore[arg-type]
    first = await ledgers.allocate("node-a", holder(1), REQUEST, POOL)
    moved = Pool("gpu", (PortRange(21000, 21099),))
    second = await ledgers.allocate("node-a", holder(2), REQUEST, moved)
    # Reported, not dropped: the log names the pod whose ports the pool left.
    assert "pool gpu no longer covers the ports of ns/pod-1" in caplog.text
    ledger = await store.load("node-a")
    assert ledger is not None and ledger.pool == moved
    assert ledger.allocator.get("uid-1") == first.assignment  # never moved
    assert all(r.start >= 21000 for r in second.assignment.blocks.values())
