"""Indexes of nodes, pools and foreign host ports, and the view built on them.

kopf keeps these in memory from the same watch streams the handlers use and
fills them before any resource handler runs, so the allocation hot path
reads nodes and pools without a single API call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from berth.allocator.ranges import PortRange
from berth.api import NodePortPool
from berth.api.pools import PoolConfig, choose_pool
from berth.config import OperatorConfig
from berth.names import GROUP, LABEL_MANAGED_BY, MANAGED_BY


@kopf.index("nodes")
def node_index(name: str, uid: str, labels: Mapping[str, str], **_: Any) -> dict[str, Any]:
    return {name: (uid, dict(labels))}


@kopf.index(GROUP, "nodeportpools")
def pool_index(body: kopf.Body, name: str, logger: kopf.Logger, **_: Any) -> dict[Any, Any]:
    try:
        return {None: NodePortPool.model_validate(dict(body))}
    except ValueError as error:  # the schema should have refused it already
        logger.error(f"NodePortPool {name} is not usable: {error}")
        return {}


def _declares_host_ports(spec: kopf.Spec, labels: kopf.Labels, **_: Any) -> bool:
    if labels.get(LABEL_MANAGED_BY) == MANAGED_BY or not spec.get("nodeName"):
        return False
    return any(
        port.get("hostPort") or spec.get("hostNetwork")
        for container in spec.get("containers", [])
        for port in container.get("ports", [])
    )


@kopf.index("pods", when=_declares_host_ports)
def foreign_port_index(spec: kopf.Spec, status: kopf.Status, **_: Any) -> dict[str, Any]:
    """Ports other pods already claim on their node: Berth must not hand them out.

    With hostNetwork, Kubernetes defaults hostPort to containerPort, so every
    declared port of such a pod is a host port.
    """
    if status.get("phase") in ("Succeeded", "Failed"):
        return {}
    ports = {
        port.get("hostPort") or port["containerPort"]
        for container in spec.get("containers", [])
        for port in container.get("ports", [])
        if port.get("hostPort") or spec.get("hostNetwork")
    }
    return {spec["nodeName"]: tuple(sorted(ports))}


class IndexedCluster:
    """ClusterView over kopf's live indexes."""

    def __init__(self, config: OperatorConfig, indexes: Mapping[str, Any]) -> None:
        self._default = PoolConfig("default", config.default_ranges, config.default_reserved)
        self._nodes: kopf.Index[str, Any] = indexes["node_index"]
        self._pools: kopf.Index[None, NodePortPool] = indexes["pool_index"]
        self._foreign: kopf.Index[str, tuple[int, ...]] = indexes["foreign_port_index"]

    def node_labels(self, node: str) -> dict[str, str]:
        for _, labels in self._nodes.get(node, ()):
            return dict(labels)
        return {}

    def node_uid(self, node: str) -> str | None:
        for uid, _ in self._nodes.get(node, ()):
            return str(uid)
        return None

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def pools(self) -> list[NodePortPool]:
        return list(self._pools.get(None, ()))

    def pool_for(self, node: str) -> PoolConfig:
        return choose_pool(self.pools(), self.node_labels(node), self._default)

    def foreign_ports(self, node: str) -> Sequence[PortRange]:
        return [PortRange(p, p) for ports in self._foreign.get(node, ()) for p in ports]
