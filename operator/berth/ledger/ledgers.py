"""The operator's view of every node's ledger: a cache in front of CAS writes.

The cache only saves reads. Each change is computed on the cached state and
written with its resourceVersion; on conflict the node is re-read and the
change recomputed, so a stale cache (another replica, a restart) can cost a
retry but never a double allocation (I4, I5 in docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from berth import metrics
from berth.allocator import AllocationConflict, Assignment, BlockRequest, PoolExhausted
from berth.allocator.ranges import PortRange
from berth.ledger.records import Held, Holder, NodeLedger, Repair
from berth.ledger.store import LedgerConflict
from berth.pools import Pool

T = TypeVar("T")
log = logging.getLogger("berth.ledger")

MAX_ATTEMPTS = 8


class LedgerBusy(Exception):
    """Too many concurrent writers on one node; the caller retries later."""


@dataclass(frozen=True)
class Allocation:
    holder: Holder
    assignment: Assignment
    pool: Pool
    fresh: bool  # False when the holder already had it (idempotent replay)
    repair: Repair = field(default_factory=Repair)


class _Pending:
    """One queued change to a node's ledger and, once applied, its outcome."""

    def __init__(
        self,
        change: Callable[[NodeLedger], tuple[Any, bool]],
        pool: Pool | None,
        node_uid: str | None,
    ) -> None:
        self.change = change
        self.pool = pool
        self.node_uid = node_uid
        self.settled = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self, ledger: NodeLedger) -> bool:
        """Apply to ``ledger``; True when it changed. Its own errors (a full
        pool) are its outcome, not the batch's."""
        self.settled, self.error = True, None
        try:
            self.result, dirty = self.change(ledger)
        except (PoolExhausted, AllocationConflict) as error:
            self.error = error
            return False
        return bool(dirty)

    def fail(self, error: BaseException) -> None:
        self.settled, self.error = True, error


class LedgerStorage(Protocol):
    """Where ledgers persist: ConfigMaps (store.py), or a dict in unit tests."""

    async def load(self, node: str) -> NodeLedger | None: ...
    async def list(self) -> list[NodeLedger]: ...
    async def save(self, ledger: NodeLedger, node_uid: str | None = None) -> None: ...
    def reference(self, node: str) -> dict[str, Any]: ...


class Ledgers:
    def __init__(self, store: LedgerStorage) -> None:
        self._store = store
        self._cache: dict[str, NodeLedger] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._queues: dict[str, list[_Pending]] = {}
        #: node -> how many times this process wrote its ledger
        self._saves: dict[str, int] = {}

    def reference(self, node: str) -> dict[str, Any]:
        """The node's ledger ConfigMap, as much of it as an Event needs."""
        return self._store.reference(node)

    def cached(self) -> dict[str, NodeLedger]:
        """The last state seen of every node (for reports, never for decisions)."""
        return dict(self._cache)

    async def allocate(
        self,
        node: str,
        holder: Holder,
        requests: Sequence[BlockRequest],
        pool: Pool,
        *,
        avoid: Sequence[PortRange] = (),
        delivered: Callable[[], Sequence[Held]] = list,
        own: Assignment | None = None,
        node_uid: str | None = None,
    ) -> Allocation:
        """The holder's blocks on ``node``: already delivered or held, or newly carved out.

        ``delivered`` (the assignments live pods on the node were given) is
        folded into a ledger this process has not verified yet (first read,
        re-read after a conflict, found missing), so that a ledger lost or
        edited since never hands out a port a running pod listens on. Raises
        the allocator's PoolExhausted when the blocks cannot fit. ``own`` is
        what the holder was already delivered: it is recorded and returned,
        never replaced, even when it cannot be recorded (a conflict).
        """

        def change(ledger: NodeLedger) -> tuple[Allocation, bool]:
            facts = list(delivered()) if ledger.unverified else []
            if own is not None:
                facts.append((holder, own))
            repair = ledger.adopt_delivered(facts)
            ledger.unverified = False
            held = ledger.allocator.get(holder.uid) or own
            if held is not None:
                owner = ledger.holders.get(holder.uid, holder)
                return Allocation(owner, held, ledger.pool, False, repair), repair.changed
            if ledger.pool != pool:
                self._reconfigure(ledger, pool)
            unrecorded = [span for _, a, _ in repair.conflicts for span in a.blocks.values()]
            assignment = ledger.allocator.allocate(holder.uid, requests, [*avoid, *unrecorded])
            ledger.holders[holder.uid] = holder
            return Allocation(holder, assignment, pool, True, repair), True

        return await self._update(node, pool, change, node_uid)

    async def repair(
        self, node: str, delivered: Sequence[Held], gone: Collection[str], pool: Pool
    ) -> tuple[Repair, list[Held]]:
        """Fold ``delivered`` into the node's ledger and drop the holders in ``gone``.

        One CAS write for both; returns the repair and what was dropped.
        """

        def change(ledger: NodeLedger) -> tuple[tuple[Repair, list[Held]], bool]:
            dropped = _drop(ledger, gone)
            repair = ledger.adopt_delivered(delivered)
            ledger.unverified = False
            return (repair, dropped), repair.changed or bool(dropped)

        return await self._update(node, pool, change, None)

    @staticmethod
    def _reconfigure(ledger: NodeLedger, pool: Pool) -> None:
        """Take the node's current pool; live allocations never move, those now
        outside it stay held until their pods go."""
        outside = ledger.allocator.reconfigure(pool.ranges, pool.reserved)
        ledger.pool = pool
        for held in outside:
            owner = ledger.holders.get(held.owner)
            log.warning(
                "node %s: pool %s no longer covers the ports of %s; they stay held "
                "until the pod goes",
                ledger.node,
                pool.name,
                f"{owner.namespace}/{owner.pod}" if owner else held.owner,
            )

    async def release(self, node: str, uids: Collection[str]) -> list[tuple[Holder, Assignment]]:
        """Free what these holders hold on ``node``; returns what was freed."""

        def change(ledger: NodeLedger) -> tuple[list[Held], bool]:
            freed = _drop(ledger, uids)
            return freed, bool(freed)

        return await self._update(node, None, change, None)

    async def load_all(self) -> list[NodeLedger]:
        """Fresh state of every node from the API server (start-up, sweeps).

        A cached ledger the API server no longer has is dropped: the next
        change on its node reads it again (missing) and rebuilds it.
        """
        saves = dict(self._saves)
        ledgers = await self._store.list()
        listed = {ledger.node: ledger for ledger in ledgers}
        for node in set(self._cache) | set(listed):
            async with self._lock(node):
                if node in self._cache and self._saves.get(node) != saves.get(node):
                    # Written by us after the LIST began: the cache is newer,
                    # and taking the listed copy would only cost a conflict.
                    self._cache[node].unverified = True
                elif node in listed:
                    listed[node].unverified = True
                    self._cache[node] = listed[node]
                else:
                    self._cache.pop(node, None)
        return list(self._cache.values())

    def _lock(self, node: str) -> asyncio.Lock:
        return self._locks.setdefault(node, asyncio.Lock())

    async def _update(
        self,
        node: str,
        pool: Pool | None,
        change: Callable[[NodeLedger], tuple[T, bool]],
        node_uid: str | None,
    ) -> T:
        """Apply ``change`` and CAS-write it, re-reading on conflict.

        Changes queue per node; whoever holds the node's lock applies every
        queued change and writes them in one CAS, so a burst of pods on one
        node costs one ledger write, not one each. The API server arbitrates
        between processes.
        """
        mine = _Pending(change, pool, node_uid)
        self._queues.setdefault(node, []).append(mine)
        async with self._lock(node):
            if not mine.settled:
                await self._apply(node, self._queues.pop(node))
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[no-any-return]

    async def _apply(self, node: str, batch: list[_Pending]) -> None:
        pool = next((p.pool for p in batch if p.pool is not None), None)
        node_uid = next((p.node_uid for p in batch if p.node_uid), None)
        try:
            for _ in range(MAX_ATTEMPTS):
                ledger = await self._current(node, pool)
                if ledger is None:  # nothing recorded and nothing to allocate from
                    ledger = NodeLedger.empty(node, Pool("none", ()))
                    for pending in batch:
                        pending.run(ledger)
                    return
                dirty = False
                for pending in batch:
                    dirty |= pending.run(ledger)
                try:
                    if dirty:
                        await self._store.save(ledger, node_uid)
                        self._saves[node] = self._saves.get(node, 0) + 1
                except LedgerConflict:
                    metrics.LEDGER_CONFLICTS.inc()
                    self._cache.pop(node, None)  # re-read and recompute every change
                    continue
                return
            error: BaseException = LedgerBusy(f"ledger of node {node} kept changing under us")
        except BaseException as failure:
            error = failure
        # The cached copy may hold unsaved changes: drop it; the batch fails together.
        self._cache.pop(node, None)
        for pending in batch:
            pending.fail(error)

    async def _current(self, node: str, pool: Pool | None) -> NodeLedger | None:
        ledger = self._cache.get(node)
        if ledger is None:
            ledger = await self._store.load(node)
            if ledger is None and pool is not None:
                ledger = NodeLedger.empty(node, pool)
            if ledger is not None:
                ledger.unverified = True
                self._cache[node] = ledger
        return ledger


def _drop(ledger: NodeLedger, uids: Collection[str]) -> list[Held]:
    freed = []
    for uid in uids:
        assignment = ledger.allocator.release(uid)
        if assignment is not None:
            freed.append((ledger.holders.pop(uid), assignment))
    return freed
