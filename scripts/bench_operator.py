#!/usr/bin/env python3
"""Allocation latency, throughput and cost of the operator on a real control plane.

Prints figures; asserts nothing (targets are in the README and the issue).
Scenarios, in one run:
  steady  N pods spread over the nodes, created at --rate pods/s (latency
          below saturation; the burst measures throughput)
  burst   B pods created at once
  resync  SIGKILL the operator with the cluster full, start it, time the resync
Pods are created already bound (spec.nodeName), so "bound -> ConfigMap
written" is measured from the create call's return to the ConfigMap's ADDED
event on a watch. The raw pod-create latency of the same run is the reference.

  python scripts/bench_operator.py                 # 2000 pods / 200 nodes / 500 burst
  python scripts/bench_operator.py --pods 200 --nodes 20 --burst 100   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubernetes import client, config, watch  # noqa: E402
from tests.support.operator_process import OperatorProcess, free_port, wait_for  # noqa: E402
from urllib3.exceptions import ProtocolError  # noqa: E402

from berth.names import LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY  # noqa: E402
from berth.plan import (  # noqa: E402
    EnvBinding,
    PlanBlock,
    PortPlan,
    RolePlan,
)

NAMESPACE = "bench"
PLAN = PortPlan(
    RolePlan(
        blocks=(
            PlanBlock("http", 1, 1, (EnvBinding("HTTP_PORT", "start"),)),
            PlanBlock("nixl", 8, 1, (EnvBinding("NIXL_PORT", "rankBase", 1),)),
            PlanBlock("internal", 36, 1, (EnvBinding("VLLM_PORT", "start"),)),
        )
    ),
    0,
).encode()


def pod_body(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: "bench"},
            "annotations": {"berth.dev/port-plan": PLAN},
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "enableServiceLinks": False,
            "containers": [{"name": "engine", "image": "engine:1"}],
        },
    }


class ConfigMapClock:
    """Records when each pod's ports ConfigMap first appears on a watch."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.seen: dict[str, float] = {}
        self._core = core
        self._watch = watch.Watch()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        # One stream for the whole run: the client resumes from the last
        # resourceVersion when the server ends it, so no re-list ever stamps
        # a ConfigMap late.
        stream = self._watch.stream(
            self._core.list_namespaced_config_map,
            NAMESPACE,
            label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}",
        )
        with contextlib.suppress(ProtocolError):  # the stream cut by stop()
            for event in stream:
                name = event["object"].metadata.name.removesuffix("-ports")
                self.seen.setdefault(name, time.monotonic())

    def stop(self) -> None:
        self._watch.stop()


def create_pods(
    core: client.CoreV1Api, names: list[str], nodes: list[str], workers: int, pace: float
) -> dict[str, tuple[float, float]]:
    """name -> (call started, call returned), monotonic."""
    times: dict[str, tuple[float, float]] = {}

    def one(i: int) -> None:
        name = names[i]
        started = time.monotonic()
        core.create_namespaced_pod(NAMESPACE, pod_body(name, nodes[i % len(nodes)]))
        times[name] = (started, time.monotonic())

    begin = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        for i in range(len(names)):
            # On a schedule, not sleep after sleep: slow calls must not lower the rate.
            time.sleep(max(0.0, begin + i * pace - time.monotonic()))
            pool.submit(one, i)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(title: str, created: dict[str, tuple[float, float]], clock: ConfigMapClock) -> None:
    wait_for(lambda: all(n in clock.seen for n in created), timeout=600, what=title)
    latency = [(clock.seen[n] - t[1]) * 1000 for n, t in created.items()]
    raw = [(t[1] - t[0]) * 1000 for t in created.values()]
    first = min(t[0] for t in created.values())
    created_all = max(t[1] for t in created.values())
    last = max(clock.seen[n] for n in created)
    print(f"\n== {title}: {len(created)} pods")
    print(
        "  bound -> ConfigMap written (ms): "
        f"p50 {pct(latency, 50):.1f}  p95 {pct(latency, 95):.1f}  "
        f"p99 {pct(latency, 99):.1f}  max {max(latency):.1f}"
    )
    print(
        "  raw pod create (ms, reference): "
        f"p50 {pct(raw, 50):.1f}  p99 {pct(raw, 99):.1f}  mean {statistics.mean(raw):.1f}"
    )
    print(
        f"  first create -> last ConfigMap: {last - first:.2f} s  "
        f"({len(created) / (last - first):.0f} pods/s; creating them took "
        f"{created_all - first:.2f} s)"
    )


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


WRITE = re.compile(r'berth_api_requests_total\{resource="([^"]*)",verb="(POST|PUT|PATCH|DELETE)"\}')


def writes_by_kind(metrics: dict[str, float]) -> dict[str, float]:
    """``"PUT configmaps" -> count`` for every write Berth's client sent."""
    found = ((WRITE.fullmatch(key), value) for key, value in metrics.items())
    return {f"{m[2]} {m[1]}": value for m, value in found if m}


def writes(metrics: dict[str, float]) -> float:
    return sum(writes_by_kind(metrics).values())


def localcluster(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "hack" / "localcluster.py"), *args], check=True)


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
    config.load_kube_config(kubeconfig)
    items = client.CoreV1Api().list_node().items
    kwok = sorted(n.metadata.name for n in items if n.metadata.labels.get("type") == "kwok")
    return kwok or [n.metadata.name for n in items]


LE_SHOWN = ("0.01", "0.03", "0.15", "1.0")


def handler_shares(before: dict[str, float], after: dict[str, float]) -> str:
    """The operator's own view: handler start to annotation written, per bucket."""

    def count(le: str) -> float:
        key = f'berth_allocation_seconds_bucket{{le="{le}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    total = count("+Inf") or 1.0
    return "  ".join(f"<= {float(le) * 1000:.0f} ms {count(le) / total:.0%}" for le in LE_SHOWN)


def measure_allocation(
    core: client.CoreV1Api, nodes: list[str], operator: OperatorProcess, args: Any
) -> None:
    clock = ConfigMapClock(core)
    before = scrape(args.metrics_port)
    names = [f"steady-{i}" for i in range(args.pods)]
    steady = create_pods(core, names, nodes, workers=8, pace=1 / args.rate)
    report(f"steady, {args.rate:g} pods/s", steady, clock)
    middle = scrape(args.metrics_port)
    print(f"  operator side: {handler_shares(before, middle)}")
    names = [f"burst-{i}" for i in range(args.burst)]
    report("burst", create_pods(core, names, nodes, workers=16, pace=0), clock)
    print(f"  operator side: {handler_shares(middle, scrape(args.metrics_port))}")
    clock.stop()
    time.sleep(2)
    after = scrape(args.metrics_port)
    allocations = after["berth_allocations_total"] - before.get("berth_allocations_total", 0)
    print(f"\n== cost: {allocations:.0f} allocations")
    print(f"  API writes per allocation: {(writes(after) - writes(before)) / allocations:.2f}")
    old = writes_by_kind(before)
    kinds = {k: v - old.get(k, 0.0) for k, v in writes_by_kind(after).items()}
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items()) if v))
    print(f"  operator peak RSS: {operator.peak_rss_mb():.0f} MB")


def measure_resync(operator: OperatorProcess, nodes: list[str], args: Any) -> None:
    total = args.pods + args.burst
    operator.kill()
    started = time.monotonic()
    operator.start()
    wait_for(lambda: _resynced(args.metrics_port, total), timeout=300, interval=0.1, what="resync")
    elapsed = time.monotonic() - started
    m = scrape(args.metrics_port)
    print(f"\n== resync with {total} pods on {len(nodes)} nodes")
    print(f"  process start -> every pod event handled and the leak sweep done: {elapsed:.2f} s")
    print(f"  start-up sweep finished at {m['berth_startup_sweep_seconds']:.2f} s")
    print(f"  writes during resync: {writes(m):.0f}")
    print(f"  operator peak RSS after resync: {operator.peak_rss_mb():.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument(
        "--rate", type=float, default=20, help="steady scenario: pods created per second"
    )
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting one")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    cluster_dir = str(workdir / "cluster")
    kubeconfig = args.kubeconfig
    if not kubeconfig:
        print(f"starting a local control plane with {args.nodes} kwok nodes in {workdir}")
        localcluster("up", "--dir", cluster_dir, "--nodes", str(args.nodes))
        kubeconfig = f"{cluster_dir}/kubeconfig"
    nodes = prepare_cluster(kubeconfig)
    args.metrics_port = free_port()
    operator = OperatorProcess(
        kubeconfig,
        workdir / "operator.log",
        # The production sweep interval, not the test suite's 5 s: a sweep
        # lists every Berth pod and ledger, and its cost belongs in the
        # figures at the rate users run it.
        env={"BERTH_METRICS_PORT": str(args.metrics_port), "BERTH_SWEEP_INTERVAL": "60"},
    ).start()
    try:
        # Measure the steady state: the operator has synced and swept once.
        wait_for(lambda: _resynced(args.metrics_port, 0), timeout=60, what="operator ready")
        measure_allocation(client.CoreV1Api(), nodes, operator, args)
        measure_resync(operator, nodes, args)
    finally:
        operator.stop()
        if not args.kubeconfig:
            localcluster("down", "--dir", cluster_dir)
    print(f"\noperator log: {workdir / 'operator.log'}")


def _resynced(port: int, total: int) -> bool:
    try:
        m = scrape(port)
    except OSError:
        return False
    return (
        m.get("berth_pod_events_total", 0) >= total and m.get("berth_startup_sweep_seconds", 0) > 0
    )


if __name__ == "__main__":
    main()
