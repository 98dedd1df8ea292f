"""berth.dev/ports on the local control plane: the real kube-scheduler places
Berth's pods only where their ports fit, and the figure outlives the operator.

Each test makes its own kwok nodes, labelled and tainted for it alone (other
tests' pods never land there), with a NodePortPool each. Pods ask for 5
ports (blocks of 1 and 4). The operator runs out of cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from testbed.cluster import node_manifest
from testbed.toolchain import Toolchain
from testbed.workloads import engine_deployment
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    custom_deployment,
    ensure_namespace,
    install_crds,
    pods_of,
)

from berth.capacity import INSUFFICIENT, RESOURCE, published, status_patch

ROOT = Path(__file__).resolve().parents[2]
Cluster = Any  # tests/integration/conftest.py's Cluster
Body = dict[str, Any]
TEST_KEY = "berth.dev/capacity-test"
PER_POD = 5


def figure(cluster: Cluster, node: str) -> int | None:
    return published(cluster.json("get", "node", node))


def capacity_figure(cluster: Cluster, node: str) -> str | None:
    status = cluster.json("get", "node", node).get("status", {})
    value: str | None = status.get("capacity", {}).get(RESOURCE)
    return value


def apply(cluster: Cluster, body: Body, namespace: str | None = None) -> None:
    if namespace:
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def pool(name: str, node: str, size: int, start: int = 21000) -> Body:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "ranges": [{"start": start, "end": start + size - 1}],
            "priority": 1000,
            # The real node's pool lies above the ephemeral range, as in test_real_node.
            "allowUnsafeRanges": start > 32767,
        },
    }


@dataclass
class Bed:
    cluster: Cluster
    namespace: str
    nodes: list[str]
    operator: OperatorProcess
    tag: str  # the nodes' TEST_KEY label

    def pool(self, index: int, size: int) -> None:
        apply(self.cluster, pool(self.nodes[index], self.nodes[index], size))

    def deploy(self, name: str, replicas: int, node: str | None = None) -> None:
        """Pods for these nodes only (``node``: one of them)."""
        body = custom_deployment(name, replicas, image=self.cluster.image)
        spec = body["spec"]["roles"][0]["template"]["spec"]
        spec["nodeSelector"] = {TEST_KEY: self.tag}
        if node:
            spec["nodeSelector"]["kubernetes.io/hostname"] = node
        spec["tolerations"] = [{"key": TEST_KEY, "operator": "Exists"}]
        apply(self.cluster, body, self.namespace)

    def pods(self, deployment: str) -> list[Body]:
        return pods_of(self.cluster, self.namespace, deployment)

    def allocated(self, deployment: str, count: int) -> list[Body] | None:
        pods = self.pods(deployment)
        done = [p for p in pods if "berth.dev/ports" in p["metadata"].get("annotations", {})]
        return pods if len(pods) == len(done) == count else None

    def advertises(self, index: int, count: int, timeout: float = 10) -> float:
        """Wait until node ``index`` advertises ``count``; returns the seconds it took."""
        started = time.monotonic()
        node = self.nodes[index]
        wait_for(lambda: figure(self.cluster, node) == count, timeout, what=f"{node}: {count}")
        return time.monotonic() - started

    def exhausted_events(self) -> list[str]:
        items = self.cluster.json("get", "events", "-n", self.namespace)["items"]
        return [e["message"] for e in items if e.get("reason") == "PortsExhausted"]


def start(operator: OperatorProcess) -> OperatorProcess:
    """Start it and wait for its start-up (which advertises every node) to finish."""

    def starts() -> int:
        return operator.log.read_text().count("berth started") if operator.log.exists() else 0

    before = starts()
    operator.start()
    wait_for(lambda: starts() > before, 90, what="operator start-up")
    return operator


def make_nodes(cluster: Cluster, tag: str, count: int) -> list[str]:
    """kwok nodes for one test: labelled with ``tag`` and tainted so only its pods come."""
    names = []
    for i in range(count):
        body = node_manifest(200 + i, 32)
        name = f"cap-{tag}-{i}"[:63]
        body["metadata"]["name"] = name
        body["metadata"]["labels"].update({"kubernetes.io/hostname": name, TEST_KEY: tag})
        address = f"172.18.{200 + i}.{int(tag[-4:], 16) % 250 + 1}"
        body["status"]["addresses"] = [
            {"type": "InternalIP", "address": address},
            {"type": "Hostname", "address": name},
        ]
        body["spec"] = {"taints": [{"key": TEST_KEY, "value": tag, "effect": "NoSchedule"}]}
        apply(cluster, body)
        names.append(name)

    def ready() -> bool:
        for name in names:
            node = cluster.json("get", "node", name)
            conditions = node.get("status", {}).get("conditions") or []
            taints = node.get("spec", {}).get("taints") or []
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return False
            if any(t["key"].startswith("node.kubernetes.io/") for t in taints):
                return False
        return True

    wait_for(ready, timeout=60, what=f"nodes {names} Ready")
    return names


@pytest.fixture
def bed(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Bed]:
    if cluster.external:
        pytest.fail("these tests make kwok nodes: they need the local test bed", pytrace=False)
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    tag = namespace.rsplit("-", 1)[-1]
    nodes = make_nodes(cluster, tag, 2)
    operator = start(OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log"))
    try:
        yield Bed(cluster, namespace, nodes, operator, tag)
    finally:
        operator.stop()
        for name in nodes:
            cluster.kubectl("delete", "nodeportpool", name, "--ignore-not-found", check=False)
            cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def scheduler_message(pod: Body) -> str:
    for condition in pod.get("status", {}).get("conditions") or ():
        if condition["type"] == "PodScheduled" and condition["status"] == "False":
            return str(condition.get("message", ""))
    return ""


def ports_condition(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    status = cluster.json("get", "infd", "-n", namespace, name).get("status", {})
    found = [c for c in status.get("conditions", []) if c["type"] == "PortsAllocated"]
    return found[0] if found else {}


def test_pods_go_where_their_ports_fit_and_wait_in_the_scheduler_when_none_has_them(
    bed: Bed,
) -> None:
    cluster, (full, empty) = bed.cluster, bed.nodes
    bed.pool(0, 16)
    bed.pool(1, 16)
    bed.advertises(0, 16)
    bed.advertises(1, 16)
    # Nearly fill the first node: 3 pods x 5 ports of 16; one port is left, too
    # short for the 4-port block, so it is not advertised.
    bed.deploy("fill", 3, node=full)
    wait_for(lambda: bed.allocated("fill", 3), 30, what="3 pods on the nearly full node")
    bed.advertises(0, 15)

    bed.deploy("web", 3)
    pods = wait_for(lambda: bed.allocated("web", 3), 30, what="3 new pods with ports")
    assert {p["spec"]["nodeName"] for p in pods} == {empty}
    first = pods[0]["spec"]["containers"][0]["resources"]
    assert first["requests"][RESOURCE] == first["limits"][RESOURCE] == str(PER_POD)

    # Every node full: the 4th pod stays Pending, held by the scheduler itself.
    cluster.kubectl(
        "patch", "infd", "web", "-n", bed.namespace, "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/roles/0/replicas", "value": 4}]',
    )  # fmt: skip

    def unschedulable() -> str:
        waiting = [p for p in bed.pods("web") if not p["spec"].get("nodeName")]
        return scheduler_message(waiting[0]) if waiting else ""

    message = wait_for(lambda: INSUFFICIENT in unschedulable(), 30, what="Insufficient ports")
    assert message
    condition = wait_for(
        lambda: (
            (c := ports_condition(cluster, bed.namespace, "web")).get("reason")
            == "InsufficientPorts"
            and c
        ),
        20,
        what="PortsAllocated pointing at the scheduler",
    )
    assert condition["status"] == "False"
    assert INSUFFICIENT in condition["message"] and "scheduler" in condition["message"]
    assert [p["status"]["phase"] for p in bed.pods("web") if not p["spec"].get("nodeName")] == [
        "Pending"
    ]

    # A bigger pool is advertised within seconds, and the waiting pod is placed.
    bed.pool(1, 32)
    took = bed.advertises(1, 32, timeout=10)
    assert took < 5, f"pool change took {took:.1f}s to reach the node"
    pods = wait_for(lambda: bed.allocated("web", 4), 30, what="the 4th pod placed")
    assert {p["spec"]["nodeName"] for p in pods} == {empty}
    # None of them ever waited bound to a node.
    assert bed.exhausted_events() == []


def berth_cli(cluster: Cluster, *args: str) -> str:
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig, "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_the_figure_outlives_the_operator_a_restart_recomputes_it_and_uninstall_removes_it(
    bed: Bed,
) -> None:
    cluster, (first, second) = bed.cluster, bed.nodes
    bed.pool(0, 16)
    bed.pool(1, 24)
    bed.advertises(0, 16)
    bed.advertises(1, 24)
    assert capacity_figure(cluster, first) == "16"  # capacity too, not only allocatable

    bed.operator.stop()  # a graceful stop removes nothing...
    assert figure(cluster, first) == 16
    bed.operator.kill()
    # ...and while no operator runs, the scheduler keeps counting it.
    bed.pool(0, 40)
    time.sleep(2)
    assert figure(cluster, first) == 16
    start(bed.operator)
    bed.advertises(0, 40)
    assert figure(cluster, second) == 24

    bed.operator.stop()
    out = berth_cli(cluster, "capacity")
    assert f"{first}  {RESOURCE}=40" in out
    out = berth_cli(cluster, "capacity", "--remove")
    assert out.startswith("removed")
    for node in cluster.json("get", "nodes")["items"]:
        status = node.get("status", {})
        assert RESOURCE not in status.get("capacity", {}), node["metadata"]["name"]
        assert RESOURCE not in status.get("allocatable", {}), node["metadata"]["name"]


def test_kwoks_own_node_status_writes_keep_the_figure(bed: Bed) -> None:
    """kwok (v0.8.0) strategic-merge-patches node status with its Stage
    templates; the node-initialize stage rewrites capacity and allocatable
    from the node's own. Make it run again (Ready=False) with no operator."""
    cluster, node = bed.cluster, bed.nodes[0]
    bed.pool(0, 16)
    bed.advertises(0, 16)
    bed.operator.stop()
    ready_false = {"type": "Ready", "status": "False", "reason": "Test", "message": "test"}
    cluster.kubectl(
        "patch", "node", node, "--subresource=status",
        "-p", json.dumps({"status": {"conditions": [ready_false]}}),
    )  # fmt: skip

    def ready_again() -> bool:
        conditions = cluster.json("get", "node", node)["status"]["conditions"]
        ready = [c for c in conditions if c["type"] == "Ready"]
        return bool(ready) and ready[0]["status"] == "True" and ready[0]["reason"] != "Test"

    wait_for(ready_again, 30, what="kwok's node-initialize stage to run again")
    assert figure(cluster, node) == 16
    assert capacity_figure(cluster, node) == "16"


def heartbeats(cluster: Cluster, node: str) -> str:
    conditions = cluster.json("get", "node", node).get("status", {}).get("conditions") or []
    return next((c["lastHeartbeatTime"] for c in conditions if c["type"] == "Ready"), "")


def test_kwoks_heartbeat_keeps_the_figure(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """kwok's node-heartbeat-with-lease stage, from its own module, run every
    second by a kwok of our own for one node (the test bed's kwok runs it
    every 10-20 minutes and manages only nodes annotated as fake)."""
    if cluster.external:
        pytest.fail("this test runs kwok against the local test bed", pytrace=False)
    tools = Toolchain.from_env()
    stages = {path.stem: path for path in tools.kwok_stages}
    heartbeat = stages["node-heartbeat-with-lease"].read_text()
    assert "durationMilliseconds: 600000" in heartbeat, "kwok's heartbeat stage changed"
    fast = tmp_path / "heartbeat.yaml"
    fast.write_text(heartbeat.replace("600000", "1000").replace("610000", "1500"))
    name = f"cap-heartbeat-{namespace.rsplit('-', 1)[-1]}"
    body = node_manifest(250, 8)
    body["metadata"] = {"name": name, "labels": {"kubernetes.io/hostname": name}}
    body["spec"] = {"taints": [{"key": TEST_KEY, "value": "heartbeat", "effect": "NoSchedule"}]}
    body["status"]["addresses"] = [{"type": "InternalIP", "address": "172.18.250.1"}]
    apply(cluster, body)
    log = (tmp_path / "kwok.log").open("w")
    kwok = subprocess.Popen(
        [
            str(tools.kwok),
            f"--kubeconfig={Path(cluster.dir) / 'kwok.kubeconfig'}",
            "--manage-all-nodes=false",
            f"--manage-single-node={name}",
            "--node-lease-duration-seconds=40",
            f"--config={stages['node-initialize']}",
            f"--config={fast}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: heartbeats(cluster, name), 30, what="kwok to initialise the node")
        cluster.kubectl(
            "patch", "node", name, "--subresource=status", "-p", json.dumps(status_patch(40))
        )
        seen: set[str] = set()

        def three_more() -> bool:
            seen.add(heartbeats(cluster, name))
            return len(seen) > 3

        wait_for(three_more, 30, what="three more heartbeats")
        assert figure(cluster, name) == 40
        assert capacity_figure(cluster, name) == "40"
    finally:
        kwok.terminate()
        kwok.wait(10)
        log.close()
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def test_a_real_kubelet_keeps_the_figure_and_admits_pods_that_request_it(
    cluster: Cluster, real_node: str, namespace: str, tmp_path: Path
) -> None:
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    name = f"cap-real-{namespace}"
    operator = start(OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log"))
    try:
        apply(cluster, pool(name, real_node, 10, start=61900))
        wait_for(lambda: figure(cluster, real_node) == 10, 15, what="the real node's figure")
        # The kubelet admits a pod that requests berth.dev/ports (its own check).
        engine = engine_deployment("engine", real_node, [("http", 1), ("side", 4)])
        apply(cluster, engine, namespace)

        def running() -> bool:
            pods = pods_of(cluster, namespace, "engine")
            return len(pods) == 1 and pods[0].get("status", {}).get("phase") == "Running"

        wait_for(running, 90, what="the engine running on the real node")
        pod = pods_of(cluster, namespace, "engine")[0]
        assert pod["spec"]["nodeName"] == real_node
        assert pod["spec"]["containers"][0]["resources"]["requests"][RESOURCE] == "5"
    finally:
        operator.stop()
    try:
        # With no operator left to put it back: make the kubelet rewrite its
        # capacity (it resets a tampered "pods" within its status update period).
        tampered = {"status": {"capacity": {"pods": "7"}, "allocatable": {"pods": "7"}}}
        cluster.kubectl(
            "patch", "node", real_node, "--subresource=status", "-p", json.dumps(tampered)
        )

        def rewritten() -> bool:
            status = cluster.json("get", "node", real_node)["status"]
            return bool(status["capacity"]["pods"] != "7" and status["allocatable"]["pods"] != "7")

        wait_for(rewritten, 60, what="the kubelet's own status update")
        assert figure(cluster, real_node) == 10
        assert capacity_figure(cluster, real_node) == "10"
    finally:
        cluster.kubectl("delete", "infd", "engine", "-n", namespace, check=False)
        cluster.kubectl("delete", "nodeportpool", name, "--ignore-not-found", check=False)
