"""How long a lost ledger takes to be repaired, with many pods.

Run from the repository root: ``python -m scripts.bench_repair`` (a local
test bed is started in a temp dir unless ``--dir`` names a running one).

It fills the cluster with InferenceDeployments whose pods all get ports,
records what every pod was delivered, then measures two cases:

* ``restart``: every ledger deleted while the operator is down; from the
  operator's start to every ledger agreeing with the delivered ports (the
  start-up repair, before any allocation);
* ``sweep``: every ledger deleted while the operator runs; from the
  deletion to every ledger agreeing (bounded by ``BERTH_SWEEP_INTERVAL``,
  printed beside it).

Each run also checks that no pod's delivered ports changed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.cluster import LocalCluster
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import OPERATOR_NAMESPACE, custom_deployment, ensure_namespace

from berth.names import ANNOTATION_PORTS, LABEL_LEDGER, LABEL_MANAGED_BY, MANAGED_BY

NAMESPACE = "bench-repair"
LEDGERS = f"{LABEL_LEDGER}=true"
PORTS = ANNOTATION_PORTS


class Bench:
    def __init__(self, bed: LocalCluster) -> None:
        self.bed = bed
        self.binary = str(bed.tools.kubectl)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        cmd = [self.binary, f"--kubeconfig={self.bed.kubeconfig}", *args]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True).stdout

    def delivered(self) -> dict[str, tuple[str, str]]:
        """pod uid -> (node, ports annotation)."""
        pods = json.loads(
            self.kubectl(
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                f"{LABEL_MANAGED_BY}={MANAGED_BY}",
                "-o",
                "json",
            )
        )["items"]
        return {
            p["metadata"]["uid"]: (
                p["spec"]["nodeName"],
                p["metadata"]["annotations"][ANNOTATION_PORTS],
            )
            for p in pods
            if PORTS in (p["metadata"].get("annotations") or {})
        }

    def ledgers_agree(self, truth: dict[str, tuple[str, str]]) -> bool:
        cms = json.loads(
            self.kubectl(
                "get",
                "configmaps",
                "-n",
                OPERATOR_NAMESPACE,
                "-l",
                "berth.dev/ledger=true",
                "-o",
                "json",
            )
        )["items"]
        recorded = {uid for cm in cms for uid in (cm.get("data") or {}) if uid != "pool"}
        return set(truth) <= recorded

    def delete_ledgers(self) -> None:
        self.kubectl(
            "delete",
            "configmaps",
            "-n",
            OPERATOR_NAMESPACE,
            "-l",
            "berth.dev/ledger=true",
            "--wait=false",
        )


def timed(what: Callable[[], Any]) -> float:
    started = time.monotonic()
    what()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-deployment", type=int, default=100)
    parser.add_argument("--sweep", type=float, default=10.0, help="BERTH_SWEEP_INTERVAL")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", help="a running test bed to use")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-repair-"))
    print(f"operator log: {scratch / 'operator.log'}")
    bed = LocalCluster(args.dir or scratch / "cluster")
    if not args.dir:
        bed.up(args.nodes, die_with_parent=True, max_pods=max(110, 2 * args.pods // args.nodes))
    bench = Bench(bed)
    bench.kubectl("apply", "--server-side", "-f", str(Path(__file__).parents[1] / "crds"))
    ensure_namespace(bench, OPERATOR_NAMESPACE)
    ensure_namespace(bench, NAMESPACE)
    env = {"BERTH_SWEEP_INTERVAL": str(args.sweep)}
    operator = OperatorProcess(str(bed.kubeconfig), scratch / "operator.log", env=env).start()
    try:
        for i in range(args.pods // args.per_deployment):
            body = custom_deployment(f"d{i}", args.per_deployment)
            body["metadata"]["namespace"] = NAMESPACE
            bench.kubectl("apply", "-f", "-", input=json.dumps(body))
        truth = wait_for(
            lambda: (d := bench.delivered()) and len(d) >= args.pods and d,
            timeout=900,
            interval=2,
            what=f"{args.pods} pods with ports",
        )
        print(f"{len(truth)} pods on {len({n for n, _ in truth.values()})} nodes have ports")
        for run in range(args.runs):
            operator.kill()
            bench.delete_ledgers()
            wait_for(lambda: not bench.ledgers_agree(truth), timeout=30, what="ledgers gone")
            started = time.monotonic()
            operator.start()
            wait_for(lambda: bench.ledgers_agree(truth), timeout=300, interval=0.1, what="repair")
            restart = time.monotonic() - started
            time.sleep(args.sweep * 1.2)  # let the sweep loop settle into its rhythm
            bench.delete_ledgers()
            started = time.monotonic()
            wait_for(lambda: bench.ledgers_agree(truth), timeout=300, interval=0.1, what="sweep")
            sweep = time.monotonic() - started
            assert bench.delivered() == truth, "a pod's delivered ports changed"
            print(
                f"run {run + 1}: restart -> every ledger repaired {restart:.1f} s; "
                f"deleted while running -> repaired {sweep:.1f} s "
                f"(sweep interval {args.sweep:.0f} s)"
            )
    finally:
        operator.stop()
        if not args.dir:
            bed.down()


if __name__ == "__main__":
    main()
