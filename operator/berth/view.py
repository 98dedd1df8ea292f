"""What Berth knows of nodes, pools, its own pods and other pods' host ports.

Watch events keep it current (controllers/); LISTs fill it at start-up,
before any handler runs, and every sweep re-lists nodes, pools and Berth's
pods, as an informer resyncs. Allocation and reconciles read it instead of
the API server. These are not kopf indexes on purpose: at start-up
kopf holds every object of an indexed kind behind one readiness condition
that wakes every waiting worker for every object listed, which is quadratic
(46 s before the first allocation with 2,500 pods on 200 nodes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from berth import kube
from berth.agent.report import REPORT_SELECTOR, NodeReport, report_entry
from berth.allocator.ranges import PortRange
from berth.api import NodePortPool
from berth.config import OperatorConfig
from berth.kube import KubeApi
from berth.names import GROUP, LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY, VERSION
from berth.pods import (
    ForeignClaim,
    awaits_ports,
    foreign_claim,
    is_berths,
    is_terminated,
    node_of,
    worker_summary,
)
from berth.pools import Pool, choose_pool

K = TypeVar("K")
V = TypeVar("V")
Body = Mapping[str, Any]
log = logging.getLogger("berth.view")


class SnapshotCache(Generic[K, V]):
    """Objects by key, from events and from LISTs that may race with them.

    An event seen while a LIST is in flight is at least as new as the LIST,
    so the LIST never overwrites (or resurrects) what such an event said.
    Several LISTs may be in flight at once (the sweep's and a timer's): each
    keeps its own record of the keys events touched meanwhile.

    Named indexes (``node=node_of``) keep the objects grouped by what the
    hot path asks for, so no lookup scans the whole cluster; an object whose
    index value is None is left out of that index.
    """

    def __init__(self, **indexes: Callable[[V], Hashable | None]) -> None:
        self._items: dict[K, V] = {}
        self._in_flight: list[set[K]] = []
        self._index_of = indexes
        self._indexes: dict[str, dict[Hashable, dict[K, V]]] = {name: {} for name in indexes}

    def observe(self, key: K, value: V | None) -> None:
        """An event: ``None`` means gone (or no longer of interest)."""
        for touched in self._in_flight:
            touched.add(key)
        self._put(key, value)

    async def resync(self, listing: Callable[[], Awaitable[Mapping[K, V]]]) -> None:
        touched: set[K] = set()
        self._in_flight.append(touched)
        try:
            snapshot = await listing()
        finally:
            self._in_flight.remove(touched)
        for key in set(self._items) - set(snapshot) - touched:
            self._put(key, None)
        for key, value in snapshot.items():
            if key not in touched:
                self._put(key, value)

    def replace(self, items: Mapping[K, V]) -> None:
        """Take a LIST as it is, when no event can have raced with it."""
        self._items = {}
        self._indexes = {name: {} for name in self._index_of}
        for key, value in items.items():
            self._put(key, value)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def keys(self) -> list[K]:
        return list(self._items)

    def values(self) -> Iterator[V]:
        return iter(list(self._items.values()))

    def select(self, index: str, value: Hashable) -> list[V]:
        """The objects whose ``index`` is ``value``."""
        return list(self._indexes[index].get(value, {}).values())

    def _put(self, key: K, value: V | None) -> None:
        before = self._items.pop(key, None)
        if value is not None:
            self._items[key] = value
        for name, index_of in self._index_of.items():
            index = self._indexes[name]
            if before is not None and (old := index_of(before)) is not None:
                group = index[old]
                del group[key]
                if not group:
                    del index[old]
            if value is not None and (new := index_of(value)) is not None:
                index.setdefault(new, {})[key] = value


def node_entry(body: Body) -> tuple[str, dict[str, str]]:
    meta = body["metadata"]
    return meta["uid"], dict(meta.get("labels") or {})


@dataclass(frozen=True)
class StartupListing:
    #: The LIST's resourceVersion: the pod watch resumes there.
    version: str
    #: Berth's pods bound and not delivered yet, whole: no event may come for them.
    unserved: list[Body]


PODS = kube.path("pods")


async def _listing(
    client: KubeApi,
    url: str,
    entry: Callable[[Body], V | None],
    key: str = "name",
    selector: str = "",
) -> dict[str, V]:
    """A LIST as ``key`` -> entry, page by page: a cluster's every pod never
    sits in memory at once."""
    pages = client.iterate(url, selector or None)
    entries = [(item["metadata"][key], entry(item)) async for item in pages]
    return {k: v for k, v in entries if v is not None}


def deployment_of(pod: Body) -> tuple[str, str]:
    meta = pod["metadata"]
    return meta["namespace"], meta["labels"][LABEL_DEPLOYMENT]


def name_of(pod: Body) -> tuple[str, str]:
    meta = pod["metadata"]
    return meta["namespace"], meta["name"]


def pool_entry(body: Body) -> NodePortPool | None:
    try:
        return NodePortPool.model_validate(dict(body))
    except ValidationError as error:  # the schema should have refused it already
        log.error("NodePortPool %s is not usable: %s", body["metadata"]["name"], error)
        return None


class ClusterView:
    """Nodes, pools, Berth's pods and others' host ports: no API call on the hot path."""

    def __init__(self, config: OperatorConfig) -> None:
        self._default = config.default_pool
        self._nodes: SnapshotCache[str, tuple[str, dict[str, str]]] = SnapshotCache()
        self._pools: SnapshotCache[str, NodePortPool] = SnapshotCache()
        self._foreign: SnapshotCache[str, ForeignClaim] = SnapshotCache(
            node=lambda claim: claim.node
        )
        self._workers: SnapshotCache[str, Body] = SnapshotCache(
            node=node_of, deployment=deployment_of, name=name_of
        )
        self._namespace = config.namespace
        #: What each node's agent reported (node_reports.py), by node name.
        self._reports: SnapshotCache[str, NodeReport] = SnapshotCache()

    def observe_node(self, event: str | None, body: Body) -> bool:
        """Take a node event; True when the node's labels (so maybe its pool) changed."""
        name = body["metadata"]["name"]
        before = self._nodes.get(name)
        entry = None if event == "DELETED" else node_entry(body)
        self._nodes.observe(name, entry)
        return entry is not None and (before is None or before[1] != entry[1])

    def observe_pool(self, event: str | None, body: Body) -> None:
        gone = event == "DELETED"
        self._pools.observe(body["metadata"]["name"], None if gone else pool_entry(body))

    def observe_pod(self, event: str | None, body: Body) -> str | None:
        """Take a pod event; returns the node of a foreign claim it adds or changes."""
        gone = event == "DELETED"
        uid = body["metadata"]["uid"]
        if is_berths(body):
            self._workers.observe(uid, None if gone else worker_summary(body))
            return None
        claim = None if gone else foreign_claim(body)
        before = self._foreign.get(uid)
        self._foreign.observe(uid, claim)
        return claim.node if claim is not None and claim != before else None

    async def resync(self, client: KubeApi) -> None:
        """Re-list nodes, pools and Berth's pods (every sweep)."""

        def workers(pod: Body) -> dict[str, Any] | None:
            return worker_summary(pod) if is_berths(pod) else None

        await self._resync_nodes_and_pools(client)
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        await self._workers.resync(lambda: _listing(client, PODS, workers, "uid", selector))

    async def fill(self, client: KubeApi) -> StartupListing:
        """Start-up: list nodes, pools and every pod, one pass over pods feeding
        Berth's and the host ports others claim (no watch runs yet, so no event
        can race with it); returns where the pod watch starts and the pods it
        must be handed first."""
        await self._resync_nodes_and_pools(client)
        mine: dict[str, dict[str, Any]] = {}
        others: dict[str, ForeignClaim] = {}
        unserved: list[Body] = []
        versions: list[str] = []
        async for pod in client.iterate(PODS, versions=versions):
            uid = pod["metadata"]["uid"]
            if is_berths(pod):
                mine[uid] = worker_summary(pod)
                if awaits_ports(pod):  # the summary lacks the plan allocation reads
                    unserved.append(pod)
            elif (claim := foreign_claim(pod)) is not None:
                others[uid] = claim
        self._workers.replace(mine)
        self._foreign.replace(others)
        return StartupListing(versions[0], unserved)

    async def _resync_nodes_and_pools(self, client: KubeApi) -> None:
        await self._nodes.resync(lambda: _listing(client, kube.path("nodes"), node_entry))
        await self.resync_reports(client)
        pools_url = kube.path("nodeportpools", group=GROUP, version=VERSION)
        await self._pools.resync(lambda: _listing(client, pools_url, pool_entry))

    async def resync_reports(self, client: KubeApi) -> set[str]:
        """Re-list the node agents' reports; returns the nodes whose report changed."""
        before = {report.node: report for report in self._reports.values()}
        url = kube.path("configmaps", namespace=self._namespace)

        async def listing() -> dict[str, NodeReport]:
            entries = [report_entry(item) async for item in client.iterate(url, REPORT_SELECTOR)]
            return {entry.node: entry for entry in entries if entry is not None}

        await self._reports.resync(listing)
        nodes = set(before) | set(self._reports.keys())
        return {node for node in nodes if before.get(node) != self._reports.get(node)}

    def node_report(self, node: str) -> NodeReport | None:
        return self._reports.get(node)

    def reports(self) -> list[NodeReport]:
        return list(self._reports.values())

    def known_pods(self) -> dict[str, Body]:
        """uid -> every pod the view holds (Berth's as summaries, others as
        much as their claim says): what a re-list must find or call deleted."""
        known: dict[str, Body] = {
            claim.uid: {
                "metadata": {"uid": claim.uid, "name": claim.pod, "namespace": claim.namespace},
                "spec": {"nodeName": claim.node},
            }
            for claim in self._foreign.values()
        }
        known.update((pod["metadata"]["uid"], pod) for pod in self._workers.values())
        return known

    def worker(self, uid: str) -> Body | None:
        """One of Berth's pods (summary), by UID."""
        return self._workers.get(uid)

    def workers(self, namespace: str | None = None, deployment: str | None = None) -> list[Body]:
        """Berth's worker pods (summaries): every one, or one deployment's."""
        if namespace is None or deployment is None:
            assert namespace is None and deployment is None, "a deployment has a namespace"
            return list(self._workers.values())
        return self._workers.select("deployment", (namespace, deployment))

    def node_labels(self, node: str) -> dict[str, str]:
        entry = self._nodes.get(node)
        return dict(entry[1]) if entry else {}

    def node_uid(self, node: str) -> str | None:
        entry = self._nodes.get(node)
        return entry[0] if entry else None

    def nodes(self) -> list[str]:
        return self._nodes.keys()

    def pools(self) -> list[NodePortPool]:
        return list(self._pools.values())

    def pool_for(self, node: str) -> Pool:
        return choose_pool(self.pools(), self.node_labels(node), self._default)

    def foreign_ports(self, node: str) -> Sequence[PortRange]:
        return [
            PortRange(port, port) for claim in self.foreign_claims(node) for port in claim.ports
        ]

    def avoided_ports(self, node: str) -> Sequence[PortRange]:
        """Ports never handed out on ``node``: other pods' host ports, and every
        listener its agent reported (a port Berth holds is not free anyway)."""
        report = self._reports.get(node)
        listening = (*report.tcp, *report.udp) if report else ()
        return [*self.foreign_ports(node), *listening]

    def foreign_claims(self, node: str | None = None) -> list[ForeignClaim]:
        """Host ports other pods claim on ``node`` (every node: None)."""
        return list(self._foreign.values()) if node is None else self._foreign.select("node", node)

    def worker_named(self, namespace: str, name: str) -> Body | None:
        """One of Berth's pods by name (DP group leaders are looked up so)."""
        found = self._workers.select("name", (namespace, name))
        return found[0] if found else None

    def live_on(self, node: str) -> list[Body]:
        """Berth's pods bound to ``node`` that are not finished (summaries)."""
        return [p for p in self._workers.select("node", node) if not is_terminated(p)]
