"""Allocation latency, throughput and cost of the operator on a real control plane.

Run from the repository root (Berth importable, e.g. after ``source hack/env.sh``):

  python -m scripts.bench_operator                  # 50 kwok nodes, 1,000 pods in all
  python -m scripts.bench_operator --kubeconfig K   # an existing cluster instead

Prints figures; asserts nothing. Scenarios, in this order, on one cluster:

  deployments/spread  The path users take: InferenceDeployments created at 0
                      replicas, then scaled up one every --scale-interval s; the
                      operator creates the pods, kube-scheduler binds them where
                      it likes, then come allocation, port map and status.
  deployments/packed  The same, each deployment pinned to one of --packed-nodes
                      nodes: many pods per node, so writers contend for one ledger.
  micro/bare-pods     A micro-benchmark of the allocation path alone: pods created
                      already bound (spec.nodeName), no InferenceDeployment, no
                      scheduler, no port map or status. Steady rate, then a burst.
  resync              SIGKILL the operator with the cluster full and bind a pod
                      meanwhile; time the restart to start-up done and to that
                      pod's ports.

Latencies come from watches: from the first event showing a pod bound
(spec.nodeName set) to the ADDED event of its ``<pod>-ports`` ConfigMap, and
to the first pod event carrying ``berth.dev/ports``. API calls are the
operator's own count (``berth_api_requests_total{verb,resource}``); CPU is
its utime + stime from /proc/<pid>/stat over the scenario's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from tests.support.operator_process import OperatorProcess, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
MANAGED = "app.kubernetes.io/managed-by=berth"
PORTS = "berth.dev/ports"
# One vLLM-like worker: API port, an 8-rank NIXL block, 36 internal ports.
BLOCKS = [
    {"name": "http", "size": 1, "env": [{"name": "HTTP_PORT"}]},
    {"name": "nixl", "size": 8, "env": [{"name": "NIXL_PORT", "value": "rankBase"}]},
    {"name": "internal", "size": 36, "env": [{"name": "VLLM_PORT"}]},
]
PLAN = json.dumps(
    {
        "firstRank": 0,
        "blocks": [
            {"name": "http", "size": 1, "align": 1, "env": [["HTTP_PORT", "start", 0]]},
            {"name": "nixl", "size": 8, "align": 1, "env": [["NIXL_PORT", "rankBase", 1]]},
            {"name": "internal", "size": 36, "align": 1, "env": [["VLLM_PORT", "start", 0]]},
        ],
    },
    separators=(",", ":"),
)


# --- clocks: when each pod was seen bound, given its ConfigMap, annotated -----------


@dataclass
class Clock:
    """First-seen times (monotonic) per pod name, from watches on the bench namespace."""

    core: client.CoreV1Api
    created: dict[str, float] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)
    annotated: dict[str, float] = field(default_factory=dict)
    configmap: dict[str, float] = field(default_factory=dict)
    relists: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Clock:
        for lister, handle in (
            (self.core.list_namespaced_pod, self._pod),
            (self.core.list_namespaced_config_map, self._configmap),
        ):
            threading.Thread(target=self._run, args=(lister, handle), daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _pod(self, pod: dict[str, Any], now: float) -> None:
        name = pod["metadata"]["name"]
        self.created.setdefault(name, now)
        if pod.get("spec", {}).get("nodeName"):
            self.bound.setdefault(name, now)
        if PORTS in (pod["metadata"].get("annotations") or {}):
            self.annotated.setdefault(name, now)

    def _configmap(self, cm: dict[str, Any], now: float) -> None:
        name = cm["metadata"]["name"]
        if name.endswith("-ports"):
            self.configmap.setdefault(name.removesuffix("-ports"), now)

    def _run(
        self, lister: Callable[..., Any], handle: Callable[[dict[str, Any], float], None]
    ) -> None:
        try:
            rv = self._list(lister, handle)
            while not self._stop.is_set():
                try:
                    for event in self._watch(lister, rv):
                        obj = event["object"]
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            handle(obj, time.monotonic())
                except ApiException as error:
                    if error.status != 410:
                        raise
                    self.relists += 1  # stamps after a re-list may be late: reported
                    rv = self._list(lister, handle)
        except BaseException as error:
            self.errors.append(error)

    def _list(
        self, lister: Callable[..., Any], handle: Callable[[dict[str, Any], float], None]
    ) -> str:
        body = json.loads(lister(NAMESPACE, label_selector=MANAGED, _preload_content=False).data)
        now = time.monotonic()
        for item in body["items"]:
            handle(item, now)
        rv: str = body["metadata"]["resourceVersion"]
        return rv

    def _watch(self, lister: Callable[..., Any], rv: str) -> Iterator[dict[str, Any]]:
        resp = lister(
            NAMESPACE,
            label_selector=MANAGED,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=10,
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    obj = event["object"]
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                yield event
                if self._stop.is_set():
                    return
        finally:
            resp.close()
            resp.release_conn()


# --- figures -------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def spread(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label}: no samples"
    return (
        f"  {label} (ms): p50 {pct(values, 50):.1f}  p95 {pct(values, 95):.1f}  "
        f"p99 {pct(values, 99):.1f}  max {max(values):.1f}  (n={len(values)})"
    )


def latencies(names: list[str], start: dict[str, float], end: dict[str, float]) -> list[float]:
    return [(end[n] - start[n]) * 1000 for n in names if n in start and n in end]


API = re.compile(r'berth_api_requests_total\{resource="([^"]*)",verb="([A-Z]+)"\}')
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def requests_by_kind(metrics: dict[str, float]) -> dict[str, float]:
    """``"PATCH pods" -> count`` for every request Berth's client sent."""
    found = ((API.fullmatch(key), value) for key, value in metrics.items())
    return {f"{m[2]} {m[1]}": value for m, value in found if m}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Cost:
    """The operator's API calls and CPU between two moments."""

    operator: OperatorProcess
    metrics: dict[str, float] = field(default_factory=dict)
    cpu: float = 0.0
    wall: float = 0.0

    def __post_init__(self) -> None:
        self.metrics = self.operator.metrics()
        assert self.operator.proc is not None
        self.cpu = cpu_seconds(self.operator.proc.pid)
        self.wall = time.monotonic()

    def report(self, pods: int) -> dict[str, float]:
        now = Cost(self.operator)
        allocations = now.metrics.get("berth_allocations_total", 0) - self.metrics.get(
            "berth_allocations_total", 0
        )
        old = requests_by_kind(self.metrics)
        calls = {k: v - old.get(k, 0.0) for k, v in requests_by_kind(now.metrics).items()}
        writes = {k: v for k, v in calls.items() if k.split()[0] in WRITES and v}
        reads = sum(v for k, v in calls.items() if k.split()[0] not in WRITES)
        per = max(allocations, 1)
        conflicts = now.metrics.get("berth_ledger_conflicts_total", 0) - self.metrics.get(
            "berth_ledger_conflicts_total", 0
        )
        print(f"  allocations: {allocations:.0f} of {pods} pods")
        print(
            f"  API writes per allocation: {sum(writes.values()) / per:.2f}  "
            f"(reads {reads / per:.2f}; ledger CAS conflicts redone {conflicts:.0f})"
        )
        print(
            "    "
            + ", ".join(
                f"{k} {v / per:.2f}" for k, v in sorted(writes.items(), key=lambda kv: -kv[1])
            )
        )
        wall = now.wall - self.wall
        print(
            f"  operator CPU: {now.cpu - self.cpu:.1f} s over {wall:.1f} s wall "
            f"= {(now.cpu - self.cpu) / wall:.2f} of one core; peak RSS "
            f"{self.operator.peak_rss_mb():.0f} MB"
        )
        return {"writes": sum(writes.values()) / per, "rss": self.operator.peak_rss_mb()}


# --- the full path: InferenceDeployments scaled up -----------------------------------


def deployment(name: str, node: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "engine", "image": "engine:1"}]}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "engine": {"preset": "custom"},
            "roles": [
                {"name": "worker", "replicas": 0, "ports": BLOCKS, "template": {"spec": spec}}
            ],
        },
    }


def status_complete(custom: client.CustomObjectsApi, names: list[str], replicas: int) -> bool:
    listed: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
        "berth.dev", "v1alpha1", NAMESPACE, "inferencedeployments"
    )
    items = listed["items"]
    done = set()
    for item in items:
        status = item.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        allocated = sum(int(r.get("allocated", 0)) for r in status.get("roles") or [])
        if conditions.get("PortsAllocated") == "True" and allocated == replicas:
            done.add(item["metadata"]["name"])
    return set(names) <= done


@dataclass
class Bench:
    """What every scenario uses: the clock, the operator, the command line."""

    clock: Clock
    operator: OperatorProcess
    args: Any
    nodes: list[str]


def run_deployments(bench: Bench, title: str, names: list[str], pins: list[str | None]) -> None:
    clock, operator, args = bench.clock, bench.operator, bench.args
    custom = client.CustomObjectsApi()
    for name, pin in zip(names, pins, strict=True):
        custom.create_namespaced_custom_object(
            "berth.dev", "v1alpha1", NAMESPACE, "inferencedeployments", deployment(name, pin)
        )
    wait_for(
        lambda: status_complete(custom, names, 0), timeout=120, what=f"{title}: reconciled at 0"
    )
    cost = Cost(operator)
    begin = time.monotonic()
    for i, (name, pin) in enumerate(zip(names, pins, strict=True)):
        time.sleep(max(0.0, begin + i * args.scale_interval - time.monotonic()))
        body = deployment(name, pin)
        body["spec"]["roles"][0]["replicas"] = args.replicas
        custom.patch_namespaced_custom_object(  # a merge patch: the roles list is replaced
            "berth.dev", "v1alpha1", NAMESPACE, "inferencedeployments", name, {"spec": body["spec"]}
        )
    pods = [f"{n}-worker-{i}" for n in names for i in range(args.replicas)]
    try:
        wait_for(
            lambda: all(p in clock.annotated for p in pods), timeout=600, interval=0.1, what=title
        )
        wait_for(lambda: status_complete(custom, names, args.replicas), timeout=120, what="status")
    except AssertionError as error:
        print(f"  ! {error}"[:300])
    done = time.monotonic()
    last = max((clock.annotated[p] for p in pods if p in clock.annotated), default=done)
    print(f"\n== {title}: {len(names)} InferenceDeployments x {args.replicas} = {len(pods)} pods")
    print(spread("bound -> ConfigMap written", latencies(pods, clock.bound, clock.configmap)))
    print(spread("bound -> annotation written", latencies(pods, clock.bound, clock.annotated)))
    print(
        spread(
            "created -> bound (scheduler, reference)", latencies(pods, clock.created, clock.bound)
        )
    )
    created = sum(p in clock.created for p in pods)
    unserved = sum(p in clock.created and p not in clock.annotated for p in pods)
    print(
        f"  first scale-up -> last annotation: {last - begin:.2f} s "
        f"({len(pods) / (last - begin):.0f} pods/s); -> every status complete: {done - begin:.2f} s"
    )
    print(
        f"  pods the operator failed to create: {len(pods) - created}; "
        f"created but never given ports: {unserved}"
    )
    cost.report(len(pods))


# --- the micro-benchmark: bare pods created already bound ------------------------------


def bare_pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "berth", "berth.dev/deployment": "micro"},
            "annotations": {"berth.dev/port-plan": PLAN},
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "enableServiceLinks": False,
            "containers": [{"name": "engine", "image": "engine:1"}],
        },
    }


def create_pods(
    names: list[str], nodes: list[str], workers: int, pace: float
) -> tuple[dict[str, float], dict[str, float], int]:
    """Create bound pods on a schedule; name -> when its create call started and
    when it returned, and how many failed."""
    core = client.CoreV1Api()
    started: dict[str, float] = {}
    returned: dict[str, float] = {}

    def one(i: int) -> None:
        started[names[i]] = time.monotonic()
        body = bare_pod(names[i], nodes[i % len(nodes)])
        # Raw response: deserialising it would cost this process time the watches need.
        core.create_namespaced_pod(NAMESPACE, body, _preload_content=False)  # type: ignore[arg-type]
        returned[names[i]] = time.monotonic()

    begin = time.monotonic()
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(workers) as pool:
        for i in range(len(names)):
            # On a schedule, not sleep after sleep: slow calls must not lower the rate.
            time.sleep(max(0.0, begin + i * pace - time.monotonic()))
            futures.append(pool.submit(one, i))
    failed = sum(f.exception() is not None for f in futures)
    return started, returned, failed


def run_micro(
    bench: Bench, title: str, names: list[str], workers: int, pace: float
) -> dict[str, float]:
    """Returns the figures the targets are judged by (see ``judge``)."""
    clock = bench.clock
    cost = Cost(bench.operator)
    started, returned, failed = create_pods(names, bench.nodes, workers, pace)
    ok = [n for n in names if n in started]
    try:
        wait_for(
            lambda: all(n in clock.annotated for n in ok), timeout=600, interval=0.1, what=title
        )
    except AssertionError as error:
        print(f"  ! {error}"[:300])
    first = min(started.values())
    last = max((clock.annotated[n] for n in ok if n in clock.annotated), default=first)
    print(f"\n== micro/bare-pods, {title}: {len(names)} pods created already bound")
    # Here "bound" is the create call's start: the pod is bound from its first revision.
    print(spread("create call -> ConfigMap written", latencies(ok, started, clock.configmap)))
    print(spread("create call -> annotation written", latencies(ok, started, clock.annotated)))
    raw = latencies(ok, started, returned)
    print(spread("create call -> its response (raw API reference)", raw))
    print(
        spread(
            "create call -> first watch event (reference)", latencies(ok, started, clock.created)
        )
    )
    rate = len(ok) / max(last - first, 1e-9)
    print(f"  first create -> last annotation: {last - first:.2f} s ({rate:.0f} pods/s)")
    created = max(returned.values(), default=first) - first
    last_cm = max((clock.configmap[n] for n in ok if n in clock.configmap), default=first)
    print(
        f"  first create -> last create returned: {created:.2f} s; "
        f"-> last ConfigMap: {last_cm - first:.2f} s"
    )
    print(f"  failed creates: {failed}")
    configmap = latencies(ok, started, clock.configmap)
    figures = cost.report(len(ok))
    return {
        **figures,
        "p50": pct(configmap, 50) if configmap else float("inf"),
        "p99": pct(configmap, 99) if configmap else float("inf"),
        "raw p50": pct(raw, 50) if raw else 0.0,
        "raw p99": pct(raw, 99) if raw else 0.0,
        "created": created,
        "served": last_cm - first,
    }


# --- resync -------------------------------------------------------------------------


def started_up(operator: OperatorProcess) -> bool:
    """Start-up done: the view listed, every ledger repaired, pods watched."""
    return operator.metric("berth_startup_sweep_seconds") > 0


def run_resync(bench: Bench, total: int) -> dict[str, float]:
    """SIGKILL the operator with the cluster full, bind a pod while it is down,
    and time the restart: to start-up done, and to that pod's ports."""
    operator = bench.operator
    operator.kill()
    core = client.CoreV1Api()
    core.create_namespaced_pod(  # type: ignore[arg-type]
        NAMESPACE, bare_pod("after-restart", bench.nodes[0]), _preload_content=False
    )
    started = time.monotonic()
    operator.start()
    wait_for(lambda: started_up(operator), timeout=300, interval=0.1, what="start-up")
    ready = time.monotonic() - started
    wait_for(lambda: "after-restart" in bench.clock.annotated, timeout=300, interval=0.1)
    served = bench.clock.annotated["after-restart"] - started
    m = operator.metrics()
    writes = sum(v for k, v in requests_by_kind(m).items() if k.split()[0] in WRITES)
    nodes = len(bench.nodes)
    print(f"\n== resync: operator SIGKILLed and restarted with {total} pods on {nodes} nodes")
    print(f"  process start -> start-up done (view listed, ledgers repaired): {ready:.2f} s")
    print(f"  process start -> ports for a pod bound while it was down: {served:.2f} s")
    print(f"  writes {writes:.0f} (that pod's 3, and nothing else)")
    time.sleep(10)  # what the heap settles at, not only the resync's peak
    print(f"  operator peak RSS after resync: {operator.peak_rss_mb():.0f} MB")
    return {"resync": max(ready, served), "rss": operator.peak_rss_mb()}


def judge(steady: dict[str, float], burst: dict[str, float], resync: dict[str, float]) -> None:
    """The targets of the 10,000-pod run, each as measured / its reference in this run."""
    rows = [
        ("steady: bound -> ConfigMap p50 / raw create p50", steady["p50"] / steady["raw p50"], 3),
        ("steady: bound -> ConfigMap p99 / raw create p99", steady["p99"] / steady["raw p99"], 3),
        (
            "burst: first create -> last ConfigMap / creating it",
            burst["served"] / burst["created"],
            1.5,
        ),
        ("peak RSS during the run (MB)", max(steady["rss"], burst["rss"]), 200),
        ("peak RSS after the restart (MB)", resync["rss"], 200),
        ("resync (s)", resync["resync"], 10),
        ("API writes per allocation (steady)", steady["writes"], 3),
    ]
    print("\n== targets")
    print(f"  {'figure':<52} {'measured':>9} {'target':>7}")
    for name, value, target in rows:
        mark = "ok" if value <= target else "MISSED"
        print(f"  {name:<52} {value:>9.2f} {'<= ' + format(target, 'g'):>7}  {mark}")


# --- main ---------------------------------------------------------------------------


def prepare_cluster(kubeconfig: str) -> list[str]:
    """Install the CRDs and namespaces; return the kwok node names."""
    kubectl = ["kubectl", "--kubeconfig", kubeconfig]
    subprocess.run(
        [*kubectl, "apply", "--server-side", "-f", str(ROOT / "crds")],
        check=True,
        capture_output=True,
    )
    for ns in ("berth-system", NAMESPACE):
        # Fails harmlessly when the namespace is left from an earlier run.
        subprocess.run([*kubectl, "create", "namespace", ns], check=False, capture_output=True)
    config.load_kube_config(kubeconfig)  # type: ignore[no-untyped-call]
    out = subprocess.run([*kubectl, "get", "nodes", "-o", "json"], check=True, capture_output=True)
    items = json.loads(out.stdout)["items"]
    kwok = [n["metadata"]["name"] for n in items if n["metadata"]["labels"].get("type") == "kwok"]
    return sorted(kwok or [n["metadata"]["name"] for n in items])


def testbed(*args: str) -> None:
    """The local control plane (``python -m testbed``): kwok nodes only, no real node."""
    subprocess.run([sys.executable, "-m", "testbed", *args], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--deployments", type=int, default=20, help="spread scenario")
    parser.add_argument("--replicas", type=int, default=20, help="per deployment")
    parser.add_argument("--packed-nodes", type=int, default=5)
    parser.add_argument("--packed-deployments", type=int, default=10)
    parser.add_argument("--scale-interval", type=float, default=0.5, help="s between scale-ups")
    parser.add_argument("--pods", type=int, default=300, help="micro: steady pods")
    parser.add_argument("--rate", type=float, default=20, help="micro: steady pods/s")
    parser.add_argument("--burst", type=int, default=100, help="micro: pods created at once")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting one")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    cluster_dir = str(workdir / "cluster")
    kubeconfig = args.kubeconfig
    if not kubeconfig:
        print(f"starting a local control plane with {args.nodes} kwok nodes in {workdir}")
        testbed("up", "--dir", cluster_dir, "--nodes", str(args.nodes), "--real-nodes", "0")
        kubeconfig = f"{cluster_dir}/kubeconfig"
    nodes = prepare_cluster(kubeconfig)
    operator = OperatorProcess(
        kubeconfig,
        workdir / "operator.log",
        # The production sweep interval, not the test suite's 5 s: a sweep lists
        # every Berth pod and ledger, and its cost belongs in the figures.
        env={"BERTH_METRICS_PORT": str(free_port()), "BERTH_SWEEP_INTERVAL": "60"},
    ).start()
    clock = Clock(client.CoreV1Api()).start()
    bench = Bench(clock, operator, args, nodes)
    try:
        wait_for(lambda: started_up(operator), timeout=60, what="operator ready")
        spread_names = [f"spread-{i}" for i in range(args.deployments)]
        run_deployments(bench, "deployments/spread", spread_names, [None] * len(spread_names))
        packed = nodes[: args.packed_nodes]
        packed_names = [f"packed-{i}" for i in range(args.packed_deployments)]
        pins: list[str | None] = [packed[i % len(packed)] for i in range(len(packed_names))]
        per_node = len(packed_names) * args.replicas // len(packed)
        print(f"\n(packed: {per_node} pods per node on {len(packed)} nodes)")
        run_deployments(bench, "deployments/packed", packed_names, pins)
        steady = [f"steady-{i}" for i in range(args.pods)]
        steady_figures = run_micro(bench, f"steady {args.rate:g} pods/s", steady, 8, 1 / args.rate)
        burst = [f"burst-{i}" for i in range(args.burst)]
        burst_figures = run_micro(bench, "burst", burst, 16, 0)
        deployed = (args.deployments + args.packed_deployments) * args.replicas
        resync = run_resync(bench, deployed + args.pods + args.burst)
        judge(steady_figures, burst_figures, resync)
        if clock.relists or clock.errors:
            print(f"\n! watch re-lists {clock.relists} (stamps after one may be late)")
            print(f"! watch errors: {clock.errors}")
    finally:
        clock.stop()
        operator.stop()
        if not args.kubeconfig:
            testbed("down", "--dir", cluster_dir)
    print(f"\noperator log: {workdir / 'operator.log'}")


if __name__ == "__main__":
    main()
