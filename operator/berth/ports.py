"""Port lifecycle of Berth pods: allocate when bound, release when gone, reclaim leaks.

Plain async code with no kopf in it: the handlers translate watch events into
these calls, and tests can drive them directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from berth import audit, kube, metrics
from berth.allocator import PoolExhausted
from berth.allocator.ranges import PortRange
from berth.api.pools import PoolConfig
from berth.kube import Kube, KubeError
from berth.ledger.ledgers import Allocation, LedgerBusy, Ledgers
from berth.ledger.records import Holder
from berth.names import ANNOTATION_PORTS, LABEL_DEPLOYMENT, LABEL_ROLE
from berth.plan import PlanError, PortPlan
from berth.workload import encode_ports, pod_ports_configmap_body

Body = dict[str, Any]
log = logging.getLogger("berth.ports")

TERMINAL_PHASES = ("Succeeded", "Failed")


class ClusterView(Protocol):
    """What allocation needs to know about nodes, pools and other pods."""

    def pool_for(self, node: str) -> PoolConfig: ...
    def node_uid(self, node: str) -> str | None: ...
    def foreign_ports(self, node: str) -> Sequence[PortRange]: ...


class EventSink(Protocol):
    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


def is_terminated(pod: Mapping[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in TERMINAL_PHASES


def holder_of(pod: Mapping[str, Any]) -> Holder:
    meta = pod["metadata"]
    labels = meta.get("labels", {})
    return Holder(
        meta["namespace"],
        meta["name"],
        meta["uid"],
        labels.get(LABEL_DEPLOYMENT, ""),
        labels.get(LABEL_ROLE, ""),
    )


@dataclass
class Waiting:
    """A bound pod that could not get ports yet, and why."""

    node: str
    pod: Mapping[str, Any]
    reason: str


@dataclass
class PortService:
    client: Kube
    ledgers: Ledgers
    cluster: ClusterView
    post_event: EventSink
    on_change: Callable[[str, str], None] = lambda namespace, deployment: None
    waiting: dict[str, Waiting] = field(default_factory=dict)
    delivered: dict[str, str] = field(default_factory=dict)

    async def ensure_allocated(self, pod: Mapping[str, Any]) -> Allocation | None:
        """Give a bound pod its ports (once), and make sure they reached it."""
        try:
            return await self._ensure_allocated(pod)
        except (LedgerBusy, KubeError, aiohttp.ClientError, TimeoutError) as error:
            # Transient: the next sweep (or a release on its node) retries it.
            meta = pod["metadata"]
            log.warning("ports for %s/%s deferred: %s", meta["namespace"], meta["name"], error)
            node = pod["spec"]["nodeName"]
            self.waiting[meta["uid"]] = Waiting(node, pod, f"retrying after: {error}")
            return None

    async def _ensure_allocated(self, pod: Mapping[str, Any]) -> Allocation | None:
        meta = pod["metadata"]
        node: str = pod["spec"]["nodeName"]
        holder = holder_of(pod)
        try:
            plan = PortPlan.of_pod(meta.get("annotations", {}))
        except PlanError as error:
            self._warn(pod, "InvalidPortPlan", str(error))
            return None
        pool = self.cluster.pool_for(node)
        started = asyncio.get_running_loop().time()
        try:
            allocation = await self.ledgers.allocate(
                node,
                holder,
                plan.requests(),
                pool,
                avoid=self.cluster.foreign_ports(node),
                node_uid=self.cluster.node_uid(node),
            )
        except PoolExhausted as error:
            self._wait(pod, node, holder, pool, str(error))
            return None
        if self.waiting.pop(holder.uid, None) is not None:
            self.on_change(holder.namespace, holder.deployment)
        assignment = allocation.assignment
        if allocation.fresh:
            audit.record(
                "allocate",
                holder,
                reason="pod bound",
                node=node,
                blocks=assignment.blocks,
                pool=allocation.pool.name,
            )
            metrics.ALLOCATIONS.inc()
        encoded = encode_ports(assignment)
        mirrored = meta.get("annotations", {}).get(ANNOTATION_PORTS)
        # Events queued before our own patch still carry the old annotation:
        # remember what this process delivered so they cost no writes.
        if encoded not in (mirrored, self.delivered.get(holder.uid)):
            try:
                env = plan.env(assignment)
            except PlanError as error:  # e.g. a rank base that would fall below port 1
                self._warn(pod, "InvalidPortPlan", str(error))
                return None
            # ConfigMap first, annotation last: the annotation says "delivered".
            await self._write_configmap(pod, env)
            await self.client.merge_patch(
                kube.path("pods", namespace=holder.namespace, name=holder.pod),
                {"metadata": {"annotations": {ANNOTATION_PORTS: encoded}}},
            )
            self.delivered[holder.uid] = encoded
            metrics.ALLOCATION_SECONDS.observe(asyncio.get_running_loop().time() - started)
            self.on_change(holder.namespace, holder.deployment)
        return allocation

    async def release(self, pod: Mapping[str, Any], reason: str) -> None:
        """Free a deleted or finished pod's ports, then serve whoever waits there."""
        holder = holder_of(pod)
        self.waiting.pop(holder.uid, None)
        self.delivered.pop(holder.uid, None)
        node = pod.get("spec", {}).get("nodeName")
        if not node:
            return
        freed = await self.ledgers.release(node, [holder.uid])
        self._audit_freed("release", reason, node, freed)
        if freed:
            self.on_change(holder.namespace, holder.deployment)
            await self.retry_waiting(node)

    async def retry_waiting(self, node: str | None = None) -> None:
        for uid, entry in list(self.waiting.items()):
            if node is None or entry.node == node:
                current = self.waiting.get(uid)
                if current is not None:
                    await self.ensure_allocated(current.pod)

    async def reclaim(self, live: Collection[str]) -> int:
        """Release every ledger entry whose pod is gone or finished.

        ``live`` holds the UID of every running Berth pod listed just now. A UID
        missing from it is double-checked with a GET before its ports go: a
        pod created after the list must not lose ports another replica just
        gave it. UIDs are never reused, so "gone" is final.
        """
        reclaimed = 0
        for ledger in await self.ledgers.load_all():
            stale = []
            for holder, _ in ledger.held():
                if holder.uid in live:
                    continue
                pod = await self._current_pod(holder)
                if pod is None or is_terminated(pod):
                    stale.append(holder.uid)
            if stale:
                freed = await self.ledgers.release(ledger.node, stale)
                self._audit_freed("reclaim", "owner gone", ledger.node, freed)
                reclaimed += len(freed)
                for holder, _ in freed:
                    self.delivered.pop(holder.uid, None)
                    self.on_change(holder.namespace, holder.deployment)
        metrics.RECLAIMED.inc(reclaimed)
        return reclaimed

    async def _current_pod(self, holder: Holder) -> Body | None:
        pod = await self.client.get_or_none(
            kube.path("pods", namespace=holder.namespace, name=holder.pod)
        )
        if pod is None or pod["metadata"]["uid"] != holder.uid:
            return None
        return pod

    async def _write_configmap(self, pod: Mapping[str, Any], env: Mapping[str, str]) -> None:
        body = pod_ports_configmap_body(pod, env)
        meta = body["metadata"]
        url = kube.path("configmaps", namespace=meta["namespace"])
        try:
            await self.client.create(url, body)
        except KubeError as error:
            if not error.conflict:
                raise
            # Left by an earlier attempt (crash, another replica): make it right.
            await self.client.replace(
                kube.path("configmaps", namespace=meta["namespace"], name=meta["name"]), body
            )

    def _wait(
        self, pod: Mapping[str, Any], node: str, holder: Holder, pool: PoolConfig, reason: str
    ) -> None:
        previous = self.waiting.get(holder.uid)
        self.waiting[holder.uid] = Waiting(node, pod, reason)
        if previous is not None and previous.reason == reason:
            return  # already reported; stays quiet until something changes
        audit.record(
            "exhausted",
            holder,
            reason=reason,
            node=node,
            pool=pool.name,
        )
        metrics.EXHAUSTED.inc()
        self._warn(pod, "PortsExhausted", f"node {node}, pool {pool.name}: {reason}")
        self.on_change(holder.namespace, holder.deployment)

    def _warn(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        log.warning("%s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], message)
        self.post_event(pod, type="Warning", reason=reason, message=message)

    def _audit_freed(
        self, action: audit.Action, reason: str, node: str, freed: Iterable[tuple[Holder, Any]]
    ) -> None:
        for holder, assignment in freed:
            audit.record(
                action,
                holder,
                reason=reason,
                node=node,
                blocks=assignment.blocks,
            )
            metrics.RELEASES.inc()
