"""Delivered ports are facts: the repair loop and ownership, on a real API server.

Each test judges Berth by what pods were delivered (their annotations and
their ``<pod>-ports`` ConfigMaps, read here without Berth's code), never by
its ledgers: a running pod's ports never change (I3) and no port is held
twice (I1), whatever happens to the ledgers (docs/design.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.cluster import LocalCluster, node_manifest
from tests.support.operator_process import OperatorProcess, audit_lines, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    all_allocated,
    apply_deployment,
    custom_deployment,
    ensure_namespace,
)

Body = dict[str, Any]
#: pod uid -> (pod name, node, block name -> "first-last")
Delivered = dict[str, tuple[str, str, dict[str, str]]]
FAST_SWEEP = {"BERTH_SWEEP_INTERVAL": "2"}
REPAIR_STARTS = "repairing the ledgers of"


def span(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def delivered(cluster: Any, namespace: str) -> Delivered:
    """pod uid -> (pod name, node, blocks) as delivered, checked against the pod's
    ConfigMap: every port env var the pod's containers resolve must be the
    first port of a delivered block."""
    pods = cluster.json("get", "pods", "-n", namespace)["items"]
    cms = {
        cm["metadata"]["name"]: cm
        for cm in cluster.json("get", "configmaps", "-n", namespace)["items"]
    }
    out = {}
    for pod in pods:
        meta = pod["metadata"]
        text = (meta.get("annotations") or {}).get("berth.dev/ports")
        if not text or pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        blocks = json.loads(text)
        cm = cms[f"{meta['name']}-ports"]
        starts = {str(span(r).start) for r in blocks.values()}
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref["name"] == cm["metadata"]["name"]:
                    assert cm["data"][ref["key"]] in starts, (meta["name"], env, blocks)
        out[meta["uid"]] = (meta["name"], pod["spec"]["nodeName"], blocks)
    return out


def assert_disjoint(view: Delivered) -> None:
    seen: dict[tuple[str, int], str] = {}
    for name, node, blocks in view.values():
        for text in blocks.values():
            for port in span(text):
                key = (node, port)
                assert key not in seen, f"{node}:{port} held by {seen[key]} and {name}"
                seen[key] = name


def ledger_entries(cluster: Any, node: str) -> dict[str, str] | None:
    found = cluster.kubectl(
        "get",
        "configmap",
        f"berth-ledger.{node}",
        "-n",
        OPERATOR_NAMESPACE,
        "-o",
        "json",
        check=False,
    )
    if found.returncode != 0:
        return None
    data: dict[str, str] = json.loads(found.stdout).get("data") or {}
    return {k: v for k, v in data.items() if k != "pool"}


def ledger_agrees(
    cluster: Any, node: str, view: dict[str, tuple[str, str, dict[str, str]]]
) -> bool:
    entries = ledger_entries(cluster, node) or {}
    for uid, (_, on, blocks) in view.items():
        if on != node:
            continue
        line = entries.get(uid, "")
        recorded = dict(part.split("=") for part in line.split(" ")[-1].split(",") if "=" in part)
        if recorded != blocks:
            return False
    return True


@pytest.fixture
def operator(cluster: Any, crds: None, tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", env=FAST_SWEEP)
    yield proc.start()
    proc.stop()


def twelve_on_one_node(cluster: Any, namespace: str, name: str = "twelve") -> str:
    """Twelve pods pinned to one node: names -0..-11 list as -0, -1, -10, -11, -2, ..."""
    node = cluster.nodes[0]
    apply_deployment(cluster, namespace, custom_deployment(name, 12, node=node))
    wait_for(lambda: all_allocated(cluster, namespace, name, 12), timeout=90, what="12 pods")
    return node


def test_a_deleted_ledger_never_moves_a_running_pod(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    node = twelve_on_one_node(cluster, namespace)
    before = delivered(cluster, namespace)
    assert len(before) == 12
    cluster.kubectl("delete", "configmap", f"berth-ledger.{node}", "-n", OPERATOR_NAMESPACE)
    # Allocation on that node right away, then a restart: both must see the pods' truth.
    apply_deployment(cluster, namespace, custom_deployment("newcomer", 3, node=node))
    wait_for(lambda: all_allocated(cluster, namespace, "newcomer", 3), timeout=60, what="alloc")
    operator.kill()
    cluster.kubectl("delete", "configmap", f"berth-ledger.{node}", "-n", OPERATOR_NAMESPACE)
    operator.start()
    wait_for(
        lambda: ledger_agrees(cluster, node, delivered(cluster, namespace)),
        timeout=30,
        what="the ledger rebuilt from the delivered ports",
    )
    after = delivered(cluster, namespace)
    assert {uid: after[uid] for uid in before} == before
    assert_disjoint(after)
    moved = [
        line
        for line in audit_lines(operator.log)
        if line["audit"] == "allocate" and line["uid"] in before
    ]
    assert len(moved) == 12, "a running pod was allocated twice"
    repairs = [line for line in audit_lines(operator.log) if line["audit"] == "repair"]
    assert {line["uid"] for line in repairs} >= set(before)


def test_a_ledger_edited_by_hand_converges_to_the_pods(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    node = twelve_on_one_node(cluster, namespace)
    before = delivered(cluster, namespace)
    entries = ledger_entries(cluster, node)
    assert entries is not None
    uids = sorted(entries)
    # Three edits: one entry dropped, one moved onto another pod's ports, one garbage.
    first = entries[uids[0]]
    patch = {
        "data": {
            uids[1]: None,
            uids[2]: first.replace(first.split(" ")[1], "moved"),
            uids[3]: "not a ledger line",
        }
    }
    cluster.kubectl(
        "patch",
        "configmap",
        f"berth-ledger.{node}",
        "-n",
        OPERATOR_NAMESPACE,
        "--type=merge",
        "-p",
        json.dumps(patch),
    )
    wait_for(
        lambda: ledger_agrees(cluster, node, before),
        timeout=30,
        what="the sweep to rebuild the edited ledger",
    )
    apply_deployment(cluster, namespace, custom_deployment("after-edit", 2, node=node))
    wait_for(lambda: all_allocated(cluster, namespace, "after-edit", 2), timeout=60, what="alloc")
    after = delivered(cluster, namespace)
    assert {uid: after[uid] for uid in before} == before
    assert_disjoint(after)


def test_the_operators_namespace_deleted_and_reinstalled(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    twelve_on_one_node(cluster, namespace)
    before = delivered(cluster, namespace)
    operator.stop()
    cluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=true", "--timeout=60s")
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    operator.start()
    apply_deployment(cluster, namespace, custom_deployment("reinstalled", 4, node=cluster.nodes[0]))
    wait_for(lambda: all_allocated(cluster, namespace, "reinstalled", 4), timeout=60, what="alloc")
    after = delivered(cluster, namespace)
    assert {uid: after[uid] for uid in before} == before
    assert_disjoint(after)


def test_sigkill_in_the_middle_of_a_repair(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """Every ledger deleted, then the operator killed as the start-up repair begins
    or a few milliseconds into it: the next start must finish the job."""
    apply_deployment(cluster, namespace, custom_deployment("spread", 16))
    wait_for(lambda: all_allocated(cluster, namespace, "spread", 16), timeout=90, what="alloc")
    before = delivered(cluster, namespace)
    nodes = sorted({node for _, node, _ in before.values()})
    assert len(nodes) > 1, "the repair must span several nodes to be cut in the middle"
    cut = 0
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        operator.kill()
        for node in nodes:
            cluster.kubectl(
                "delete",
                "configmap",
                f"berth-ledger.{node}",
                "-n",
                OPERATOR_NAMESPACE,
                check=False,
            )
        seen = operator.log.read_text().count(REPAIR_STARTS)
        operator.start()
        # Kill as the start-up repair begins, or a few milliseconds into it.
        wait_for(
            lambda seen=seen: operator.log.read_text().count(REPAIR_STARTS) > seen,
            timeout=30,
            interval=0.001,
            what="the repair to start",
        )
        time.sleep(delay)
        operator.kill()
        cut += not all(ledger_agrees(cluster, node, before) for node in nodes)
    assert cut >= 1, "no kill landed before the repair had finished"
    operator.start()
    for node in nodes:
        wait_for(lambda node=node: ledger_agrees(cluster, node, before), timeout=30, what=node)
    after = delivered(cluster, namespace)
    assert after == before
    assert_disjoint(after)


def test_a_late_foreign_pod_on_a_held_port_is_reported(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    node = cluster.nodes[1]
    one = [{"name": "http", "size": 4, "env": [{"name": "HTTP_PORT"}]}]
    apply_deployment(cluster, namespace, custom_deployment("held", 1, one, node))
    wait_for(lambda: all_allocated(cluster, namespace, "held", 1), timeout=60, what="alloc")
    ((name, _, blocks),) = delivered(cluster, namespace).values()
    port = span(blocks["http"]).start + 1
    foreign = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "late-agent", "namespace": namespace},
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "containers": [{"name": "a", "image": "a:1", "ports": [{"containerPort": port}]}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(foreign))

    def reported() -> bool:
        events = cluster.json("get", "events", "-n", namespace)["items"]
        flagged = {e["involvedObject"]["name"] for e in events if e["reason"] == "PortConflict"}
        return {name, "late-agent"} <= flagged

    wait_for(reported, timeout=30, what="PortConflict Events on both pods")
    wait_for(
        lambda: any(
            c["type"] == "PortConflict" and c["status"] == "True" and str(port) in c["message"]
            for c in cluster.json("get", "infd", "held", "-n", namespace)["status"]["conditions"]
        ),
        timeout=30,
        what="the PortConflict condition",
    )
    assert any(
        line["audit"] == "conflict" and line["pod"] == name for line in audit_lines(operator.log)
    )
    # Leave no overlap behind for the cluster-wide checks of later tests.
    cluster.kubectl("delete", "pod", "late-agent", "-n", namespace, "--wait=true")


def test_a_users_objects_are_never_overwritten_adopted_or_deleted(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    mine = [
        {"kind": "ConfigMap", "name": "web-port-map", "data": {"important": "user-data"}},
        {"kind": "ConfigMap", "name": "web-worker-0-ports", "data": {"mine": "keep-me"}},
    ]
    for cm in mine:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm["name"]}}
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps({**body, "data": cm["data"]})
        )
    user_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-worker-1", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "c:1"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(user_pod))
    apply_deployment(cluster, namespace, custom_deployment("web", 3))

    def degraded() -> str:
        body = cluster.json("get", "infd", "web", "-n", namespace)
        for c in (body.get("status") or {}).get("conditions") or []:
            if c["type"] == "Degraded" and c["status"] == "True" and c["reason"] == "NameClash":
                return str(c["message"])
        return ""

    message = wait_for(degraded, timeout=60, what="Degraded/NameClash")
    for name in ("web-port-map", "web-worker-0-ports", "web-worker-1"):
        assert name in message
    wait_for(lambda: all_allocated(cluster, namespace, "web", 1), timeout=60, what="web-worker-2")
    for cm in mine:
        body = cluster.json("get", "configmap", cm["name"], "-n", namespace)
        assert body["data"] == cm["data"]
        assert not body["metadata"].get("ownerReferences")
    pod = cluster.json("get", "pod", "web-worker-1", "-n", namespace)
    assert not pod["metadata"].get("ownerReferences")
    assert "berth.dev/ports" not in (pod["metadata"].get("annotations") or {})
    gone = cluster.kubectl("get", "pod", "web-worker-0", "-n", namespace, check=False)
    assert gone.returncode != 0, "a pod whose ConfigMap name is taken was created"
    events = cluster.json("get", "events", "-n", namespace)["items"]
    assert any(e["reason"] == "NameClash" for e in events)


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_a_control_plane_restart_during_allocation(
    cluster: Any, operator: OperatorProcess, namespace: str, component: str
) -> None:
    """The API server (or etcd under it) goes away while pods are being allocated."""
    if cluster.external:
        pytest.skip("restarting the control plane needs the local test bed")
    bed = LocalCluster(cluster.dir)
    apply_deployment(cluster, namespace, custom_deployment("before", 8))
    wait_for(lambda: all_allocated(cluster, namespace, "before", 8), timeout=90, what="alloc")
    before = delivered(cluster, namespace)
    apply_deployment(cluster, namespace, custom_deployment("during", 24))
    time.sleep(0.5)  # the operator is creating and allocating "during"
    bed.restart(component, down_for=2.0, die_with_parent="BERTH_CLUSTER_DIR" not in os.environ)
    wait_for(lambda: all_allocated(cluster, namespace, "during", 24), timeout=120, what="alloc")
    after = delivered(cluster, namespace)
    assert {uid: after[uid] for uid in before} == before
    assert_disjoint(after)
    assert operator.alive()


def test_widening_a_pool_serves_the_waiting_pod_at_once(
    cluster: Any, crds: None, namespace: str, tmp_path: Path
) -> None:
    """A pool change wakes the pods waiting for ports, not the next sweep."""
    if cluster.external:
        pytest.skip("adds a kwok node: needs the local test bed")
    # A node of its own: no other pod's blocks there (the advertised count
    # would leave out runs shorter than the largest block held on the node).
    node = f"wide-{namespace}"[:63]
    body = node_manifest(0, max_pods=16)
    body["metadata"]["name"] = node
    body["metadata"]["labels"]["kubernetes.io/hostname"] = node
    cluster.kubectl("create", "-f", "-", input=json.dumps(body))
    proc = OperatorProcess(
        cluster.kubeconfig, tmp_path / "slow-sweep.log", env={"BERTH_SWEEP_INTERVAL": "600"}
    ).start()
    # Nine ports fit the pod's nine by count (so the scheduler binds it), but a
    # reserved port splits them and its 8-port block fits no run: it waits.
    pool = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": "narrow"},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "ranges": [{"start": 27000, "end": 27009}],
            "reserved": [{"start": 27002}],
            "priority": 1000,
        },
    }
    blocks = [
        {"name": "http", "size": 1, "env": [{"name": "HTTP_PORT"}]},
        {"name": "side", "size": 8, "env": [{"name": "SIDE_PORT"}]},
    ]
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pool))
        time.sleep(1)
        apply_deployment(cluster, namespace, custom_deployment("wide", 1, blocks, node))
        wait_for(
            lambda: any(line["audit"] == "exhausted" for line in audit_lines(proc.log)),
            timeout=60,
            what="the pod to wait for ports",
        )
        pool["spec"]["ranges"] = [{"start": 27000, "end": 27099}]
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pool))
        started = time.monotonic()
        wait_for(lambda: all_allocated(cluster, namespace, "wide", 1), timeout=20, what="alloc")
        assert time.monotonic() - started < 20  # the sweep would take 600 s
    finally:
        proc.stop()
        cluster.kubectl("delete", "nodeportpool", "narrow", check=False)
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_berth_check_finds_an_overlap_and_says_ok_otherwise(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    def check() -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
        return subprocess.run(
            [sys.executable, "-m", "berth.cli.main", "check", "-o", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )

    node = cluster.nodes[3]
    apply_deployment(cluster, namespace, custom_deployment("fsck", 2, node=node))
    wait_for(lambda: all_allocated(cluster, namespace, "fsck", 2), timeout=60, what="alloc")
    healthy = check()
    # Cluster-wide: other tests' namespaces may still be going away; judge ours.
    mine = [f for f in json.loads(healthy.stdout) if namespace in " ".join(f["pods"])]
    assert healthy.returncode in (0, 1), healthy.stderr
    assert not [f for f in mine if f["error"]], mine
    (first, _, a), (second, _, _) = delivered(cluster, namespace).values()
    operator.stop()  # a hand edit the repair loop must not see first
    try:
        cluster.kubectl(
            "annotate",
            "pod",
            second,
            "-n",
            namespace,
            "--overwrite",
            f"berth.dev/ports={json.dumps(a)}",
        )
        broken = check()
        assert broken.returncode == 1, broken.stdout
        overlaps = [f for f in json.loads(broken.stdout) if f["kind"] == "overlap"]
        assert any(
            {f"{namespace}/{first}", f"{namespace}/{second}"} == set(f["pods"]) for f in overlaps
        )
    finally:
        cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=true", "--timeout=60s")
        cluster.kubectl("delete", "infd", "--all", "-n", namespace, "--wait=true")
