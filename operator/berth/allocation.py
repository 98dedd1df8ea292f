"""Ports for Berth's pods: allocate once a pod is bound, deliver, release when it is gone.

Plain async code with no kopf in it: the handlers translate watch events into
these calls, and unit tests drive them with in-memory fakes. Delivery is
the per-pod ConfigMap first (the kubelet starts the containers once it
exists), then the pod's ``berth.dev/ports`` annotation; from then on those
ports are the pod's until it is gone (I3 in docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from berth import audit, kube, metrics
from berth.allocator import Assignment, PoolExhausted
from berth.allocator.ranges import PortRange
from berth.events import EventSink
from berth.kube import KubeApi, KubeError
from berth.ledger.ledgers import Allocation, LedgerBusy, Ledgers
from berth.ledger.records import Held, Holder, Repair
from berth.manifests import pod_ports_configmap_body
from berth.names import ANNOTATION_GROUP_LEADER, ANNOTATION_PORTS
from berth.plan import PlanError, PortPlan
from berth.pods import (
    decode_ports,
    delivered_ports,
    encode_ports,
    holder_of,
    is_managed,
    owned_by,
)
from berth.pools import Pool

Body = dict[str, Any]
log = logging.getLogger("berth.allocation")
#: Seconds before trying a pod again after a transient failure (an API
#: error, a busy ledger), one step further after each failure in a row.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class NodeView(Protocol):
    """What allocation needs to know about a node, from memory (view.py)."""

    def pool_for(self, node: str) -> Pool: ...
    def node_uid(self, node: str) -> str | None: ...
    def avoided_ports(self, node: str) -> Sequence[PortRange]: ...
    def live_on(self, node: str) -> list[Mapping[str, Any]]: ...
    def worker_named(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


@dataclass
class Waiting:
    """A bound pod that could not get ports yet, and why."""

    node: str
    pod: Mapping[str, Any]
    reason: str


class NameTaken(Exception):
    """An object Berth must write exists under that name and is not Berth's."""


@dataclass
class AllocationService:
    client: KubeApi
    ledgers: Ledgers
    view: NodeView
    post_event: EventSink
    #: Called with (namespace, deployment) whenever a pod's ports change.
    on_change: Callable[[str, str], None] = lambda namespace, deployment: None
    _waiting: dict[str, Waiting] = field(default_factory=dict)
    #: Pods of multi-pod DP groups holding ports, waiting for their leader's.
    _followers: dict[str, Waiting] = field(default_factory=dict)
    #: node -> uid -> what this process delivered there, until the pod's own
    #: event shows it (and so that events queued before our patch cost no writes).
    _delivered: dict[str, dict[str, Held]] = field(default_factory=dict)
    #: uid -> the timer that tries again after a transient failure
    _retries: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)

    def waiting_reasons(self, namespace: str, deployment: str) -> list[str]:
        return [
            w.reason
            for w in self._waiting.values()
            if (h := holder_of(w.pod)).namespace == namespace and h.deployment == deployment
        ]

    def delivered_on(
        self, node: str, live: Iterable[Mapping[str, Any]] | None = None
    ) -> list[Held]:
        """Every assignment the ``live`` pods on ``node`` (default: the view's)
        were delivered, as far as known: their annotations, or what this
        process delivered before their event came."""
        mine = self._delivered.get(node, {})
        known = []
        for pod in self.view.live_on(node) if live is None else live:
            holder = holder_of(pod)
            blocks = delivered_ports(pod)
            if blocks is not None:
                known.append((holder, Assignment(holder.uid, blocks)))
            elif holder.uid in mine:
                known.append(mine[holder.uid])
        return known

    async def ensure_allocated(self, pod: Mapping[str, Any]) -> Allocation | None:
        """Give a bound pod its ports (once), and make sure they reached it."""
        meta = pod["metadata"]
        node: str = pod["spec"]["nodeName"]
        try:
            return await self._ensure_allocated(pod, node)
        except (LedgerBusy, KubeError, aiohttp.ClientError, TimeoutError) as error:
            # Transient: the next sweep (or a release on its node) retries it.
            delay = self._retry_later(pod)
            log.warning(
                "ports for %s/%s deferred %.1f s: %s",
                meta["namespace"],
                meta["name"],
                delay,
                f"{type(error).__name__}: {error}",
            )
            self._waiting[meta["uid"]] = Waiting(node, pod, f"retrying after: {error!r}")
        except NameTaken as error:
            self._wait(pod, node, "NameTaken", str(error))
        return None

    async def _ensure_allocated(self, pod: Mapping[str, Any], node: str) -> Allocation | None:
        holder = holder_of(pod)
        try:
            plan = PortPlan.of_pod(pod["metadata"].get("annotations") or {})
        except PlanError as error:
            self._warn(pod, "InvalidPortPlan", str(error))
            return None
        started = asyncio.get_running_loop().time()
        delivered = delivered_ports(pod)
        own = None if delivered is None else Assignment(holder.uid, delivered)
        mirrored = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_PORTS)
        for _ in range(2):
            allocation = await self._allocate(pod, node, holder, plan, own)
            if allocation is None:
                return None
            assignment = allocation.assignment
            encoded = encode_ports(assignment)
            ours = self._delivered.get(node, {}).get(holder.uid)
            if encoded in (mirrored, ours and encode_ports(ours[1])):
                return allocation
            try:
                env = plan.env(assignment)
                group = self._group_env(pod, plan, assignment)
            except PlanError as error:  # e.g. a rank base that would fall below port 1
                self._warn(pod, "InvalidPortPlan", str(error))
                return None
            if group is None:  # the leader's ports or address are not known yet
                self._followers[holder.uid] = Waiting(node, pod, "waiting for its DP group leader")
                return allocation
            self._followers.pop(holder.uid, None)
            env.update(group)
            # ConfigMap first, annotation last: the annotation says "delivered".
            earlier = await self._write_configmap(pod, env, assignment)
            if earlier is None:
                break
            # An earlier attempt delivered through the ConfigMap and its ledger
            # entry was lost: the containers may run with it, so it stands.
            await self.ledgers.release(node, [holder.uid])
            own = Assignment(holder.uid, earlier)
        else:
            raise LedgerBusy(f"delivery to {holder.pod} kept changing under us")
        await self.client.merge_patch(
            kube.path("pods", namespace=holder.namespace, name=holder.pod),
            {"metadata": {"annotations": {ANNOTATION_PORTS: encoded}}},
        )
        self._delivered.setdefault(node, {})[holder.uid] = (holder, assignment)
        metrics.ALLOCATION_SECONDS.observe(asyncio.get_running_loop().time() - started)
        self.on_change(holder.namespace, holder.deployment)
        return allocation

    async def _allocate(
        self,
        pod: Mapping[str, Any],
        node: str,
        holder: Holder,
        plan: PortPlan,
        own: Assignment | None,
    ) -> Allocation | None:
        pool = self.view.pool_for(node)
        try:
            allocation = await self.ledgers.allocate(
                node,
                holder,
                plan.requests(),
                pool,
                avoid=self.view.avoided_ports(node),
                delivered=lambda: self.delivered_on(node),
                own=own,
                node_uid=self.view.node_uid(node),
            )
        except PoolExhausted as error:
            self._wait(pod, node, "PortsExhausted", f"node {node}, pool {pool.name}: {error}")
            return None
        self.report_repair(node, allocation.repair)
        self._failures.pop(holder.uid, None)
        if self._waiting.pop(holder.uid, None) is not None:
            self.on_change(holder.namespace, holder.deployment)
        if allocation.fresh:
            audit.record(
                "allocate",
                holder,
                reason="pod bound",
                node=node,
                blocks=allocation.assignment.blocks,
                pool=allocation.pool.name,
            )
            metrics.ALLOCATIONS.inc()
        return allocation

    def _retry_later(self, pod: Mapping[str, Any]) -> float:
        """Try the pod again soon after a transient failure, backing off."""
        uid = pod["metadata"]["uid"]
        failures = self._failures[uid] = self._failures.get(uid, 0) + 1
        delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1]
        if (earlier := self._retries.pop(uid, None)) is not None:
            earlier.cancel()
        self._retries[uid] = asyncio.create_task(self._retry(uid, delay))
        return delay

    async def _retry(self, uid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        del self._retries[uid]
        entry = self._waiting.get(uid)
        if entry is not None:
            await self.ensure_allocated(entry.pod)

    def _stop_retrying(self, uid: str) -> None:
        self._failures.pop(uid, None)
        if (timer := self._retries.pop(uid, None)) is not None:
            timer.cancel()

    def observed(self, pod: Mapping[str, Any]) -> None:
        """The pod's own event arrived: the view now knows what it was delivered."""
        node = pod.get("spec", {}).get("nodeName")
        if node and delivered_ports(pod) is not None:
            mine = self._delivered.get(node)
            if mine is not None:
                mine.pop(pod["metadata"]["uid"], None)

    def _group_env(
        self, pod: Mapping[str, Any], plan: PortPlan, assignment: Assignment
    ) -> dict[str, str] | None:
        """The env a pod takes from its DP group's leader, or None until it is known."""
        if not plan.role.group_env:
            return {}
        meta = pod["metadata"]
        name = (meta.get("annotations") or {}).get(ANNOTATION_GROUP_LEADER, meta["name"])
        if name == meta["name"]:
            leader, blocks = pod, assignment.blocks
        else:
            found = self.view.worker_named(meta["namespace"], name)
            if found is None or (delivered := delivered_ports(found)) is None:
                return None
            leader, blocks = found, delivered
        address = (leader.get("status") or {}).get("podIP")
        if not address:
            return None
        return plan.group_env(Assignment(meta["uid"], blocks), address)

    async def wake_followers(self, leader: Mapping[str, Any]) -> None:
        """The pod's delivery or address changed: deliver to the pods of its group."""
        meta = leader["metadata"]
        for uid, entry in list(self._followers.items()):
            theirs = entry.pod["metadata"]
            if theirs["namespace"] == meta["namespace"] and (
                (theirs.get("annotations") or {}).get(ANNOTATION_GROUP_LEADER) == meta["name"]
            ):
                current = self._followers.pop(uid, None)
                if current is not None:
                    await self.ensure_allocated(current.pod)

    async def release(self, pod: Mapping[str, Any], reason: str) -> None:
        """Free a deleted or finished pod's ports, then serve whoever waits there."""
        holder = holder_of(pod)
        self._waiting.pop(holder.uid, None)
        self._followers.pop(holder.uid, None)
        self._stop_retrying(holder.uid)
        node = pod.get("spec", {}).get("nodeName")
        if not node:
            return
        self._delivered.get(node, {}).pop(holder.uid, None)
        freed = await self.ledgers.release(node, [holder.uid])
        audit_freed("release", reason, node, freed)
        if freed:
            self.on_change(holder.namespace, holder.deployment)
            await self.retry_waiting(node)

    async def retry_waiting(self, node: str | None = None) -> None:
        """Try again for pods waiting on ``node`` (every node: None): capacity changed."""
        for uid, entry in list(self._waiting.items()):
            if node is None or entry.node == node:
                current = self._waiting.get(uid)
                if current is not None:
                    await self.ensure_allocated(current.pod)

    def forget(self, uids: Iterable[str]) -> None:
        """Holdings reclaimed elsewhere (the sweep): drop what we remember of them."""
        for uid in uids:
            for mine in self._delivered.values():
                mine.pop(uid, None)

    def report_repair(self, node: str, repair: Repair) -> None:
        """Audit what a fold of delivered ports changed in a ledger."""
        if repair.damage:
            self.post_event(
                self.ledgers.reference(node),
                type="Warning",
                reason="LedgerRepaired",
                message=repair.damage,
            )
        for reason, changed in (
            ("delivered ports missing from the ledger", repair.adopted),
            ("ledger disagreed with the delivered ports", repair.replaced),
            ("undelivered holding overlapped delivered ports", repair.evicted),
        ):
            for holder, assignment in changed:
                audit.record("repair", holder, reason=reason, node=node, blocks=assignment.blocks)
                metrics.REPAIRS.inc()

    async def _write_configmap(
        self, pod: Mapping[str, Any], env: Mapping[str, str], assignment: Assignment
    ) -> dict[str, PortRange] | None:
        """Write the pod's ConfigMap; returns the blocks an existing one of this
        pod already delivers when they differ (None once ours is written)."""
        body = pod_ports_configmap_body(pod, env, assignment)
        meta = body["metadata"]
        collection = kube.path("configmaps", namespace=meta["namespace"])
        try:
            await self.client.create(collection, body)
            return None
        except KubeError as error:
            if not error.conflict:
                raise
        url = kube.path("configmaps", namespace=meta["namespace"], name=meta["name"])
        current = await self.client.get_or_none(url)
        if current is None:
            await self.client.create(collection, body)
            return None
        if not is_managed(current):
            raise NameTaken(
                f"ConfigMap {meta['namespace']}/{meta['name']} exists and is not Berth's: "
                "delete or rename it, and the pod gets its ports"
            )
        if owned_by(current, pod["metadata"]["uid"]):
            text = (current["metadata"].get("annotations") or {}).get(ANNOTATION_PORTS)
            try:
                earlier = decode_ports(text) if text else None
            except ValueError:
                earlier = None
            if earlier is not None and earlier != assignment.blocks:
                return earlier
        # Else left by an earlier pod of that name, which is gone (names are
        # unique among live pods): the garbage collector would remove it.
        versioned = {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}
        await self.client.replace(url, {**body, "metadata": versioned})
        return None

    def _wait(self, pod: Mapping[str, Any], node: str, kind: str, reason: str) -> None:
        holder = holder_of(pod)
        previous = self._waiting.get(holder.uid)
        self._waiting[holder.uid] = Waiting(node, pod, reason)
        if previous is not None and previous.reason == reason:
            return  # already reported; stays quiet until something changes
        audit.record("exhausted", holder, reason=reason, node=node)
        metrics.EXHAUSTED.inc()
        self._warn(pod, kind, reason)
        self.on_change(holder.namespace, holder.deployment)

    def _warn(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        log.warning("%s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], message)
        self.post_event(pod, type="Warning", reason=reason, message=message)


def audit_freed(action: audit.Action, reason: str, node: str, freed: Iterable[Held]) -> None:
    for holder, assignment in freed:
        audit.record(action, holder, reason=reason, node=node, blocks=assignment.blocks)
        metrics.RELEASES.inc()
