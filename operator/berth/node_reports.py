"""What the node agents report, acted on: listeners, ephemeral overlap.

Each agent (berth.agent, optional) writes ``berth-node.<node>`` in the
operator's namespace. The view keeps the reports: every listener is avoided
by allocation (view.avoided_ports), a listener inside a block held by a pod
that cannot own it is a conflict (repair.listener_conflicts), and a node
whose pool overlaps its ephemeral range outside ``ip_local_reserved_ports``
gets a Warning Event and is named in its NodePortPool's status.

The reports are re-listed (one LIST with a label selector, in one namespace)
every few seconds rather than watched through kopf: kopf watches a resource
in every namespace it serves, which for ConfigMaps would need the right to
read every ConfigMap in the cluster, a right Berth otherwise does without.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth.allocator.ranges import PortRange
from berth.events import EventSink
from berth.kube import KubeApi
from berth.view import ClusterView

log = logging.getLogger("berth.node_reports")
#: Events about cluster-scoped objects live here, as the kubelet's do.
NODE_EVENTS_NAMESPACE = "default"
OVERLAP_REASON = "EphemeralPortOverlap"


def ephemeral_overlaps(view: ClusterView) -> dict[str, tuple[PortRange, ...]]:
    """Per reporting node, the pool ports its outgoing connections may take."""
    found = {}
    for report in view.reports():
        overlap = report.ephemeral_overlap(view.pool_for(report.node).ranges)
        if overlap:
            found[report.node] = overlap
    return found


def node_reference(node: str, uid: str | None) -> dict[str, Any]:
    meta = {"name": node, "namespace": NODE_EVENTS_NAMESPACE, "uid": uid}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta}


class Changes(Protocol):
    """What reacts to a node's report changing (the repairer and allocation)."""

    def check_foreign(self, node: str) -> None: ...


class Waiters(Protocol):
    async def retry_waiting(self, node: str | None = None) -> None: ...


@dataclass
class NodeReports:
    client: KubeApi
    view: ClusterView
    repairer: Changes
    allocation: Waiters
    post_event: EventSink
    interval: float = 5.0
    #: node -> the overlap last reported by an Event (so each change warns once).
    _warned: dict[str, tuple[PortRange, ...]] = field(default_factory=dict)

    async def refresh(self) -> set[str]:
        """Re-list the reports and act on the nodes whose report changed."""
        changed = await self.view.resync_reports(self.client)
        for node in sorted(changed):
            report = self.view.node_report(node)
            log.info(
                "node %s report: %s",
                node,
                "gone" if report is None else f"{len(report.listener_ports())} listeners",
            )
            self.repairer.check_foreign(node)
            # A listener gone (or a node newly reporting) can change what fits.
            await self.allocation.retry_waiting(node)
        self.warn_overlaps()
        return changed

    def warn_overlaps(self) -> None:
        """A Warning Event on each node whose overlap appeared or changed."""
        current = ephemeral_overlaps(self.view)
        for node, overlap in current.items():
            if self._warned.get(node) == overlap:
                continue
            report = self.view.node_report(node)
            pool = self.view.pool_for(node)
            message = (
                f"ports {','.join(map(str, overlap))} of pool {pool.name} are inside the "
                f"node's ephemeral port range {report.ephemeral if report else '?'} "
                "(net.ipv4.ip_local_port_range) and not in net.ipv4.ip_local_reserved_ports: "
                "outgoing connections can take them before an engine binds them. Move the "
                "pool, raise the range, or let the node agent reserve the pool "
                "(agent.reserveKernelPorts)"
            )
            log.warning("node %s: %s", node, message)
            self.post_event(
                node_reference(node, self.view.node_uid(node)),
                type="Warning",
                reason=OVERLAP_REASON,
                message=message,
            )
        self._warned = current

    async def follow(self) -> None:
        """Refresh forever (a background task of the runtime)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("node reports not refreshed; retrying")
