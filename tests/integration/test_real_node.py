"""Berth on a real node: a kubelet, containerd and runc start the containers,
and the engine in them (testbed/csrc/engine.c) binds every port Berth
delivers, failing loudly on EADDRINUSE.

Pods use hostNetwork, so their listeners are checked in this (the host's)
network namespace through /proc/net/tcp. The operator runs out of cluster.
Each test gives the real node its own NodePortPool in 61000-61999, with a
priority above every other pool: above this machine's ephemeral range, so
the host's own connections never take those ports (allowUnsafeRanges, since
ZeroMQ's random ports would; no process here uses them).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from testbed import ClusterError, LocalCluster
from testbed.realnode import mounts_under
from testbed.workloads import engine_deployment, listening_ports
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import OPERATOR_NAMESPACE, ensure_namespace, install_crds, pods_of

from berth.allocator.ranges import PortRange
from berth.names import ANNOTATION_PORTS

Cluster = Any  # tests/integration/conftest.py's Cluster
Body = dict[str, Any]
BLOCKS = [("http", 1), ("side", 4)]  # 5 ports per pod


@pytest.fixture(scope="module")
def node_ip(cluster: Cluster, real_node: str) -> str:
    node = cluster.json("get", "node", real_node)
    (ip,) = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    return str(ip)


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, real_node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    log = tmp_path_factory.mktemp("real-node") / "operator.log"
    proc = OperatorProcess(cluster.kubeconfig, log).start()
    try:
        yield proc
    finally:
        proc.stop()


class Pool:
    """This test's NodePortPool for the real node."""

    def __init__(self, cluster: Cluster, name: str, node: str) -> None:
        self.cluster, self.name, self.node = cluster, name, node

    def apply(self, start: int, end: int, reserved: int | None = None) -> None:
        body: Body = {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "NodePortPool",
            "metadata": {"name": self.name},
            "spec": {
                "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": self.node}},
                "ranges": [{"start": start, "end": end}],
                "priority": 1000,
                "allowUnsafeRanges": True,
            },
        }
        if reserved is not None:
            body["spec"]["reserved"] = [{"start": reserved}]
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


@dataclass
class Bed:
    """What a test on the real node works with (the operator runs)."""

    cluster: Cluster
    node: str
    node_ip: str
    namespace: str
    pool: Pool


@pytest.fixture
def bed(
    cluster: Cluster, operator: OperatorProcess, real_node: str, node_ip: str, namespace: str
) -> Iterator[Bed]:
    pool = Pool(cluster, f"real-{namespace}", real_node)
    try:
        yield Bed(cluster, real_node, node_ip, namespace, pool)
    finally:
        cluster.kubectl("delete", "nodeportpool", pool.name, "--ignore-not-found", check=False)


def apply_in(cluster: Cluster, namespace: str, body: Body) -> None:
    body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def block_ports(pod: Body) -> set[int]:
    """Every port of every block the pod was given (its ports annotation)."""
    blocks = json.loads(pod["metadata"]["annotations"][ANNOTATION_PORTS])
    return {p for text in blocks.values() for p in _ports(text)}


def _ports(text: str) -> range:
    span = PortRange.parse(text)
    return range(span.start, span.end + 1)


def engine_ready(cluster: Cluster, pod: Body) -> bool:
    """Running, container ready, and its log says every port is bound."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if not (statuses and statuses[0].get("ready") and statuses[0].get("state", {}).get("running")):
        return False
    meta = pod["metadata"]
    log = cluster.kubectl("logs", "-n", meta["namespace"], meta["name"], check=False).stdout
    return "engine: ready" in log


def running_engines(cluster: Cluster, namespace: str, deployment: str, count: int) -> list[Body]:
    def ready() -> list[Body] | None:
        pods = [
            p
            for p in pods_of(cluster, namespace, deployment)
            if not p["metadata"].get("deletionTimestamp")
        ]
        if len(pods) == count and all(engine_ready(cluster, p) for p in pods):
            return pods
        return None

    found: list[Body] = wait_for(
        ready, timeout=90, interval=0.5, what=f"{count} engines of {deployment}"
    )
    return found


def assert_engine_clean(cluster: Cluster, pod: Body) -> None:
    meta = pod["metadata"]
    log = cluster.kubectl("logs", "-n", meta["namespace"], meta["name"]).stdout
    assert "EADDRINUSE" not in log, log
    want = len(block_ports(pod))
    assert f"engine: ready, {want} ports bound" in log, log


@pytest.fixture
def other_namespace(cluster: Cluster, namespace: str) -> Iterator[str]:
    name = f"{namespace}-b"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: cluster.kubectl("get", "sa", "-n", name, "default", check=False).returncode == 0,
        timeout=30,
        what="the default ServiceAccount",
    )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_every_delivered_port_is_bound_by_its_engine(bed: Bed, other_namespace: str) -> None:
    cluster, real_node, node_ip, pool, namespace = (
        bed.cluster,
        bed.node,
        bed.node_ip,
        bed.pool,
        bed.namespace,
    )
    pool.apply(61000, 61099)
    placed = [(namespace, "alpha"), (namespace, "beta"), (other_namespace, "gamma")]
    for ns, name in placed:
        apply_in(cluster, ns, engine_deployment(name, real_node, BLOCKS, replicas=2))
    pods = [p for ns, name in placed for p in running_engines(cluster, ns, name, 2)]

    listening = listening_ports(node_ip)
    seen: set[int] = set()
    for pod in pods:
        assert pod["spec"]["nodeName"] == real_node
        ports = block_ports(pod)
        assert len(ports) == 5 and min(ports) >= 61000 and max(ports) <= 61099
        assert not ports & seen, "two pods were given the same port"
        seen |= ports
        assert ports <= listening, f"not listening: {sorted(ports - listening)}"
        assert_engine_clean(cluster, pod)
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert len(seen) == 30


def waiting_reason(pod: Body) -> str:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return str(statuses[0].get("state", {}).get("waiting", {}).get("reason", ""))


def test_a_pod_whose_ports_come_late_starts_by_itself(bed: Bed) -> None:
    cluster, real_node, node_ip, pool, namespace = (
        bed.cluster,
        bed.node,
        bed.node_ip,
        bed.pool,
        bed.namespace,
    )
    # 6 ports in runs of 3: the scheduler counts room for the pod's 5
    # (berth.dev/ports), but no run holds its 4-port block: it is bound and waits.
    pool.apply(61100, 61106, reserved=61103)
    apply_in(cluster, namespace, engine_deployment("late", real_node, BLOCKS, replicas=1))

    def bound_without_ports() -> Body | None:
        pods = pods_of(cluster, namespace, "late")
        if len(pods) != 1 or pods[0]["spec"].get("nodeName") != real_node:
            return None
        return None if ANNOTATION_PORTS in pods[0]["metadata"].get("annotations", {}) else pods[0]

    waiting = wait_for(bound_without_ports, timeout=90, interval=0.5, what="a pod without ports")
    # The real kubelet holds the container: its ports ConfigMap does not exist yet.
    wait_for(
        lambda: (
            waiting_reason(cluster.json("get", "pod", "-n", namespace, waiting["metadata"]["name"]))
            == "CreateContainerConfigError"
        ),
        timeout=30,
        what="the kubelet to hold the container",
    )
    pool.apply(61100, 61109)  # widened, the reserved port given back
    (late,) = running_engines(cluster, namespace, "late", 1)
    assert late["metadata"]["uid"] == waiting["metadata"]["uid"]
    assert block_ports(late) <= set(range(61100, 61110))
    assert block_ports(late) <= listening_ports(node_ip)
    assert_engine_clean(cluster, late)


def test_a_restarted_container_keeps_its_ports(bed: Bed) -> None:
    cluster, real_node, node_ip, pool, namespace = (
        bed.cluster,
        bed.node,
        bed.node_ip,
        bed.pool,
        bed.namespace,
    )
    pool.apply(61200, 61209)
    apply_in(cluster, namespace, engine_deployment("restart", real_node, BLOCKS))
    (pod,) = running_engines(cluster, namespace, "restart", 1)
    ports = block_ports(pod)
    name = pod["metadata"]["name"]
    # SIGTERM to the engine (PID 1 of its container): it exits and the kubelet
    # starts the container again, in the same pod. The exec ends with the
    # container (exit 137), so its status says nothing.
    cluster.kubectl("exec", "-n", namespace, name, "--", "kill", "1", check=False)

    def restarted() -> Body | None:
        now = cluster.json("get", "pod", "-n", namespace, name)
        count = now["status"]["containerStatuses"][0]["restartCount"]
        return now if count == 1 and engine_ready(cluster, now) else None

    after = wait_for(restarted, timeout=60, interval=0.5, what="the engine to restart")
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert block_ports(after) == ports
    assert ports <= listening_ports(node_ip)
    assert_engine_clean(cluster, after)


def test_deleting_a_pod_frees_its_listeners_for_the_next_pod(bed: Bed) -> None:
    cluster, real_node, node_ip, pool, namespace = (
        bed.cluster,
        bed.node,
        bed.node_ip,
        bed.pool,
        bed.namespace,
    )
    pool.apply(61300, 61304)  # exactly one pod's worth: the next pod must reuse them
    apply_in(cluster, namespace, engine_deployment("reuse", real_node, BLOCKS))
    (first,) = running_engines(cluster, namespace, "reuse", 1)
    ports = block_ports(first)
    assert ports == set(range(61300, 61305)) and ports <= listening_ports(node_ip)

    cluster.kubectl("delete", "pod", "-n", namespace, first["metadata"]["name"], "--wait=false")

    def replacement() -> Body | None:
        pods = running_engines(cluster, namespace, "reuse", 1)
        return pods[0] if pods[0]["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_for(replacement, timeout=120, interval=1, what="a replacement pod")
    assert block_ports(second) == ports
    assert ports <= listening_ports(node_ip)
    assert_engine_clean(cluster, second)
    assert second["status"]["containerStatuses"][0]["restartCount"] == 0

    cluster.kubectl("delete", "inferencedeployment", "-n", namespace, "reuse", "--wait=false")
    wait_for(
        lambda: not ports & listening_ports(node_ip),
        timeout=60,
        what="the listeners to go with the pod",
    )


def test_two_test_beds_with_real_nodes_side_by_side_and_down_leaves_nothing(
    cluster: Cluster, real_node: str, node_ip: str, tmp_path: Path
) -> None:
    other = LocalCluster(tmp_path / "second")
    try:
        state = other.up(1, real_nodes=1, die_with_parent=True, quiet=True)
    except ClusterError as e:
        pytest.fail(f"a second test bed with a real node did not start: {e}", pytrace=False)
    try:
        (info,) = state["real_nodes"].values()
        ours = json.loads((cluster.dir / "state.json").read_text())["real_nodes"][real_node]
        assert info["ip"] != node_ip
        assert set(info["net"].values()).isdisjoint(ours["net"].values())
        got = json.loads(
            cluster.kubectl(
                "--kubeconfig", str(other.kubeconfig), "get", "nodes", "-o", "json"
            ).stdout
        )
        assert {n["metadata"]["name"] for n in got["items"]} == {"kwok-gpu-0", "real-0"}
    finally:
        other.down()
    net = info["net"]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert net["host_if"] not in links and net["bridge"] not in links
    netns = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert net["netns"] not in netns
    assert not mounts_under(tmp_path / "second")
    assert not other._strays()
    assert not (tmp_path / "second" / "nodes" / "real-0").exists()
