"""What allocation knows of nodes, pools and other pods' host ports, in memory.

Watch events keep it current (controllers/cluster.py); LISTs fill it at
start-up, before any handler runs, and every sweep re-lists nodes and pools,
as an informer resyncs. These are not kopf indexes on purpose: at start-up
kopf holds every object of an indexed kind behind one readiness condition
that wakes every waiting worker for every object listed, which is quadratic
(46 s before the first allocation with 2,500 pods on 200 nodes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from berth import kube
from berth.allocator.ranges import PortRange
from berth.api import NodePortPool
from berth.api.pools import PoolConfig, choose_pool
from berth.config import OperatorConfig
from berth.kube import Kube
from berth.names import GROUP, LABEL_MANAGED_BY, MANAGED_BY, VERSION

K = TypeVar("K")
V = TypeVar("V")
Body = Mapping[str, Any]
log = logging.getLogger("berth.cluster")


class SnapshotCache(Generic[K, V]):
    """Objects by key, from events and from LISTs that may race with them.

    An event seen while a LIST is in flight is at least as new as the LIST,
    so the LIST never overwrites (or resurrects) what such an event said.
    """

    def __init__(self) -> None:
        self._items: dict[K, V] = {}
        self._touched: set[K] | None = None

    def observe(self, key: K, value: V | None) -> None:
        """An event: ``None`` means gone (or no longer of interest)."""
        if self._touched is not None:
            self._touched.add(key)
        if value is None:
            self._items.pop(key, None)
        else:
            self._items[key] = value

    async def resync(self, listing: Callable[[], Awaitable[Mapping[K, V]]]) -> None:
        self._touched = set()
        try:
            snapshot = await listing()
        finally:
            touched, self._touched = self._touched, None
        for key in set(self._items) - set(snapshot) - touched:
            del self._items[key]
        for key, value in snapshot.items():
            if key not in touched:
                self._items[key] = value

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def keys(self) -> list[K]:
        return list(self._items)

    def values(self) -> Iterator[V]:
        return iter(list(self._items.values()))


def node_entry(body: Body) -> tuple[str, dict[str, str]]:
    meta = body["metadata"]
    return meta["uid"], dict(meta.get("labels") or {})


def pool_entry(body: Body) -> NodePortPool | None:
    try:
        return NodePortPool.model_validate(dict(body))
    except ValidationError as error:  # the schema should have refused it already
        log.error("NodePortPool %s is not usable: %s", body["metadata"]["name"], error)
        return None


def foreign_claim(pod: Body) -> tuple[str, tuple[int, ...]] | None:
    """(node, host ports) a pod Berth does not manage holds, if any.

    With hostNetwork, Kubernetes defaults hostPort to containerPort, so every
    declared port of such a pod is a host port.
    """
    spec = pod.get("spec") or {}
    labels = pod["metadata"].get("labels") or {}
    node = spec.get("nodeName")
    finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    if labels.get(LABEL_MANAGED_BY) == MANAGED_BY or not node or finished:
        return None
    ports = {
        port.get("hostPort") or port["containerPort"]
        for container in spec.get("containers") or ()
        for port in container.get("ports") or ()
        if port.get("hostPort") or spec.get("hostNetwork")
    }
    return (node, tuple(sorted(ports))) if ports else None


class ClusterCache:
    """The ClusterView allocation reads: no API call on the hot path."""

    def __init__(self, config: OperatorConfig) -> None:
        self._default = PoolConfig("default", config.default_ranges, config.default_reserved)
        self._nodes: SnapshotCache[str, tuple[str, dict[str, str]]] = SnapshotCache()
        self._pools: SnapshotCache[str, NodePortPool] = SnapshotCache()
        self._foreign: SnapshotCache[str, tuple[str, tuple[int, ...]]] = SnapshotCache()

    def observe_node(self, event: str | None, body: Body) -> None:
        gone = event == "DELETED"
        self._nodes.observe(body["metadata"]["name"], None if gone else node_entry(body))

    def observe_pool(self, event: str | None, body: Body) -> None:
        gone = event == "DELETED"
        self._pools.observe(body["metadata"]["name"], None if gone else pool_entry(body))

    def observe_pod(self, event: str | None, body: Body) -> None:
        gone = event == "DELETED"
        self._foreign.observe(body["metadata"]["uid"], None if gone else foreign_claim(body))

    async def resync(self, client: Kube, *, pods: bool) -> None:
        """Re-list nodes and pools (and, at start-up, every pod's host ports)."""

        async def listing(url: str, entry: Callable[[Body], V | None], key: str) -> dict[str, V]:
            # Page by page: a cluster's every pod never sits in memory at once.
            entries = [(item["metadata"][key], entry(item)) async for item in client.iterate(url)]
            return {k: v for k, v in entries if v is not None}

        await self._nodes.resync(lambda: listing(kube.path("nodes"), node_entry, "name"))
        pools_url = kube.path("nodeportpools", group=GROUP, version=VERSION)
        await self._pools.resync(lambda: listing(pools_url, pool_entry, "name"))
        if pods:
            await self._foreign.resync(lambda: listing(kube.path("pods"), foreign_claim, "uid"))

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

    def pool_for(self, node: str) -> PoolConfig:
        return choose_pool(self.pools(), self.node_labels(node), self._default)

    def foreign_ports(self, node: str) -> Sequence[PortRange]:
        return [
            PortRange(port, port)
            for on, ports in self._foreign.values()
            if on == node
            for port in ports
        ]
