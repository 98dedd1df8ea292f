"""Pod start-up latency Berth adds on a real kubelet.

Two kinds of pod, interleaved in one run on the test bed's real node: Berth's
(an InferenceDeployment whose engine gets its ports through the per-pod
ConfigMap) and the same engine pod with static env ports. For each pod:
from its scheduling (its binding to the node) to its container reported running, both seen
through one watch. Prints p50/p95 of
each and their ratios.

    python -m scripts.bench_startup [--pods 50] [--cluster-dir DIR]   # from the repo root

Without --cluster-dir it starts a test bed (1 kwok node, 1 real node) in a
temp dir and stops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from testbed import LocalCluster
from testbed.workloads import engine_container, engine_deployment, pin_to
from tests.support.operator_process import OperatorProcess, wait_for
from urllib3.exceptions import ProtocolError

ROOT = Path(__file__).resolve().parents[1]
Body = dict[str, Any]
BLOCKS = [("http", 1), ("side", 4)]
POOL_START = 62000  # above the ephemeral range; room for 2 x 50 pods x 5 ports


class Kubectl:
    def __init__(self, cluster: LocalCluster) -> None:
        self.argv = [str(cluster.tools.kubectl), f"--kubeconfig={cluster.kubeconfig}"]

    def __call__(self, *args: str, input: str | None = None) -> str:
        return subprocess.run(
            [*self.argv, *args], input=input, capture_output=True, text=True, check=True
        ).stdout

    def apply(self, body: Body) -> None:
        self("apply", "-f", "-", input=json.dumps(body))

    def pods(self, namespace: str, selector: str) -> list[Body]:
        items: list[Body] = json.loads(
            self("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        )["items"]
        return items


class Stamps:
    """Watches the namespace's pods and stamps, on arrival, when each was bound
    to the node and when its container was first reported running. The API's
    own timestamps have one-second resolution; the watch adds a few ms."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.bound: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.kind: dict[str, str] = {}
        api = k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.core = k8s.CoreV1Api(api)
        self.watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        self.namespace = namespace
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(ProtocolError):  # the stream ends when we stop
            self._follow()

    def _follow(self) -> None:
        for event in self.watch.stream(self.core.list_namespaced_pod, self.namespace):  # type: ignore[no-untyped-call]
            now = time.monotonic()
            pod = event["object"]
            name = pod.metadata.name
            self.kind[name] = "static" if (pod.metadata.labels or {}).get("bench") else "berth"
            if pod.spec.node_name:
                self.bound.setdefault(name, now)
            statuses = pod.status.container_statuses or []
            if statuses and statuses[0].state.running:
                self.started.setdefault(name, now)

    def seconds(self, kind: str) -> list[float]:
        return [
            self.started[n] - self.bound[n]
            for n in list(self.started)
            if self.kind.get(n) == kind and n in self.bound
        ]

    def stop(self) -> None:
        self.watch.stop()  # type: ignore[no-untyped-call]


def wait_started(stamps: Stamps, kind: str, count: int) -> list[float]:
    result: list[float] = wait_for(
        lambda: len(stamps.seconds(kind)) >= count and stamps.seconds(kind),
        timeout=600,
        interval=0.2,
        what=f"{count} {kind} pods started",
    )
    return result


def static_pod(name: str, node: str, port: int) -> Body:
    container = engine_container({"SIDE_PORT": 4})
    container["env"] += [
        {"name": "HTTP_PORT", "value": str(port)},
        {"name": "SIDE_PORT", "value": str(port + 1)},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "static"}},
        "spec": pin_to({"hostNetwork": True, "containers": [container]}, node),
    }


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@contextmanager
def test_bed(cluster_dir: str | None) -> Iterator[LocalCluster]:
    if cluster_dir:
        cluster = LocalCluster(cluster_dir)
        if not cluster.is_running():
            cluster.up(1, real_nodes=1)
        yield cluster
        return
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster")
        cluster.up(1, real_nodes=1, die_with_parent=True)
        try:
            yield cluster
        finally:
            cluster.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=50, help="pods of each kind (default 50)")
    parser.add_argument("--batch", type=int, default=5, help="pods of each kind created at once")
    parser.add_argument("--cluster-dir", help="reuse (or start) the test bed in this dir")
    args = parser.parse_args()

    with test_bed(args.cluster_dir) as cluster, tempfile.TemporaryDirectory() as tmp:
        kubectl = Kubectl(cluster)
        node = next(iter(cluster.state()["real_nodes"]))
        namespace = f"bench-startup-{int(time.time())}"
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
        for ns in (namespace, "berth-system"):
            manifest = kubectl("create", "namespace", ns, "--dry-run=client", "-o", "json")
            kubectl("apply", "-f", "-", input=manifest)
        kubectl.apply(
            {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "NodePortPool",
                "metadata": {"name": "bench-startup"},
                "spec": {
                    "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
                    "ranges": [{"start": POOL_START, "end": POOL_START + 5 * args.pods - 1}],
                    "priority": 1000,
                },
            }
        )
        operator = OperatorProcess(str(cluster.kubeconfig), Path(tmp) / "operator.log").start()
        stamps = Stamps(cluster, namespace)
        static_base = POOL_START + 5 * args.pods + 100
        try:
            # Interleaved batches: both kinds see the same kubelet load.
            for first in range(0, args.pods, args.batch):
                last = min(first + args.batch, args.pods)
                for i in range(first, last):
                    body = engine_deployment(f"berth-{i}", node, BLOCKS)
                    body["metadata"]["namespace"] = namespace
                    kubectl.apply(body)
                    pod = static_pod(f"static-{i}", node, static_base + 5 * i)
                    pod["metadata"]["namespace"] = namespace
                    kubectl.apply(pod)
                wait_started(stamps, "static", last)
                wait_started(stamps, "berth", last)
            berth = stamps.seconds("berth")
            static = stamps.seconds("static")
        finally:
            stamps.stop()
            operator.stop()
            kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s")
            kubectl("delete", "nodeportpool", "bench-startup")

    b50, b95 = report("berth ports", berth)
    s50, s95 = report("static env", static)
    print(f"ratio berth/static: p50 {b50 / s50:.2f}x, p95 {b95 / s95:.2f}x")
    return 0


def report(label: str, values: list[float]) -> tuple[float, float]:
    p50, p95 = percentile(values, 50), percentile(values, 95)
    print(f"{label:12} n={len(values):3}  p50 {p50:.2f}s  p95 {p95:.2f}s  max {max(values):.2f}s")
    return p50, p95


if __name__ == "__main__":
    raise SystemExit(main())
