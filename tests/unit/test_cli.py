"""``berth check`` and ``berth ranges`` on objects as the API server returns them."""

from __future__ import annotations

import json
from typing import Any

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.cli import check, ranges
from berth.ledger.records import Holder, NodeLedger
from berth.names import ANNOTATION_PORTS, LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from berth.pools import Pool

Body = dict[str, Any]


def pod(name: str, ports: str | None, node: str = "n1", *, berth: bool = True) -> Body:
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: "web"} if berth else {}
    annotations = {ANNOTATION_PORTS: ports} if ports else {}
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running"},
    }


def configmap(name: str, ports: str) -> Body:
    meta = {"name": f"{name}-ports", "namespace": "ns", "annotations": {ANNOTATION_PORTS: ports}}
    return {"metadata": meta, "data": {}}


def ledger(*held: tuple[str, str]) -> NodeLedger:
    ledger = NodeLedger.empty("n1", Pool("default", (PortRange(20000, 29999),)))
    for name, span in held:
        uid = f"uid-{name}"
        ledger.allocator.adopt(Assignment(uid, {"http": PortRange.parse(span)}))
        ledger.holders[uid] = Holder("ns", name, uid, "web", "d")
    return ledger


def test_a_consistent_cluster_is_ok() -> None:
    a, b = '{"http":"20000"}', '{"http":"20001"}'
    pods = [pod("a", a), pod("b", b)]
    findings = check.find(
        [ledger(("a", "20000"), ("b", "20001"))],
        pods,
        [
            configmap("a", a),
            configmap("b", b),
        ],
    )
    assert findings == []
    assert check.render_text(findings).startswith("ok")


def test_overlaps_are_errors_and_lagging_ledgers_are_not() -> None:
    a = '{"http":"20000-20003"}'
    pods = [
        pod("a", a),
        pod("b", '{"http":"20002"}'),  # overlaps a
        pod("agent", None, berth=False),
    ]
    pods[2]["spec"] = {
        "nodeName": "n1",
        "hostNetwork": True,
        "containers": [{"name": "c", "ports": [{"containerPort": 20001}]}],
    }
    cms = [configmap("a", a)]
    findings = check.find([ledger(("a", "20000-20003"), ("gone", "20010"))], pods, cms)
    kinds = sorted(f.kind for f in findings)
    assert kinds == ["configmap", "foreign-overlap", "ledger-missing", "ledger-stale", "overlap"]
    errors = [f for f in findings if f.error]
    assert {f.kind for f in errors} == {"overlap", "foreign-overlap"}
    assert "ns/a ns/b" in check.render_text(findings)
    parsed = json.loads(check.render_json(findings))
    assert sum(entry["error"] for entry in parsed) == 2


def test_ranges_table_lists_every_holder() -> None:
    table = ranges.render_table([ledger(("a", "20000"), ("b", "20001-20004"))])
    assert "used=5/10000" in table
    assert "ns/a" in table and "http=20001-20004" in table
