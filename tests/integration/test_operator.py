"""The operator end to end on a real API server: allocation, invariants, failures.

Every test runs the real operator process (``python -m berth``) against the
local control plane (or BERTH_KUBECONFIG's cluster) and checks the invariants
of docs/design.md on what the pods received (tests/support/invariants.py),
never on the operator's memory or its own ledgers alone.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from tests.support import faults
from tests.support.invariants import (
    InvariantViolation,
    Span,
    check_cluster,
    delivery,
    ledger_holders,
    parse_plan,
    parse_span,
)
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    all_allocated,
    apply_deployment,
    custom_deployment,
    ensure_namespace,
    expected_pods,
    load_example,
    pods_of,
    run_example_scenario,
    wait_consistent,
)
from tests.support.watcher import ClusterWatcher

Body = dict[str, Any]


@pytest.fixture
def operator(cluster: Any, crds: None, tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log").start()
    try:
        yield proc
        wait_consistent(cluster, timeout=60)  # whatever the test did, I1, I2, ledgers
    finally:
        proc.stop()
    assert_operator_healthy(proc.log)


def assert_operator_healthy(log: Path) -> None:
    """I6: whatever happened, the operator never crashed on it."""
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


def replay_audit(lines: list[Body]) -> dict[str, dict[str, dict[str, Span]]]:
    """Rebuild node -> uid -> blocks from audit lines alone."""
    view: dict[str, dict[str, dict[str, Span]]] = {}
    for line in lines:
        holders = view.setdefault(line["node"], {})
        if line["audit"] == "allocate":
            holders[line["uid"]] = {n: parse_span(r) for n, r in line["blocks"].items()}
        elif line["audit"] in ("release", "reclaim"):
            holders.pop(line["uid"], None)
    return {node: holders for node, holders in view.items() if holders}


def node_pool_ranges(cluster: Any, node: str) -> list[Span]:
    ledger = json.loads(
        cluster.kubectl(
            "get", "configmap", "-n", OPERATOR_NAMESPACE, f"berth-ledger.{node}", "-o", "json"
        ).stdout
    )
    _, ranges, _ = ledger["data"]["pool"].split(" ")
    return [parse_span(r) for r in ranges.split(",")]


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
        wait_consistent(cluster, timeout=30)  # I1, I2 and the ledgers, across namespaces
        state = check_cluster(cluster)
        pods = pods_of(cluster, namespace, name) + pods_of(cluster, second, name)
        nodes_first = {p["spec"]["nodeName"] for p in pods_of(cluster, namespace, name)}
        nodes_second = {p["spec"]["nodeName"] for p in pods_of(cluster, second, name)}
        assert nodes_first & nodes_second, "the two deployments should share nodes"
        for pod in pods:
            assert_env_resolves_inside_pool(cluster, pod, state.configmaps)
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


def assert_env_resolves_inside_pool(cluster: Any, pod: Body, configmaps: Any) -> None:
    """Every block of the plan reaches the containers' env, inside the node's pool."""
    got = delivery(pod, configmaps)
    plan = parse_plan(pod["metadata"]["annotations"]["berth.dev/port-plan"])
    assert set(got.env_blocks) == {b.name for b in plan.blocks if b.env}, got
    annotation = got.annotation or {}
    assert got.env_blocks == {n: annotation.get(n) for n in got.env_blocks}, got
    pool = node_pool_ranges(cluster, pod["spec"]["nodeName"])
    for start, end in got.env_blocks.values():
        assert any(lo <= start and end <= hi for lo, hi in pool), (start, end, pool)


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
    with ClusterWatcher(core_api) as watcher:
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
        wait_consistent(cluster, watcher.tracker, timeout=90)
    allocations = sum(line["audit"] == "allocate" for line in operator.audit_lines())
    assert allocations > 20, allocations
    # Every allocation is at least a ConfigMap write and a pod patch, each a state.
    assert watcher.states_checked > 2 * allocations, (watcher.states_checked, allocations)
    assert watcher.gaps == 0
    # The audit trail alone rebuilds the final ledger (of the pods this run touched).
    lines = [line for line in operator.audit_lines() if line["namespace"] == namespace]
    assert replay_audit(lines) == {
        node: holders for node, holders in ledger_holders(cluster, namespace).items() if holders
    }


def allocations_this_run(proc: OperatorProcess) -> int:
    return sum(line["audit"] == "allocate" for line in proc.audit_lines(this_run=True))


def test_sigkill_at_random_points_never_double_allocates_or_moves_ports(
    cluster: Any, crds: None, namespace: str, core_api: Any, tmp_path: Path
) -> None:
    """Each cycle kills the operator after it has allocated, at a varied point.

    Odd cycles kill on the k-th audit ``allocate`` line of the run, even ones on
    ``berth_allocations_total`` reaching k; the watcher checks every state in
    between (I1, I3, the ledgers never giving a delivered port to another pod).
    """
    rng = random.Random(11)
    log = tmp_path / "operator.log"
    landed: list[tuple[int, int]] = []  # (allocations of the run, pods still waiting)
    with ClusterWatcher(core_api) as watcher:
        for cycle in range(12):
            proc = OperatorProcess(cluster.kubeconfig, log).start()
            replicas = rng.randint(2, 5)
            apply_deployment(cluster, namespace, custom_deployment(f"kill-{cycle}", replicas))
            if cycle >= 3:  # releases too, killed half-way like the rest
                cluster.kubectl(
                    "delete", "infd", "-n", namespace, f"kill-{cycle - 3}", "--wait=false"
                )
            k = rng.randint(1, replicas)
            if cycle % 2:
                wait_for(
                    lambda: allocations_this_run(proc) >= k,  # noqa: B023
                    timeout=60,
                    interval=0.01,
                    what=f"cycle {cycle}: audit line {k}",
                )
            else:
                wait_for(
                    lambda: proc.metric("berth_allocations_total") >= k,  # noqa: B023
                    timeout=60,
                    interval=0.01,
                    what=f"cycle {cycle}: berth_allocations_total {k}",
                )
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
            waiting = [
                p
                for p in pods_of(cluster, namespace, f"kill-{cycle}")
                if "berth.dev/ports" not in p["metadata"].get("annotations", {})
            ]
            landed.append((allocations_this_run(proc), len(waiting)))
        proc = OperatorProcess(cluster.kubeconfig, log).start()
        try:
            wait_consistent(cluster, watcher.tracker, timeout=90)
        finally:
            proc.stop()
    # Every kill came after the run had allocated; some came before it had finished.
    assert all(allocated >= 1 for allocated, _ in landed), landed
    assert any(waiting for _, waiting in landed), landed
    assert watcher.gaps == 0
    assert watcher.states_checked > 100, watcher.states_checked
    assert "Traceback" not in log.read_text()


def fresh_allocations(proc: OperatorProcess) -> list[str]:
    return [line["uid"] for line in proc.audit_lines() if line["audit"] == "allocate"]


def test_two_operators_without_peering_never_share_a_port(
    cluster: Any, crds: None, namespace: str, core_api: Any, tmp_path: Path
) -> None:
    """Both replicas allocate into one node's ledger; compare-and-swap decides.

    Which replica wins a pod is a race, so waves of pods come until both have
    allocated and at least one CAS conflict was redone (at most 8 waves).
    """
    node = cluster.nodes[0]
    first = OperatorProcess(cluster.kubeconfig, tmp_path / "a.log").start()
    second = OperatorProcess(cluster.kubeconfig, tmp_path / "b.log").start()
    operators = (first, second)

    def both_worked() -> bool:
        conflicts = sum(p.metric("berth_ledger_conflicts_total") for p in operators)
        return all(map(fresh_allocations, operators)) and conflicts > 0

    try:
        with ClusterWatcher(core_api) as watcher:
            wait_for(
                lambda: all(p.metric("berth_startup_sweep_seconds") > 0 for p in operators),
                timeout=60,
                what="both operators started",
            )
            waves = 0
            while waves < 8 and not (waves and both_worked()):
                names = [f"race-{waves}-{i}" for i in range(4)]
                for name in names:
                    apply_deployment(cluster, namespace, custom_deployment(name, 6, node=node))
                wait_for(
                    lambda: all(all_allocated(cluster, namespace, n, 6) for n in names),  # noqa: B023
                    timeout=90,
                    what=f"wave {waves} allocated",
                )
                waves += 1
            wait_consistent(cluster, watcher.tracker, timeout=60)
            conflicts = [p.metric("berth_ledger_conflicts_total") for p in operators]
        assert watcher.gaps == 0
        fresh = [fresh_allocations(p) for p in operators]
        assert all(fresh), f"one operator never allocated in {waves} waves: {list(map(len, fresh))}"
        assert not set(fresh[0]) & set(fresh[1]), "a pod was allocated by both"
        assert len(fresh[0]) + len(fresh[1]) == 24 * waves
        assert sum(conflicts) > 0, conflicts  # they did collide, and the pods still got ports
    finally:
        first.stop()
        second.stop()
    for proc in operators:
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
    held = {uid for holders in ledger_holders(cluster).values() for uid in holders}
    assert gone <= held  # nobody released them: the operator was down
    proc = OperatorProcess(cluster.kubeconfig, log).start()
    try:
        wait_for(
            lambda: not gone & {u for h in ledger_holders(cluster).values() for u in h},
            timeout=30,
            what="start-up sweep reclaims",
        )
        reclaimed = {line["uid"] for line in proc.audit_lines() if line["audit"] == "reclaim"}
        assert gone <= reclaimed
        wait_consistent(cluster, timeout=30)
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
        start, _ = parse_span(ports["http"])
        assert start > 26000, ports
        check_cluster(cluster, quiet=False)  # I1 counts the foreign pod's host port
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


def test_checker_fails_on_faults_the_harness_injects(
    cluster: Any, crds: None, namespace: str, core_api: Any, tmp_path: Path
) -> None:
    """The checker is only worth its green if it goes red: break delivered ports
    behind Berth's back (the operator is stopped, so only the harness writes)
    and require both the watcher and a snapshot check to fail."""
    node = cluster.nodes[1]
    log = tmp_path / "operator.log"
    proc = OperatorProcess(cluster.kubeconfig, log).start()
    try:
        apply_deployment(cluster, namespace, custom_deployment("victim", 2, node=node))
        wait_for(lambda: all_allocated(cluster, namespace, "victim", 2), timeout=60, what="alloc")
        wait_consistent(cluster, timeout=30)
    finally:
        proc.stop()
    victim, donor = sorted(
        pods_of(cluster, namespace, "victim"), key=lambda p: p["metadata"]["name"]
    )
    cases: list[tuple[str, Any, str]] = [
        (
            "configmap",
            lambda: faults.overlap_configmap(cluster, victim, donor, "SIDE_PORT"),
            "I1 on",
        ),
        ("annotation", lambda: faults.overlap_annotation(cluster, victim, donor), "I1 on"),
        (
            "ledger",
            lambda: faults.conflicting_ledger(cluster, node, donor),
            "holds ports delivered",
        ),
    ]
    try:
        for what, inject, expected in cases:
            with (
                pytest.raises(InvariantViolation, match=expected),
                ClusterWatcher(core_api) as watcher,
            ):
                watcher.drain()
                assert not watcher.violations + watcher.tracker.violations  # clean before
                undo = inject()
                watcher.drain()
            # Not ``quiet``: with the operator stopped, other tests' leftovers may
            # still hold ledger entries (the next operator start reclaims them).
            with pytest.raises(InvariantViolation, match=expected):
                check_cluster(cluster, quiet=False)
            undo()
            check_cluster(cluster, quiet=False)  # and clean once undone
            assert watcher.gaps == 0, what
    finally:
        proc = OperatorProcess(cluster.kubeconfig, log).start()
        try:
            cluster.kubectl("delete", "infd", "-n", namespace, "victim")
            wait_for(lambda: not pods_of(cluster, namespace, "victim"), timeout=60, what="gone")
            wait_consistent(cluster, timeout=30)
        finally:
            proc.stop()


class _FirstWatchGone:
    """A CoreV1Api whose first pod watch is refused with 410 Gone.

    The refusal is the harness's: a real API server answers 410 only once its
    watch cache and etcd have both moved past a revision, which a test cannot
    bring about on demand (a fresh etcd still replays revision 1).
    """

    def __init__(self, core_api: Any) -> None:
        self._core = core_api
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        if kwargs.get("watch") and not self.refused:
            self.refused += 1
            raise ApiException(status=410, reason="Gone: too old resource version")
        return self._core.list_pod_for_all_namespaces(**kwargs)


def test_checker_relists_and_counts_a_watch_gap(cluster: Any, core_api: Any) -> None:
    """After a 410 the watcher re-lists, counts the gap, and goes on checking."""
    api = _FirstWatchGone(core_api)
    with ClusterWatcher(api) as watcher:
        wait_for(lambda: watcher.gaps, timeout=30, what="the gap to be counted")
        before = watcher.states_checked
        # The heartbeat's writes keep coming: the watch resumed after the re-list.
        wait_for(lambda: watcher.states_checked > before + 4, timeout=30, what="new states")
    assert (api.refused, watcher.gaps) == (1, 1)
