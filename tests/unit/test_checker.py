"""The invariant checker of tests/support judged on hand-made pods: it must go red."""

from __future__ import annotations

import json
from typing import Any

from tests.support.invariants import ClusterState, StableTracker, resolve_env

PLAN = json.dumps(
    {
        "firstRank": 2,
        "blocks": [
            {"name": "http", "size": 1, "align": 1, "env": [["HTTP_PORT", "start", 0]]},
            {"name": "nixl", "size": 4, "align": 1, "env": [["NIXL_PORT", "rankBase", 1]]},
        ],
    }
)


def ref(var: str, cm: str, optional: bool = False) -> dict[str, Any]:
    key_ref: dict[str, Any] = {"name": cm, "key": var}
    if optional:
        key_ref["optional"] = True
    return {"name": var, "valueFrom": {"configMapKeyRef": key_ref}}


def pod(name: str, ports: dict[str, str] | None, node: str = "n1") -> dict[str, Any]:
    annotations = {"berth.dev/port-plan": PLAN}
    if ports is not None:
        annotations["berth.dev/ports"] = json.dumps(ports)
    env = [ref("HTTP_PORT", f"{name}-ports"), ref("NIXL_PORT", f"{name}-ports")]
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": {"app.kubernetes.io/managed-by": "berth"},
            "annotations": annotations,
        },
        "spec": {"nodeName": node, "containers": [{"name": "engine", "env": env}]},
        "status": {"phase": "Running"},
    }


def configmap(name: str, http: int, nixl_base: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{name}-ports",
            "namespace": "ns",
            "ownerReferences": [{"kind": "Pod", "uid": f"uid-{name}"}],
        },
        "data": {"HTTP_PORT": str(http), "NIXL_PORT": str(nixl_base)},
    }


# a: http 20000, nixl 20001-20004 (rank base 20001 - 2); b: http 20005, nixl 20006-20009
A = pod("a", {"http": "20000", "nixl": "20001-20004"})
B = pod("b", {"http": "20005", "nixl": "20006-20009"})
CLEAN = [configmap("a", 20000, 19999), configmap("b", 20005, 20004)]


def test_clean_pods_pass() -> None:
    state = ClusterState.of([A, B], CLEAN)
    assert state.overlap_violations() == []
    assert state.delivery_violations() == []


def test_a_configmap_value_overlapping_another_pod_is_caught() -> None:
    state = ClusterState.of([A, B], [CLEAN[0], configmap("b", 20005, 20001)])
    found = state.overlap_violations()
    assert any("I1 on n1" in v and "env nixl" in v for v in found), found
    assert any("the annotation at" in v for v in found), found  # env and annotation disagree


def test_foreign_host_ports_count() -> None:
    foreign: dict[str, Any] = {
        "metadata": {"name": "agent", "namespace": "kube-system", "uid": "f", "labels": {}},
        "spec": {
            "nodeName": "n1",
            "hostNetwork": True,
            "containers": [{"name": "x", "ports": [{"containerPort": 20003}]}],
        },
    }
    elsewhere = {**foreign, "spec": {**foreign["spec"], "nodeName": "n2"}}
    assert ClusterState.of([A, B, elsewhere], CLEAN).overlap_violations() == []
    found = ClusterState.of([A, B, foreign], CLEAN).overlap_violations()
    assert found and all("foreign" in v for v in found), found


def test_pods_that_are_gone_finished_or_on_deleted_nodes_hold_nothing() -> None:
    finished = {**pod("c", {"http": "20000", "nixl": "20001-20004"}), "status": {"phase": "Failed"}}
    assert ClusterState.of([A, finished], CLEAN).overlap_violations() == []
    ghost = pod("c", {"http": "20000", "nixl": "20001-20004"}, node="gone")
    state = ClusterState.of([A, ghost, pod("d", {"http": "20000"}, node="gone")], CLEAN, ["n1"])
    assert state.overlap_violations() == []


def test_kubelet_resolution_later_entries_win_and_optional_refs_may_be_missing() -> None:
    container = {
        "name": "engine",
        "envFrom": [{"configMapRef": {"name": "a-ports"}, "prefix": "X_"}],
        "env": [
            ref("HTTP_PORT", "a-ports"),
            {"name": "HTTP_PORT", "value": "1"},  # overrides: not a ConfigMap value any more
            ref("NIXL_PORT", "missing", optional=True),
            ref("OTHER", "missing"),
        ],
    }
    values, errors = resolve_env(A, container, {("ns", "a-ports"): CLEAN[0]})
    assert values == {"X_HTTP_PORT": "20000", "X_NIXL_PORT": "19999"}
    assert errors == ["OTHER: missing[OTHER] missing"]


def test_i2_wants_every_block_delivered() -> None:
    state = ClusterState.of([A, pod("b", None)], CLEAN[:1])
    found = state.delivery_violations()
    assert len(found) == 3 and all(v.startswith("I2: ns/b") for v in found), found


def test_i3_remembers_the_first_delivery_of_each_uid() -> None:
    tracker = StableTracker()
    tracker.observe_all(ClusterState.of([A, B], CLEAN))
    assert tracker.violations == []
    moved = pod("b", {"http": "20010", "nixl": "20011-20014"})
    tracker.observe_all(ClusterState.of([A, moved], CLEAN))
    assert any("I3: ns/b" in v and "annotation changed" in v for v in tracker.violations)


def test_ledger_must_agree_with_delivery() -> None:
    ledger: dict[str, Any] = {
        "metadata": {
            "name": "berth-ledger.n1",
            "namespace": "berth-system",
            "labels": {"berth.dev/ledger": "true"},
            "annotations": {"berth.dev/node": "n1"},
        },
        "data": {
            "pool": "default 20000-29999 reserved=",
            "uid-a": "ns a d worker http=20000,nixl=20001-20004",
            "uid-b": "ns b d worker http=20005,nixl=20006-20009",
        },
    }
    assert ClusterState.of([A, B], [*CLEAN, ledger]).ledger_violations(strict=True) == []
    lost = {**ledger, "data": {k: v for k, v in ledger["data"].items() if k != "uid-b"}}
    state = ClusterState.of([A, B], [*CLEAN, lost])
    assert state.ledger_violations(strict=False) == []  # mid-run, a lag is allowed
    assert state.ledger_violations(strict=True) == ["ledger n1 lacks ns/b (uid-b)"]
    forged = {**ledger, "data": {**ledger["data"], "ghost": "ns g - - http=20005"}}
    found = ClusterState.of([A, B], [*CLEAN, forged]).ledger_violations(strict=False)
    assert found and "holds ports delivered to ns/b" in found[0], found
