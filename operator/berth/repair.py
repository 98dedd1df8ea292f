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

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from berth import audit, kube, metrics
from berth.allocation import AllocationService, audit_freed
from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.events import EventSink
from berth.kube import KubeApi
from berth.ledger.ledgers import Ledgers
from berth.ledger.records import Held, Holder, NodeLedger
from berth.names import ANNOTATION_PORTS, GROUP, VERSION, pod_ports_configmap
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


@dataclass(frozen=True)
class Conflict:
    """Ports on one node claimed by more than one pod."""

    node: str
    ports: PortRange
    #: Berth pods involved, and the pod not managed by Berth, if any.
    holders: tuple[Holder, ...]
    foreign: ForeignClaim | None = None

    @property
    def key(self) -> str:
        who = sorted(h.uid for h in self.holders) + ([self.foreign.uid] if self.foreign else [])
        return f"{self.node}:{self.ports}:{','.join(who)}"

    def describe(self) -> str:
        pods = [f"{h.namespace}/{h.pod}" for h in self.holders]
        if self.foreign:
            pods.append(f"{self.foreign.namespace}/{self.foreign.pod} (not managed by Berth)")
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
        conflicts: list[Conflict] = []
        dropped = 0
        for node in sorted(set(ledgers) | set(live)):
            pods = live.get(node, [])
            delivered = await self._delivered(node, pods)
            gone = await self._gone(ledgers.get(node), {p["metadata"]["uid"] for p in pods})
            if not delivered and not gone and node not in ledgers:
                continue
            repair, freed = await self.ledgers.repair(
                node, delivered, gone, self.view.pool_for(node)
            )
            self.allocation.report_repair(node, repair)
            audit_freed("reclaim", "owner gone", node, freed)
            self.allocation.forget(holder.uid for holder, _ in freed)
            for holder, _ in freed:
                self.on_change(holder.namespace, holder.deployment)
            dropped += len(freed)
            conflicts += delivered_conflicts(node, repair.conflicts, delivered)
        conflicts += foreign_conflicts(self.view.foreign_claims(), self.ledgers.cached())
        self._report(conflicts)
        metrics.RECLAIMED.inc(dropped)
        return dropped

    def check_foreign(self, node: str) -> None:
        """A pod Berth does not manage changed on ``node``: report new overlaps now."""
        ledger = self.ledgers.cached().get(node)
        if ledger is None:
            return
        found = foreign_conflicts(self.view.foreign_claims(node), {node: ledger})
        kept = [c for c in self._conflicts.values() if c.node != node or not c.foreign]
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
        for pool in pools:
            status = usage[pool.name].as_status(pool.metadata.get("generation"))
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
