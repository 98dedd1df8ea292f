"""The operator end to end on a real API server: allocation, invariants, failures.

Every test runs the real operator process (``python -m berth``) against the
local control plane (or BERTH_KUBECONFIG's cluster) and checks I1-I6 of
DESIGN.md on what the API server holds, never on the operator's memory.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.invariants import (
    LedgerWatcher,
    assert_no_leak,
    assert_no_overlap,
    berth_pods,
    pod_ports,
    read_ledgers,
)
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    all_allocated,
    apply_deployment,
    custom_deployment,
    ensure_namespace,
    expected_pods,
    install_crds,
    load_example,
    pods_of,
    run_example_scenario,
)

from berth.allocator.ranges import PortRange

Body = dict[str, Any]


@pytest.fixture
def crds(cluster: Any) -> None:
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)


@pytest.fixture
def operator(cluster: Any, crds: None, tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log").start()
    yield proc
    proc.stop()
    assert_operator_healthy(proc.log)


def assert_operator_healthy(log: Path) -> None:
    """I6: whatever happened, the operator never crashed on it."""
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


def quiet_and_consistent(cluster: Any) -> bool:
    try:
        view = read_ledgers(cluster)
        assert_no_overlap(view)
        assert_no_leak(view, berth_pods(cluster))
    except AssertionError:
        return False
    return True


def replay_audit(lines: list[Body]) -> dict[str, dict[str, dict[str, PortRange]]]:
    """Rebuild node -> uid -> blocks from audit lines alone."""
    view: dict[str, dict[str, dict[str, PortRange]]] = {}
    for line in lines:
        holders = view.setdefault(line["node"], {})
        if line["audit"] == "allocate":
            holders[line["uid"]] = {n: PortRange.parse(r) for n, r in line["blocks"].items()}
        elif line["audit"] in ("release", "reclaim"):
            holders.pop(line["uid"], None)
    return {node: holders for node, holders in view.items() if holders}


def node_pool_ranges(cluster: Any, node: str) -> list[PortRange]:
    ledger = json.loads(
        cluster.kubectl(
            "get", "configmap", "-n", OPERATOR_NAMESPACE, f"berth-ledger.{node}", "-o", "json"
        ).stdout
    )
    _, ranges, _ = ledger["data"]["pool"].split(" ")
    return [PortRange.parse(r) for r in ranges.split(",")]


def test_example_in_two_namespaces_gets_disjoint_ports_inside_each_pool(
    cluster: Any, crds: None, namespace: str, tmp_path: Path
) -> None:
    second = f"{namespace}-b"
    ensure_namespace(cluster, second)
    operator = run_example_scenario(cluster, cluster.kubeconfig, namespace, tmp_path)
    try:
        manifest = load_example()
        name = manifest["metadata"]["name"]
        # The same deployment again, without GPU requests so that it packs onto
        # the nodes the first copy already uses: the two must share nodes.
        for role in manifest["spec"]["roles"]:
            for container in role["template"]["spec"]["containers"]:
                container.pop("resources", None)
        apply_deployment(cluster, second, manifest)
        want = expected_pods(manifest)
        wait_for(lambda: all_allocated(cluster, second, name, want), timeout=90, what="2nd ns")
        view = read_ledgers(cluster)
        assert_no_overlap(view)  # I1 across namespaces sharing nodes
        pods = pods_of(cluster, namespace, name) + pods_of(cluster, second, name)
        nodes_first = {p["spec"]["nodeName"] for p in pods_of(cluster, namespace, name)}
        nodes_second = {p["spec"]["nodeName"] for p in pods_of(cluster, second, name)}
        assert nodes_first & nodes_second, "the two deployments should share nodes"
        for pod in pods:
            assert_env_resolves_inside_pool(cluster, pod, view)
        # Discovery: the per-deployment map lists every worker with its ports.
        port_map = json.loads(
            cluster.kubectl("get", "cm", "-n", namespace, f"{name}-port-map", "-o", "json").stdout
        )
        wait_for(
            lambda: (
                len(
                    json.loads(
                        cluster.kubectl(
                            "get", "cm", "-n", namespace, f"{name}-port-map", "-o", "json"
                        ).stdout
                    )["data"]
                )
                == want
            ),
            timeout=20,
            what="port map lists every worker",
        )
        assert port_map["metadata"]["ownerReferences"][0]["kind"] == "InferenceDeployment"
        # Status: every role reports its pods allocated.
        wait_for(
            lambda: status_condition(cluster, namespace, name, "PortsAllocated") == "True",
            timeout=30,
            what="PortsAllocated=True",
        )
        status = get_infd(cluster, namespace, name)["status"]
        assert {r["name"]: r["allocated"] for r in status["roles"]} == {
            r["name"]: r["replicas"] for r in manifest["spec"]["roles"]
        }
        assert status["observedGeneration"] == 1
    finally:
        operator.stop()
        assert_operator_healthy(operator.log)
        cluster.kubectl("delete", "namespace", second, "--wait=false", check=False)


def assert_env_resolves_inside_pool(cluster: Any, pod: Body, view: Any) -> None:
    """Each container's port env resolves, through its ConfigMap, into the pod's blocks."""
    meta = pod["metadata"]
    node = pod["spec"]["nodeName"]
    blocks = view[node][meta["uid"]]
    pool = node_pool_ranges(cluster, node)
    cm = json.loads(
        cluster.kubectl(
            "get", "cm", "-n", meta["namespace"], f"{meta['name']}-ports", "-o", "json"
        ).stdout
    )
    plan = json.loads(meta["annotations"]["berth.dev/port-plan"])
    for container in pod["spec"]["containers"]:
        refs = [e for e in container["env"] if "configMapKeyRef" in e.get("valueFrom", {})]
        assert refs, f"{meta['name']} has no port env"
        for env in refs:
            ref = env["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == f"{meta['name']}-ports"
            value = int(cm["data"][ref["key"]])
            block = next(b for b in plan["blocks"] if any(e[0] == env["name"] for e in b["env"]))
            kind, per_rank = next((e[1], e[2]) for e in block["env"] if e[0] == env["name"])
            first = value + (plan["firstRank"] * per_rank if kind == "rankBase" else 0)
            span = blocks[block["name"]]
            assert first == span.start, (env["name"], first, span)
            assert any(span.start >= r.start and span.end <= r.end for r in pool), (span, pool)


def get_infd(cluster: Any, namespace: str, name: str) -> Body:
    out: Body = json.loads(
        cluster.kubectl("get", "infd", "-n", namespace, name, "-o", "json").stdout
    )
    return out


def status_condition(cluster: Any, namespace: str, name: str, type_: str) -> str | None:
    status = get_infd(cluster, namespace, name).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] == type_:
            return str(condition["status"])
    return None


def test_churn_keeps_no_overlap_and_no_leak_and_audit_replays(
    cluster: Any, operator: OperatorProcess, namespace: str, core_api: Any
) -> None:
    rng = random.Random(7)
    names = [f"churn-{i}" for i in range(4)]
    with LedgerWatcher(core_api) as watcher:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            action = rng.random()
            name = rng.choice(names)
            if action < 0.5:
                body = custom_deployment(name, replicas=rng.randint(0, 5))
                apply_deployment(cluster, namespace, body)
            elif action < 0.8:
                pods = [p["metadata"]["name"] for p in pods_of(cluster, namespace, name)]
                if pods:
                    cluster.kubectl(
                        "delete",
                        "pod",
                        "-n",
                        namespace,
                        rng.choice(pods),
                        "--wait=false",
                        check=False,
                    )
            else:
                cluster.kubectl(
                    "delete", "infd", "-n", namespace, name, "--wait=false", check=False
                )
            time.sleep(rng.uniform(0.05, 0.4))
        wait_for(lambda: quiet_and_consistent(cluster), timeout=90, what="quiet cluster (I1, I2)")
    assert watcher.states_seen > 10
    assert watcher.violations == []
    # The audit trail alone rebuilds the final ledger (of the pods this run touched).
    lines = [line for line in operator.audit_lines() if line["namespace"] == namespace]
    assert replay_audit(lines) == {
        node: holders for node, holders in read_ledgers(cluster, namespace).items() if holders
    }


def test_sigkill_at_random_points_never_double_allocates_or_moves_ports(
    cluster: Any, crds: None, namespace: str, core_api: Any, tmp_path: Path
) -> None:
    rng = random.Random(11)
    log = tmp_path / "operator.log"
    seen: dict[str, str] = {}
    with LedgerWatcher(core_api) as watcher:
        for cycle in range(20):
            proc = OperatorProcess(cluster.kubeconfig, log).start()
            name = f"kill-{cycle % 3}"
            apply_deployment(cluster, namespace, custom_deployment(name, rng.randint(1, 4)))
            time.sleep(rng.uniform(0.3, 2.5))  # lands mid-start-up or mid-allocation
            proc.kill()
            ports = pod_ports(berth_pods(cluster))
            for uid, text in ports.items():
                assert seen.setdefault(uid, text) == text, f"I3: pod {uid} ports changed"
        proc = OperatorProcess(cluster.kubeconfig, log).start()
        try:
            wait_for(lambda: quiet_and_consistent(cluster), timeout=90, what="recovery")
            ports = pod_ports(berth_pods(cluster))
            for uid, text in ports.items():
                assert seen.setdefault(uid, text) == text, f"I3: pod {uid} ports changed"
        finally:
            proc.stop()
    assert watcher.violations == []
    assert "Traceback" not in log.read_text()


def test_two_operators_without_peering_never_share_a_port(
    cluster: Any, crds: None, namespace: str, core_api: Any, tmp_path: Path
) -> None:
    first = OperatorProcess(cluster.kubeconfig, tmp_path / "a.log").start()
    second = OperatorProcess(cluster.kubeconfig, tmp_path / "b.log").start()
    try:
        with LedgerWatcher(core_api) as watcher:
            for i in range(4):
                apply_deployment(cluster, namespace, custom_deployment(f"race-{i}", 6))
            wait_for(
                lambda: all(all_allocated(cluster, namespace, f"race-{i}", 6) for i in range(4)),
                timeout=90,
                what="all race pods allocated",
            )
            wait_for(lambda: quiet_and_consistent(cluster), timeout=60, what="quiet")
        assert watcher.violations == []
        assert first.audit_lines() or second.audit_lines()
    finally:
        first.stop()
        second.stop()
    for proc in (first, second):
        assert_operator_healthy(proc.log)


def test_pods_deleted_while_operator_down_are_reclaimed_at_start_up(
    cluster: Any, crds: None, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "operator.log"
    proc = OperatorProcess(cluster.kubeconfig, log).start()
    apply_deployment(cluster, namespace, custom_deployment("missed", 3))
    wait_for(lambda: all_allocated(cluster, namespace, "missed", 3), timeout=60, what="alloc")
    proc.stop()
    gone = {p["metadata"]["uid"] for p in pods_of(cluster, namespace, "missed")}
    cluster.kubectl("delete", "infd", "-n", namespace, "missed", "--wait=false")
    cluster.kubectl(
        "delete",
        "pods",
        "-n",
        namespace,
        "-l",
        "berth.dev/deployment=missed",
        "--grace-period=0",
        "--force",
    )
    wait_for(lambda: not pods_of(cluster, namespace, "missed"), timeout=60, what="pods gone")
    held = {uid for holders in read_ledgers(cluster).values() for uid in holders}
    assert gone <= held  # nobody released them: the operator was down
    proc = OperatorProcess(cluster.kubeconfig, log).start()
    try:
        wait_for(
            lambda: not gone & {u for h in read_ledgers(cluster).values() for u in h},
            timeout=30,
            what="start-up sweep reclaims",
        )
        reclaimed = {line["uid"] for line in proc.audit_lines() if line["audit"] == "reclaim"}
        assert gone <= reclaimed
    finally:
        proc.stop()
    assert_operator_healthy(log)


def apply_pool(
    cluster: Any, name: str, node: str, start: int, end: int, *, reserved: int | None = None
) -> None:
    pool: Body = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "ranges": [{"start": start, "end": end}],
            "priority": 1000,
        },
    }
    if reserved is not None:
        pool["spec"]["reserved"] = [{"start": reserved}]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pool))


def events_for(cluster: Any, namespace: str, name: str) -> list[Body]:
    out = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
    ).stdout
    items: list[Body] = json.loads(out)["items"]
    return items


def test_exhaustion_waits_with_event_and_condition_then_recovers(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    node = cluster.nodes[-1]
    # 11 ports in runs of 4 and 7: the scheduler counts room for 8 (berth.dev/ports),
    # but no run holds the 8-port block, so the pod waits bound to the node.
    apply_pool(cluster, "tiny", node, 25000, 25011, reserved=25004)
    try:
        eight = [{"name": "block", "size": 8, "env": [{"name": "BLOCK_PORT"}]}]
        apply_deployment(cluster, namespace, custom_deployment("starved", 1, eight, node))
        pod = "starved-worker-0"
        wait_for(
            lambda: any(
                e["reason"] == "PortsExhausted" for e in events_for(cluster, namespace, pod)
            ),
            timeout=60,
            what="PortsExhausted event",
        )
        message = next(
            e["message"]
            for e in events_for(cluster, namespace, pod)
            if e["reason"] == "PortsExhausted"
        )
        assert "8" in message and "largest free run" in message, message
        wait_for(
            lambda: status_condition(cluster, namespace, "starved", "PortsAllocated") == "False",
            timeout=30,
            what="PortsAllocated=False",
        )
        assert operator.alive()
        apply_pool(cluster, "tiny", node, 25000, 25011)  # the reserved port given back
        wait_for(
            lambda: all_allocated(cluster, namespace, "starved", 1),
            timeout=60,
            what="recovery once space frees",
        )
        wait_for(
            lambda: status_condition(cluster, namespace, "starved", "PortsAllocated") == "True",
            timeout=30,
            what="PortsAllocated=True",
        )
        assert any(line["audit"] == "exhausted" for line in operator.audit_lines())
    finally:
        cluster.kubectl("delete", "nodeportpool", "tiny", check=False)


def test_ports_declared_by_other_pods_are_never_handed_out(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    node = cluster.nodes[-2]
    apply_pool(cluster, "foreign", node, 26000, 26099)
    try:
        foreign = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "static-exporter", "namespace": namespace},
            "spec": {
                "nodeName": node,
                "hostNetwork": True,
                "containers": [{"name": "x", "image": "x:1", "ports": [{"containerPort": 26000}]}],
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(foreign))
        time.sleep(1)  # the index learns it from the watch
        one = [{"name": "http", "size": 4, "env": [{"name": "HTTP_PORT"}]}]
        apply_deployment(cluster, namespace, custom_deployment("neighbour", 1, one, node))
        wait_for(
            lambda: all_allocated(cluster, namespace, "neighbour", 1), timeout=60, what="alloc"
        )
        pod = pods_of(cluster, namespace, "neighbour")[0]
        ports = json.loads(pod["metadata"]["annotations"]["berth.dev/ports"])
        span = PortRange.parse(ports["http"])
        assert 26000 not in span and span.start >= 26000, span
    finally:
        cluster.kubectl("delete", "nodeportpool", "foreign", check=False)


def test_spec_the_schema_accepts_but_berth_cannot_serve_is_a_condition(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    body = custom_deployment("old-engine", 1)
    body["spec"]["engine"] = {"preset": "vllm", "version": "0.5.0"}
    apply_deployment(cluster, namespace, body)
    wait_for(
        lambda: status_condition(cluster, namespace, "old-engine", "Degraded") == "True",
        timeout=30,
        what="Degraded=True",
    )
    status = get_infd(cluster, namespace, "old-engine")["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "0.5.0" in degraded["message"]
    assert any(
        e["reason"] == "ReconcileError" for e in events_for(cluster, namespace, "old-engine")
    )
    assert operator.alive()


def test_deleted_node_takes_its_ledger_and_dead_pods_their_configmaps(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """Nothing Berth writes outlives what it describes (garbage collector, ownerRefs)."""
    name = f"gone-{namespace[-6:]}"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "type": "kwok"},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "status": {
            "allocatable": {"cpu": "8", "memory": "64Gi", "pods": "16"},
            "capacity": {"cpu": "8", "memory": "64Gi", "pods": "16"},
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(node))
    try:
        wait_for(
            lambda: (
                "True"
                in cluster.kubectl(
                    "get",
                    "node",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                ).stdout
            ),
            timeout=60,
            what="extra node Ready",
        )
        apply_deployment(cluster, namespace, custom_deployment("pinned", 2, node=name))
        wait_for(lambda: all_allocated(cluster, namespace, "pinned", 2), timeout=60, what="alloc")
        ledger = f"berth-ledger.{name}"
        owner = json.loads(
            cluster.kubectl("get", "cm", "-n", OPERATOR_NAMESPACE, ledger, "-o", "json").stdout
        )["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Node", name)
        # A deleted pod's port ConfigMap goes with it.
        cluster.kubectl("delete", "pod", "-n", namespace, "pinned-worker-0")
        wait_for(
            lambda: (
                cluster.kubectl(
                    "get", "cm", "-n", namespace, "pinned-worker-0-ports", check=False
                ).returncode
                != 0
                or _recreated_cm(cluster, namespace)
            ),
            timeout=60,
            what="old pod's ConfigMap collected",
        )
        cluster.kubectl("delete", "node", name)
        wait_for(
            lambda: (
                cluster.kubectl(
                    "get", "cm", "-n", OPERATOR_NAMESPACE, ledger, check=False
                ).returncode
                != 0
            ),
            timeout=60,
            what="ledger of the deleted node collected",
        )
    finally:
        cluster.kubectl("delete", "node", name, "--ignore-not-found")


def _recreated_cm(cluster: Any, namespace: str) -> bool:
    """The recreated pod has a new ConfigMap: owned by the new pod's UID."""
    cm = json.loads(
        cluster.kubectl("get", "cm", "-n", namespace, "pinned-worker-0-ports", "-o", "json").stdout
    )
    pod = json.loads(
        cluster.kubectl(
            "get", "pod", "-n", namespace, "pinned-worker-0", "-o", "json", check=False
        ).stdout
        or "{}"
    )
    return bool(pod) and cm["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
