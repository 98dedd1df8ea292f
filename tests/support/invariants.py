"""Invariants I1-I3 of DESIGN.md, checked against what the API server holds."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from kubernetes import watch

from berth.allocator.ranges import PortRange
from berth.ledger.records import NodeLedger
from berth.names import ANNOTATION_PORTS, LABEL_LEDGER, LABEL_MANAGED_BY, MANAGED_BY

# node -> uid -> block name -> range
LedgerView = dict[str, dict[str, dict[str, PortRange]]]


def decode_ledgers(items: list[Mapping[str, Any]], namespace: str | None = None) -> LedgerView:
    """node -> uid -> blocks; only pods of ``namespace`` when given."""
    view: LedgerView = {}
    for cm in items:
        ledger = NodeLedger.decode(
            cm["metadata"]["annotations"]["berth.dev/node"], cm.get("data") or {}
        )
        view[ledger.node] = {
            holder.uid: dict(assignment.blocks)
            for holder, assignment in ledger.held()
            if namespace is None or holder.namespace == namespace
        }
    return view


def read_ledgers(cluster: Any, pods_in: str | None = None) -> LedgerView:
    out = cluster.kubectl(
        "get", "configmaps", "-n", "berth-system", "-l", f"{LABEL_LEDGER}=true", "-o", "json"
    ).stdout
    return decode_ledgers(json.loads(out)["items"], pods_in)


def berth_pods(cluster: Any) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-A", "-l", f"{LABEL_MANAGED_BY}={MANAGED_BY}", "-o", "json"
    ).stdout
    pods: list[dict[str, Any]] = json.loads(out)["items"]
    return pods


def assert_no_overlap(view: LedgerView) -> None:
    """I1: on every node, no port is held twice."""
    for node, holders in view.items():
        spans = sorted(
            (rng.start, rng.end, uid, name)
            for uid, blocks in holders.items()
            for name, rng in blocks.items()
        )
        for (s1, e1, u1, n1), (s2, e2, u2, n2) in pairwise(spans):
            assert s2 > e1, f"I1 broken on {node}: {u1}/{n1} {s1}-{e1} overlaps {u2}/{n2} {s2}-{e2}"


def assert_no_leak(view: LedgerView, pods: list[Mapping[str, Any]]) -> None:
    """I2: once quiet, held blocks == blocks of live, bound, non-terminated pods."""
    live = {
        (p["spec"]["nodeName"], p["metadata"]["uid"])
        for p in pods
        if p["spec"].get("nodeName")
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    }
    held = {(node, uid) for node, holders in view.items() for uid in holders}
    assert held == live, f"I2 broken: leaked {held - live}, missing {live - held}"


def pod_ports(pods: list[Mapping[str, Any]]) -> dict[str, str]:
    """uid -> the ports annotation, for I3 (ports never change)."""
    return {
        p["metadata"]["uid"]: p["metadata"]["annotations"][ANNOTATION_PORTS]
        for p in pods
        if ANNOTATION_PORTS in p["metadata"].get("annotations", {})
    }


class LedgerWatcher:
    """Checks I1 on every ledger state the API server publishes, in a thread."""

    def __init__(self, core_api: Any, namespace: str = "berth-system") -> None:
        self._core = core_api
        self._namespace = namespace
        self._stop = threading.Event()
        self.states_seen = 0
        self.violations: list[str] = []
        self._nodes: dict[str, dict[str, str]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LedgerWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            for event in w.stream(
                self._core.list_namespaced_config_map,
                self._namespace,
                label_selector=f"{LABEL_LEDGER}=true",
                timeout_seconds=2,
            ):
                cm = event["object"]
                node = cm.metadata.annotations["berth.dev/node"]
                if event["type"] == "DELETED":
                    self._nodes.pop(node, None)
                    continue
                self.states_seen += 1
                try:
                    assert_no_overlap(
                        decode_ledgers(
                            [
                                {
                                    "metadata": {"annotations": cm.metadata.annotations},
                                    "data": cm.data or {},
                                }
                            ]
                        )
                    )
                except AssertionError as error:
                    self.violations.append(str(error))
                if self._stop.is_set():
                    w.stop()
