"""A node's report: the ConfigMap ``berth-node.<node>`` the agent writes, Berth reads.

Layout (``data``), each value a short line so the object stays small and
changes only when the node does (no timestamps: a write means a change)::

    ephemeral:        "32768-60999"         net.ipv4.ip_local_port_range
    kernelReserved:   "20000-29999,30100"   net.ipv4.ip_local_reserved_ports
    agentReserved:    "20000-29999"         the part of it the agent added
    tcp:              "22,111,8000-8003"    TCP ports in LISTEN, IPv4 and IPv6
    udp:              "53,323"              UDP ports bound, unconnected
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.agent.procfs import format_ranges, parse_port_range, parse_ranges, ports_of
from berth.allocator import intervals
from berth.allocator.ranges import PortRange
from berth.names import ANNOTATION_LEDGER_NODE, GROUP, LABEL_MANAGED_BY, MANAGED_BY

LABEL_NODE_REPORT = f"{GROUP}/node-report"
REPORT_PREFIX = "berth-node."
REPORT_SELECTOR = f"{LABEL_NODE_REPORT}=true"
#: The node a report is about (the ConfigMap's name may be truncated one day).
ANNOTATION_NODE = ANNOTATION_LEDGER_NODE


def report_configmap(node: str) -> str:
    return f"{REPORT_PREFIX}{node}"


@dataclass(frozen=True)
class NodeReport:
    node: str
    ephemeral: PortRange | None = None
    kernel_reserved: tuple[PortRange, ...] = ()
    agent_reserved: tuple[PortRange, ...] = ()
    tcp: tuple[PortRange, ...] = ()
    udp: tuple[PortRange, ...] = ()

    def encode(self) -> dict[str, str]:
        return {
            "ephemeral": str(self.ephemeral) if self.ephemeral else "",
            "kernelReserved": format_ranges(self.kernel_reserved),
            "agentReserved": format_ranges(self.agent_reserved),
            "tcp": format_ranges(self.tcp),
            "udp": format_ranges(self.udp),
        }

    @classmethod
    def decode(cls, node: str, data: Mapping[str, str]) -> NodeReport:
        """Raises ValueError on data no agent wrote."""
        ephemeral = data.get("ephemeral", "").replace("-", " ")
        return cls(
            node,
            parse_port_range(ephemeral) if ephemeral else None,
            *(
                parse_ranges(data.get(key, ""))
                for key in ("kernelReserved", "agentReserved", "tcp", "udp")
            ),
        )

    def listener_ports(self) -> set[int]:
        """Every port a TCP or UDP socket listens on."""
        return ports_of(self.tcp) | ports_of(self.udp)

    def ephemeral_overlap(self, pool: tuple[PortRange, ...]) -> tuple[PortRange, ...]:
        """Pool ports that outgoing connections may take: inside the ephemeral
        range and not kept out of it by ``ip_local_reserved_ports``."""
        if self.ephemeral is None:
            return ()
        span = self.ephemeral
        inside = intervals.intersect(*intervals.normalise(pool), span.start, span.end)
        starts, ends = [s for s, _ in inside], [e for _, e in inside]
        exposed = intervals.subtract(starts, ends, *intervals.normalise(self.kernel_reserved))
        return tuple(PortRange(s, e) for s, e in zip(*exposed, strict=True))


def report_entry(body: Mapping[str, Any]) -> NodeReport | None:
    """The report a ConfigMap carries; None when it is not one an agent wrote."""
    meta = body["metadata"]
    node = (meta.get("annotations") or {}).get(ANNOTATION_NODE) or str(meta["name"]).removeprefix(
        REPORT_PREFIX
    )
    if (meta.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
        return None
    try:
        return NodeReport.decode(node, body.get("data") or {})
    except ValueError:
        return None


def report_body(
    report: NodeReport, namespace: str, node_uid: str | None, resource_version: str | None
) -> dict[str, object]:
    """The ConfigMap: labelled like the ledgers, owned by its Node (collected with it)."""
    metadata: dict[str, object] = {
        "name": report_configmap(report.node),
        "namespace": namespace,
        "labels": {LABEL_NODE_REPORT: "true", LABEL_MANAGED_BY: MANAGED_BY},
        "annotations": {ANNOTATION_NODE: report.node},
    }
    if node_uid:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": report.node, "uid": node_uid}
        ]
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": report.encode()}
