"""The repair loop: make every ledger agree with what pods were delivered.

Like the repair loop of Kubernetes' NodePort allocator, it runs at start-up
(before any allocation) and on every sweep. The truth order is the one in
docs/design.md: the ports a live pod was delivered (its ``berth.dev/ports``
annotation, else its ``<pod>-ports`` ConfigMap) are facts; the ledger is a
record of them that may be lost, emptied or edited, and yields. Per node,
one CAS write adopts what the ledger lacks and drops what belongs to pods
that are gone or finished. Ports claimed twice (two delivered assignments,
or a delivered block and another pod's host port) are reported loudly:
Events on the pods, a PortConflict condition, the ``berth_port_conflicts``
metric and an audit line; they are handed to nobody else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from berth import audit, kube, metrics
from berth.agent.procfs import ports_of
from berth.allocation import AllocationService, audit_freed
from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.events import EventSink
from berth.kube import KubeApi
from berth.ledger.ledgers import Ledgers
from berth.ledger.records import Held, Holder, NodeLedger
from berth.names import ANNOTATION_PORTS, GROUP, VERSION, pod_ports_configmap
from berth.node_reports import ephemeral_overlaps
from berth.pods import (
    ForeignClaim,
    decode_ports,
    holder_of,
    is_terminated,
    node_of,
    owned_by,
    pod_reference,
)
from berth.pools import pool_usage
from berth.view import ClusterView

log = logging.getLogger("berth.repair")
#: Nodes repaired at once: enough to hide API latency, few enough not to flood it.
PARALLEL_NODES = 16


@dataclass(frozen=True)
class Conflict:
    """Ports on one node claimed by more than one pod."""

    node: str
    ports: PortRange
    #: Berth pods involved, and the pod not managed by Berth, if any.
    holders: tuple[Holder, ...]
    foreign: ForeignClaim | None = None
    #: A socket the node's agent reported ("TCP" or "UDP"), not the holder's.
    listener: str | None = None

    @property
    def outside(self) -> bool:
        """Claimed by something Berth does not manage (a pod or a listener)."""
        return self.foreign is not None or self.listener is not None

    @property
    def key(self) -> str:
        who = sorted(h.uid for h in self.holders) + ([self.foreign.uid] if self.foreign else [])
        who += [self.listener] if self.listener else []
        return f"{self.node}:{self.ports}:{','.join(who)}"

    def describe(self) -> str:
        pods = [f"{h.namespace}/{h.pod}" for h in self.holders]
        if self.foreign:
            pods.append(f"{self.foreign.namespace}/{self.foreign.pod} (not managed by Berth)")
        if self.listener:
            pods.append(f"a {self.listener} listener on the node that is not that pod's")
        return f"node {self.node} ports {self.ports} claimed by {' and '.join(pods)}"

    def pods(self) -> list[dict[str, Any]]:
        """Every pod involved, as much of it as an Event needs."""
        refs = [pod_reference(h.namespace, h.pod, h.uid) for h in self.holders]
        if self.foreign:
            refs.append(self.foreign.reference())
        return refs


@dataclass
class Repairer:
    client: KubeApi
    ledgers: Ledgers
    view: ClusterView
    allocation: AllocationService
    post_event: EventSink
    #: Called with (namespace, deployment) when a deployment's conflicts change.
    on_change: Callable[[str, str], None] = lambda namespace, deployment: None
    _conflicts: dict[str, Conflict] = field(default_factory=dict)

    def conflicts_of(self, namespace: str, deployment: str) -> list[str]:
        return [
            c.describe()
            for c in self._conflicts.values()
            if any(h.namespace == namespace and h.deployment == deployment for h in c.holders)
        ]

    async def sweep(self, relist: bool = True) -> int:
        """Repair every ledger, retry waiting pods, report pools; returns holdings dropped.

        ``relist=False`` trusts the view as it is: right after start-up filled
        it, listing again would only repeat the same LISTs.
        """
        if relist:
            await self.view.resync(self.client)
        dropped = await self.repair_all()
        await self.allocation.retry_waiting()
        await self.report_pools()
        return dropped

    async def repair_all(self) -> int:
        """One pass over every node with a ledger or a delivered pod."""
        ledgers = {ledger.node: ledger for ledger in await self.ledgers.load_all()}
        live: dict[str, list[Mapping[str, Any]]] = {}
        for pod in self.view.workers():
            node = node_of(pod)
            if node is not None and not is_terminated(pod):
                live.setdefault(node, []).append(pod)
        # Nodes are independent (one ledger each): repair several at once.
        slots = asyncio.Semaphore(PARALLEL_NODES)

        async def repair(node: str) -> tuple[int, list[Conflict]]:
            async with slots:
                return await self._repair_node(node, live.get(node, []), ledgers.get(node))

        nodes = sorted(set(ledgers) | {n for n in live if self.view.node_uid(n) is not None})
        log.info("repairing the ledgers of %d nodes", len(nodes))
        results = await asyncio.gather(*(repair(n) for n in nodes))
        conflicts = [c for _, found in results for c in found]
        conflicts += outside_conflicts(self.view, self.ledgers.cached())
        self._report(conflicts)
        dropped = sum(n for n, _ in results)
        metrics.RECLAIMED.inc(dropped)
        return dropped

    async def _repair_node(
        self, node: str, pods: Sequence[Mapping[str, Any]], ledger: NodeLedger | None
    ) -> tuple[int, list[Conflict]]:
        """Fold the node's delivered ports into its ledger, drop the gone; one CAS."""
        delivered = await self._delivered(node, pods)
        gone = await self._gone(ledger, {p["metadata"]["uid"] for p in pods})
        if not delivered and not gone and ledger is None:
            return 0, []
        repair, freed = await self.ledgers.repair(node, delivered, gone, self.view.pool_for(node))
        self.allocation.report_repair(node, repair)
        audit_freed("reclaim", "owner gone", node, freed)
        self.allocation.forget(holder.uid for holder, _ in freed)
        for holder, _ in freed:
            self.on_change(holder.namespace, holder.deployment)
        return len(freed), delivered_conflicts(node, repair.conflicts, delivered)

    def check_foreign(self, node: str) -> None:
        """A pod Berth does not manage, or the node's agent report, changed on
        ``node``: report new overlaps now (and forget those that are gone)."""
        ledger = self.ledgers.cached().get(node)
        if ledger is None:
            return
        found = outside_conflicts(self.view, {node: ledger}, node)
        kept = [c for c in self._conflicts.values() if c.node != node or not c.outside]
        self._report(kept + found)

    async def _delivered(self, node: str, pods: Sequence[Mapping[str, Any]]) -> list[Held]:
        """What the live pods on ``node`` were delivered: annotation, else ConfigMap."""
        known = {h.uid: (h, a) for h, a in self.allocation.delivered_on(node, pods)}
        for pod in pods:
            uid = pod["metadata"]["uid"]
            if uid not in known and not pod["metadata"].get("deletionTimestamp"):
                blocks = await self._configmap_delivery(pod)
                if blocks is not None:
                    holder = holder_of(pod)
                    known[uid] = (holder, Assignment(uid, blocks))
        return list(known.values())

    async def _configmap_delivery(self, pod: Mapping[str, Any]) -> dict[str, PortRange] | None:
        """The blocks the pod's ConfigMap delivers, when it was written but the
        pod's annotation was not (the operator stopped in between)."""
        meta = pod["metadata"]
        url = kube.path(
            "configmaps", namespace=meta["namespace"], name=pod_ports_configmap(meta["name"])
        )
        body = await self.client.get_or_none(url)
        if body is None or not owned_by(body, meta["uid"]):
            return None
        text = (body["metadata"].get("annotations") or {}).get(ANNOTATION_PORTS)
        try:
            return decode_ports(text) if text else None
        except ValueError:
            return None

    async def _gone(self, ledger: NodeLedger | None, live: set[str]) -> list[str]:
        """Holders whose pods are gone or finished, each confirmed with a GET.

        A pod created after the view's LIST must not lose the ports another
        replica just gave it; UIDs are never reused, so "gone" is final.
        """
        gone = []
        for holder, _ in ledger.held() if ledger else ():
            if holder.uid in live:
                continue
            pod = await self.client.get_or_none(
                kube.path("pods", namespace=holder.namespace, name=holder.pod)
            )
            if pod is None or pod["metadata"]["uid"] != holder.uid or is_terminated(pod):
                gone.append(holder.uid)
        return gone

    def _report(self, conflicts: Iterable[Conflict]) -> None:
        current = {c.key: c for c in conflicts}
        for key, conflict in current.items():
            if key in self._conflicts:
                continue
            message = f"port conflict: {conflict.describe()}"
            log.error("%s", message)
            for holder in conflict.holders:
                audit.record("conflict", holder, reason=message, node=conflict.node)
            for pod in conflict.pods():
                self.post_event(pod, type="Warning", reason="PortConflict", message=message)
        for conflict in {**self._conflicts, **current}.values():
            if (conflict.key in current) != (conflict.key in self._conflicts):
                for holder in conflict.holders:
                    self.on_change(holder.namespace, holder.deployment)
        self._conflicts = current
        metrics.PORT_CONFLICTS.set(len(current))

    async def report_pools(self) -> None:
        """Write each NodePortPool's Nodes/Ports/Used where they changed."""
        pools = self.view.pools()
        pool_of_node = {node: self.view.pool_for(node).name for node in self.view.nodes()}
        used = {node: ledger.used for node, ledger in self.ledgers.cached().items()}
        usage = pool_usage(pools, pool_of_node, used)
        overlaps: dict[str, list[str]] = {}
        for node in ephemeral_overlaps(self.view):
            overlaps.setdefault(pool_of_node.get(node, ""), []).append(node)
        for pool in pools:
            status: dict[str, Any] = {
                **usage[pool.name].as_status(pool.metadata.get("generation")),
                "ephemeralOverlap": sorted(overlaps.get(pool.name, ())) or None,
            }
            current = pool.status.model_dump(by_alias=True) if pool.status else {}
            if any(current.get(key) != value for key, value in status.items()):
                url = kube.path(
                    "nodeportpools",
                    name=pool.name,
                    group=GROUP,
                    version=VERSION,
                    subresource="status",
                )
                await self.client.merge_patch(url, {"status": status})


def delivered_conflicts(
    node: str, unrecorded: Iterable[tuple[Holder, Assignment, str]], delivered: Iterable[Held]
) -> list[Conflict]:
    """Conflicts between delivered assignments the ledger could not both record."""
    by_uid = {holder.uid: (holder, a) for holder, a in delivered}
    found = []
    for holder, assignment, other_uid in unrecorded:
        other = by_uid.get(other_uid)
        for span in assignment.blocks.values():
            clash = [s for s in (other[1].blocks.values() if other else ()) if s.overlaps(span)]
            if clash or other is None:
                start = max([span.start, *(s.start for s in clash)])
                end = min([span.end, *(s.end for s in clash)])
                holders = (holder,) if other is None else (holder, other[0])
                found.append(Conflict(node, PortRange(start, end), holders))
    return found


def foreign_conflicts(
    claims: Iterable[ForeignClaim], ledgers: Mapping[str, NodeLedger]
) -> list[Conflict]:
    """Host ports of other pods that fall inside blocks Berth's pods hold."""
    found = []
    for claim in claims:
        ledger = ledgers.get(claim.node)
        if ledger is None:
            continue
        for holder, assignment in ledger.held():
            for port in claim.ports:
                if any(port in span for span in assignment.blocks.values()):
                    found.append(Conflict(claim.node, PortRange(port, port), (holder,), claim))
    return found


def listener_conflicts(view: ClusterView, ledgers: Mapping[str, NodeLedger]) -> list[Conflict]:
    """Listeners a node's agent reported inside blocks held by pods that cannot
    own them: a pod without hostNetwork binds in its own network namespace,
    so a socket on its port in the host's is someone else's. (A hostNetwork
    pod's own engine is such a listener; telling it apart would take reading
    every process's sockets, which the agent is not privileged to do.)"""
    found = []
    for node, ledger in ledgers.items():
        report = view.node_report(node)
        if report is None:
            continue
        sockets = (("TCP", ports_of(report.tcp)), ("UDP", ports_of(report.udp)))
        for holder, assignment in ledger.held():
            pod = view.worker(holder.uid)
            if pod is None or (pod.get("spec") or {}).get("hostNetwork"):
                continue
            for span in assignment.blocks.values():
                for protocol, ports in sockets:
                    found += [
                        Conflict(node, PortRange(port, port), (holder,), listener=protocol)
                        for port in sorted(p for p in ports if p in span)
                    ]
    return found


def outside_conflicts(
    view: ClusterView, ledgers: Mapping[str, NodeLedger], node: str | None = None
) -> list[Conflict]:
    """Ports Berth's pods hold that something Berth does not manage claims too
    (on ``node``; every node: None)."""
    claims = view.foreign_claims(node)
    return foreign_conflicts(claims, ledgers) + listener_conflicts(view, ledgers)
