"""``berth ranges``: the per-node range map, read from the ledgers, and what
each node's agent reports (ephemeral range, listeners, conflicts)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from berth.agent.procfs import format_ranges, ports_of, ranges_of
from berth.agent.report import NodeReport
from berth.ledger.records import NodeLedger


@dataclass(frozen=True)
class NodeFindings:
    """What a node's report says against its ledger."""

    ephemeral: str
    kernel_reserved: str
    #: Listening ports inside the pool that no Berth pod holds, per protocol.
    undeclared: dict[str, str]
    #: Pool ports outgoing connections may take.
    ephemeral_overlap: str
    #: "TCP 20001 in ns/pod http=20001-20004" for each listener inside a held block.
    in_blocks: list[str]


def findings(ledger: NodeLedger | None, report: NodeReport) -> NodeFindings:
    pool = ledger.pool.ranges if ledger else ()
    held = [(h, a) for h, a in ledger.held()] if ledger else []
    held_ports = ports_of(span for _, a in held for span in a.blocks.values())
    in_pool = ports_of(pool)
    undeclared, in_blocks = {}, []
    for protocol, spans in (("tcp", report.tcp), ("udp", report.udp)):
        ports = ports_of(spans)
        undeclared[protocol] = format_ranges(ranges_of((ports & in_pool) - held_ports))
        for holder, assignment in held:
            for name, span in assignment.blocks.items():
                for port in sorted(p for p in ports if p in span):
                    who = f"{holder.namespace}/{holder.pod}"
                    in_blocks.append(f"{protocol.upper()} {port} in {who} {name}={span}")
    return NodeFindings(
        str(report.ephemeral or "?"),
        format_ranges(report.kernel_reserved),
        undeclared,
        format_ranges(report.ephemeral_overlap(pool)),
        in_blocks,
    )


def _node_lines(ledger: NodeLedger | None, report: NodeReport | None) -> list[str]:
    if report is None:
        return []
    found = findings(ledger, report)
    listeners = " ".join(f"{p}={found.undeclared[p] or '-'}" for p in ("tcp", "udp"))
    lines = [
        f"  node: ephemeral={found.ephemeral} kernel-reserved={found.kernel_reserved or '-'} "
        f"undeclared-listeners-in-pool: {listeners}"
    ]
    if found.ephemeral_overlap:
        lines.append(
            f"  CONFLICT ephemeral range overlaps the pool at {found.ephemeral_overlap} "
            "(not in ip_local_reserved_ports)"
        )
    lines += [
        f"  CONFLICT {entry} (the pod's own if it uses hostNetwork)" for entry in found.in_blocks
    ]
    return lines


def render_table(ledgers: Sequence[NodeLedger], reports: Sequence[NodeReport] = ()) -> str:
    by_node = {ledger.node: ledger for ledger in ledgers}
    by_report = {report.node: report for report in reports}
    lines = []
    for node in sorted(set(by_node) | set(by_report)):
        ledger = by_node.get(node)
        if ledger is None:
            lines.append(f"{node}  (no allocations)")
        else:
            allocator = ledger.allocator
            lines.append(
                f"{ledger.node}  pool={ledger.pool.name} "
                f"[{','.join(map(str, ledger.pool.ranges))}]  "
                f"used={allocator.size - allocator.free}/{allocator.size}"
            )
        lines += _node_lines(ledger, by_report.get(node))
        for holder, assignment in ledger.held() if ledger else ():
            blocks = " ".join(f"{name}={rng}" for name, rng in assignment.blocks.items())
            who = f"{holder.namespace}/{holder.pod}"
            lines.append(f"  {who:<40} {holder.role or '-':<8} {blocks}")
    return "\n".join(lines) if lines else "(no allocations)"


def render_json(ledgers: Sequence[NodeLedger], reports: Sequence[NodeReport] = ()) -> str:
    out: dict[str, dict[str, Any]] = {
        ledger.node: {
            "pool": ledger.pool.name,
            "ranges": [str(r) for r in ledger.pool.ranges],
            "pods": [
                {
                    "namespace": h.namespace,
                    "pod": h.pod,
                    "uid": h.uid,
                    "deployment": h.deployment,
                    "role": h.role,
                    "blocks": {n: str(r) for n, r in a.blocks.items()},
                }
                for h, a in ledger.held()
            ],
        }
        for ledger in ledgers
    }
    by_node = {ledger.node: ledger for ledger in ledgers}
    for report in reports:
        found = findings(by_node.get(report.node), report)
        out.setdefault(report.node, {})["agent"] = {
            "ephemeral": found.ephemeral,
            "kernelReserved": found.kernel_reserved,
            "undeclaredListeners": found.undeclared,
            "ephemeralOverlap": found.ephemeral_overlap,
            "listenersInBlocks": found.in_blocks,
        }
    return json.dumps(out, indent=2, sort_keys=True)
