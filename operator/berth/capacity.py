"""Ports the scheduler can count: the extended resource ``berth.dev/ports``.

Berth allocates after the scheduler binds a pod, so the scheduler must know
how many ports a node can still give. Every node advertises
``berth.dev/ports`` in its status (capacity and allocatable, the documented
way to advertise an extended resource) and every worker pod requests its
plan's total in its first container: the scheduler binds a pod only where
the count fits, and a kubelet's admission agrees.

The figure is what first-fit can still serve, not the bare size: the pool's
ranges minus reserved ports, minus ports other pods hold (foreign claims)
and, with the node agent, ports something else listens on, minus free runs
too short for the largest block held on the nodes of that pool (they could
never take such a block). Pods' own holdings are not subtracted: the
scheduler counts their requests.
scripts/bench_fragmentation.py measures why the stranded runs matter.

Writes: a PATCH of ``nodes/<n>/status`` only when the figure changes. A
change caused by an allocation or a release is written right away (in the
background, folded per node, never in the allocation's own path) only when
the node is nearly full, where the exact figure decides; otherwise the next
sweep writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth import kube
from berth.allocator import intervals
from berth.allocator.blocks import Assignment
from berth.allocator.ranges import PortRange
from berth.coalesce import Coalescer
from berth.kube import KubeApi, KubeError
from berth.ledger.records import NodeLedger
from berth.pools import Pool

RESOURCE = "berth.dev/ports"
#: What the scheduler writes into a pod's PodScheduled condition when no node has room.
INSUFFICIENT = f"Insufficient {RESOURCE}"
log = logging.getLogger("berth.capacity")
Body = Mapping[str, Any]


def request_ports(container: dict[str, Any], count: int) -> None:
    """Make ``container`` request (and limit, as extended resources must) ``count`` ports."""
    resources = container.setdefault("resources", {})
    for kind in ("requests", "limits"):
        resources.setdefault(kind, {})[RESOURCE] = str(count)


def servable_ports(
    pool: Pool,
    held: Iterable[PortRange] = (),
    foreign: Iterable[PortRange] = (),
    largest_block: int = 1,
) -> int:
    """What a node can advertise: the ports Berth's pods hold, plus the free
    runs that can still take the largest block.

    ``held`` (from the ledger) stay in the figure: the scheduler subtracts
    their pods' requests itself. ``foreign`` (other pods' host ports, the
    node agent's listeners) count only where Berth holds nothing, so the
    engines' own listeners are not taken twice. A free run shorter than
    ``largest_block`` is stranded.
    """
    starts, ends = intervals.normalise(pool.ranges)
    starts, ends = intervals.without(starts, ends, pool.reserved)
    held_s, held_e = intervals.normalise(held)
    free_s, free_e = intervals.subtract(starts, ends, held_s, held_e)
    held_in_pool = intervals.total(starts, ends) - intervals.total(free_s, free_e)
    free_s, free_e = intervals.without(free_s, free_e, foreign)
    runs = (e - s + 1 for s, e in zip(free_s, free_e, strict=True))
    return held_in_pool + sum(run for run in runs if run >= largest_block)


def tight(have: int, want: int, used: int, largest_pod: int) -> bool:
    """Whether a change from ``have`` to ``want`` must be written now: the node
    has room for fewer than two of the largest pods, where the count decides
    whether the scheduler binds one more."""
    return min(have, want) - used < 2 * largest_pod


def declares_host_ports(pod: Body) -> bool:
    """Whether a pod's ports are host ports (a change to it may change a node's figure)."""
    spec = pod.get("spec") or {}
    return any(
        port.get("hostPort") or spec.get("hostNetwork")
        for container in spec.get("containers") or ()
        for port in container.get("ports") or ()
    )


#: Suffixes of whole quantities: the API server writes 10000 back as "10k".
_SUFFIXES = {"k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def parse_count(text: str) -> int | None:
    """A whole-number Kubernetes quantity (``16``, ``10k``); None for anything else."""
    digits = text.rstrip("kKMGi")
    factor = _SUFFIXES.get(text[len(digits) :], 1 if digits == text else 0)
    return int(digits) * factor if digits.isdigit() and factor else None


def published(node: Body) -> int | None:
    """The figure a node advertises now (None: none)."""
    value = ((node.get("status") or {}).get("allocatable") or {}).get(RESOURCE)
    return parse_count(str(value)) if value is not None else None


def status_patch(count: int | None) -> dict[str, Any]:
    """A merge patch of ``nodes/<n>/status`` setting (None: removing) the figure."""
    value = None if count is None else str(count)
    return {"status": {"capacity": {RESOURCE: value}, "allocatable": {RESOURCE: value}}}


def scheduler_waiting(pods: Iterable[Body]) -> list[str]:
    """The scheduler's messages for pods it cannot place for want of ``berth.dev/ports``."""
    found = []
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName"):
            continue
        for condition in (pod.get("status") or {}).get("conditions") or ():
            message = condition.get("message") or ""
            if condition.get("type") == "PodScheduled" and INSUFFICIENT in message:
                found.append(message)
    return found


@dataclass(frozen=True)
class Largest:
    block: int = 1
    pod: int = 1


class CapacityView(Protocol):
    """What the figure depends on, from memory (view.py)."""

    def nodes(self) -> list[str]: ...
    def pool_for(self, node: str) -> Pool: ...
    def avoided_ports(self, node: str) -> Sequence[PortRange]: ...


class LedgerCache(Protocol):
    def cached(self) -> dict[str, NodeLedger]: ...


def _assignments(ledger: NodeLedger | None) -> list[Assignment]:
    return list(ledger.allocator.assignments()) if ledger is not None else []


@dataclass
class NodeCapacity:
    """Keeps every node's advertised ``berth.dev/ports`` equal to what it can serve."""

    client: KubeApi
    view: CapacityView
    ledgers: LedgerCache
    #: Seconds to fold a burst of allocations on one node into one look.
    delay: float = 1.0
    #: node -> the figure it advertises, as last seen or written
    _published: dict[str, int | None] = field(default_factory=dict)
    #: pool name -> the largest block and the largest pod (ports) held on
    #: its nodes: what the pool's workloads ask for.
    _largest: dict[str, Largest] = field(default_factory=dict)
    _coalescer: Coalescer[str] | None = None

    def observe_node(self, event: str | None, body: Body) -> None:
        name = body["metadata"]["name"]
        if event == "DELETED":
            self._published.pop(name, None)
        else:
            self._published[name] = published(body)

    async def sync(self) -> None:
        """Start-up: read what every node advertises, then correct it where it differs."""
        async for node in self.client.iterate(kube.path("nodes")):
            self.observe_node(None, node)
        await self.refresh_all()

    async def refresh_all(self) -> None:
        """Every node, now (sweeps, pool changes)."""
        self._largest = {}  # the pods that held the largest may be gone
        for node, ledger in self.ledgers.cached().items():
            self._measure(node, ledger)
        for node in self.view.nodes():
            try:
                await self.refresh(node)
            except KubeError as error:  # e.g. RBAC: allocation works on, say so loudly
                log.error("cannot advertise %s on node %s: %s", RESOURCE, node, error)

    def ledger_changed(self, node: str) -> None:
        """An allocation or release on ``node``: look again soon, off the caller's path."""
        if self._coalescer is None:
            self._coalescer = Coalescer(self._refresh_if_tight, self.delay)
        self._coalescer.request(node)

    async def _refresh_if_tight(self, node: str) -> None:
        await self.refresh(node, only_if_tight=True)

    def desired(self, node: str) -> int:
        ledger = self.ledgers.cached().get(node)
        pool = self.view.pool_for(node)
        held = [span for a in _assignments(ledger) for span in a.blocks.values()]
        largest = self._measure(node, ledger)
        return servable_ports(pool, held, self.view.avoided_ports(node), largest.block)

    async def refresh(self, node: str, only_if_tight: bool = False) -> bool:
        """Write the node's figure if it changed; True when written.

        ``only_if_tight``: leave a change to the next sweep unless the node
        has less room than two of the largest pods, where it decides.
        """
        want = self.desired(node)
        have = self._published.get(node)
        if have == want:
            return False
        if only_if_tight and have is not None:
            used = sum(a.ports() for a in _assignments(self.ledgers.cached().get(node)))
            largest = self._largest.get(self.view.pool_for(node).name, Largest())
            if not tight(have, want, used, largest.pod):
                return False
        try:
            await self.client.merge_patch(
                kube.path("nodes", name=node, subresource="status"), status_patch(want)
            )
        except KubeError as error:
            if error.not_found:
                self._published.pop(node, None)
                return False
            raise
        log.info("node %s advertises %s=%d (was %s)", node, RESOURCE, want, have)
        self._published[node] = want
        return True

    def _measure(self, node: str, ledger: NodeLedger | None) -> Largest:
        """Fold the node's holdings into its pool's largest block and pod."""
        name = self.view.pool_for(node).name
        largest = self._largest.get(name, Largest())
        for assignment in _assignments(ledger):
            sizes = [span.size for span in assignment.blocks.values()]
            largest = Largest(max([largest.block, *sizes]), max(largest.pod, sum(sizes)))
        self._largest[name] = largest
        return largest

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()


async def remove_all(client: KubeApi) -> list[str]:
    """Uninstall: take ``berth.dev/ports`` off every node that advertises it."""
    removed = []
    async for node in client.iterate(kube.path("nodes")):
        status = node.get("status") or {}
        if any(RESOURCE in (status.get(key) or {}) for key in ("capacity", "allocatable")):
            name = node["metadata"]["name"]
            await client.merge_patch(
                kube.path("nodes", name=name, subresource="status"), status_patch(None)
            )
            removed.append(name)
    return removed
