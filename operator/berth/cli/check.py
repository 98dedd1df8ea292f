"""``berth check``: the fsck a user runs before trusting the cluster after an incident.

It compares, per node, what each live pod was delivered (its annotation, and
its ``<pod>-ports`` ConfigMap), what the ledger records, and the host ports
other pods declare. Overlaps are errors (exit status 1); a ledger that lags
behind the pods is a disagreement the operator's repair loop fixes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from berth.allocator.ranges import PortRange
from berth.ledger.records import NodeLedger
from berth.names import ANNOTATION_PORTS, pod_ports_configmap
from berth.pods import (
    decode_ports,
    delivered_ports,
    foreign_claim,
    is_berths,
    is_terminated,
    node_of,
)

Body = Mapping[str, Any]
Kind = Literal[
    "overlap", "foreign-overlap", "ledger-missing", "ledger-differs", "ledger-stale", "configmap"
]
ERRORS: frozenset[str] = frozenset({"overlap", "foreign-overlap"})


@dataclass(frozen=True)
class Finding:
    kind: Kind
    node: str
    pods: tuple[str, ...]
    detail: str

    @property
    def error(self) -> bool:
        return self.kind in ERRORS


def _name(body: Body) -> str:
    return f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def _show(blocks: Mapping[str, PortRange]) -> str:
    return " ".join(f"{name}={span}" for name, span in blocks.items())


def find(
    ledgers: Iterable[NodeLedger], pods: Iterable[Body], configmaps: Iterable[Body]
) -> list[Finding]:
    """Every disagreement between ledgers, delivered ports, ConfigMaps and foreign ports."""
    findings: list[Finding] = []
    cms = {(cm["metadata"]["namespace"], cm["metadata"]["name"]): cm for cm in configmaps}
    delivered: dict[str, list[tuple[Body, dict[str, PortRange]]]] = {}
    foreign = []
    for pod in pods:
        node = node_of(pod)
        if node is None or is_terminated(pod):
            continue
        if not is_berths(pod):
            if (claim := foreign_claim(pod)) is not None:
                foreign.append(claim)
            continue
        blocks = delivered_ports(pod)
        if blocks is None:
            continue
        delivered.setdefault(node, []).append((pod, blocks))
        meta = pod["metadata"]
        cm = cms.get((meta["namespace"], pod_ports_configmap(meta["name"])))
        text = ((cm or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_PORTS)
        if cm is None or (text and decode_ports(text) != blocks):
            what = "is missing" if cm is None else f"delivers {text}"
            findings.append(
                Finding(
                    "configmap", node, (_name(pod),), f"its ConfigMap {what}; pod: {_show(blocks)}"
                )
            )
    for node, held in delivered.items():
        for i, (pod, blocks) in enumerate(held):
            for other, theirs in held[i + 1 :]:
                for name, span in blocks.items():
                    for other_name, other_span in theirs.items():
                        if span.overlaps(other_span):
                            findings.append(
                                Finding(
                                    "overlap",
                                    node,
                                    (_name(pod), _name(other)),
                                    f"{name}={span} overlaps {other_name}={other_span}",
                                )
                            )
    for claim in foreign:
        for pod, blocks in delivered.get(claim.node, ()):
            for port in claim.ports:
                for name, span in blocks.items():
                    if port in span:
                        who = (_name(pod), f"{claim.namespace}/{claim.pod}")
                        detail = f"host port {port} inside {name}={span}"
                        findings.append(Finding("foreign-overlap", claim.node, who, detail))
    findings += _ledger_findings(ledgers, delivered)
    return findings


def _ledger_findings(
    ledgers: Iterable[NodeLedger],
    delivered: Mapping[str, Sequence[tuple[Body, Mapping[str, PortRange]]]],
) -> list[Finding]:
    findings = []
    by_node = {ledger.node: ledger for ledger in ledgers}
    for node in sorted(set(by_node) | set(delivered)):
        ledger = by_node.get(node)
        recorded = {h.uid: (h, a.blocks) for h, a in ledger.held()} if ledger else {}
        live = set()
        for pod, blocks in delivered.get(node, ()):
            uid = pod["metadata"]["uid"]
            live.add(uid)
            entry = recorded.get(uid)
            if entry is None:
                findings.append(Finding("ledger-missing", node, (_name(pod),), _show(blocks)))
            elif entry[1] != blocks:
                detail = f"ledger {_show(entry[1])}, pod {_show(blocks)}"
                findings.append(Finding("ledger-differs", node, (_name(pod),), detail))
        for uid, (holder, blocks) in recorded.items():
            if uid not in live:
                who = f"{holder.namespace}/{holder.pod}"
                detail = f"{_show(blocks)} held for a pod that is gone, finished or not delivered"
                findings.append(Finding("ledger-stale", node, (who,), detail))
    return findings


def render_text(findings: Sequence[Finding]) -> str:
    if not findings:
        return "ok: every delivered port is held once and recorded"
    lines = []
    for f in sorted(findings, key=lambda f: (not f.error, f.node, f.kind)):
        level = "ERROR" if f.error else "warn "
        lines.append(f"{level} {f.kind:<15} {f.node:<20} {' '.join(f.pods)}: {f.detail}")
    errors = sum(f.error for f in findings)
    lines.append(f"{errors} overlap(s), {len(findings) - errors} disagreement(s)")
    return "\n".join(lines)


def render_json(findings: Sequence[Finding]) -> str:
    return json.dumps([{**asdict(f), "error": f.error} for f in findings], indent=2)
