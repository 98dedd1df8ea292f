#!/usr/bin/env python3
"""How long allocation stops when the active operator replica goes away.

Two elected replicas (``BERTH_LEADER_ELECTION=true``, the chart's default
timings: 8 s Lease, 5 s renew deadline, renewal every 2 s, standby retry
every 1 s) on a local control plane with kwok nodes. Each run takes the
active replica away, creates a bound pod at that moment, and times it to its
``berth.dev/ports`` annotation; then a replacement process joins as the new
standby. Prints figures; asserts nothing (tests/integration/test_failover.py
holds the 15 s bound).

  kill   SIGKILL, as when its node dies
  pause  SIGSTOP, as when its node goes NotReady (frozen, not dead); SIGCONT
         afterwards: the old leader must leave without allocating
  cut    its API connection dropped and refused (a partition)
  term   SIGTERM, a graceful stop (rollout, drain): the Lease is released

  python -m scripts.bench_failover                 # 5 runs of each
  python -m scripts.bench_failover --runs 2 --how kill pause
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import config
from tests.support.failover import LEASE, Pair, exited_on_its_own

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "bench-failover"
HOWS = ("kill", "pause", "cut", "term")


def localcluster(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "hack" / "localcluster.py"), *args], check=True)


def prepare(kubeconfig: str) -> list[str]:
    kubectl = ["kubectl", "--kubeconfig", kubeconfig]
    subprocess.run(
        [*kubectl, "apply", "--server-side", "-f", str(ROOT / "crds")],
        check=True,
        capture_output=True,
    )
    # A fresh namespace: every pod in it is this run's.
    subprocess.run(
        [*kubectl, "delete", "namespace", NAMESPACE, "--wait"], check=False, capture_output=True
    )
    for ns in ("berth-system", NAMESPACE):
        subprocess.run([*kubectl, "create", "namespace", ns], check=False, capture_output=True)
    nodes = subprocess.run(
        [*kubectl, "get", "nodes", "-o", "name"], check=True, capture_output=True, text=True
    ).stdout.split()
    return [n.removeprefix("node/") for n in nodes]


def one_run(pair: Pair, how: str) -> float:
    old, elapsed = pair.fail_over(how)
    notes = ""
    if how == "pause":
        resumed = time.time()
        old.resume()
        code = exited_on_its_own(old, 10)
        notes = f"; after SIGCONT: exit {code}, allocations {len(old.allocations_since(resumed))}"
    elif how == "cut":
        notes = f"; old leader gone before the new one allocated: {not old.alive()}"
    elif how == "term":
        notes = f"; exit {exited_on_its_own(old, 30)}"
    pair.replace(old)
    pair.allocate_probe()
    print(f"  {how:5} {elapsed:6.2f} s{notes}", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs of each way")
    parser.add_argument("--how", nargs="+", choices=HOWS, default=list(HOWS))
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting one")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="berth-failover-"))
    cluster_dir = str(workdir / "cluster")
    kubeconfig = args.kubeconfig
    if not kubeconfig:
        print(f"starting a local control plane with {args.nodes} kwok nodes in {workdir}")
        localcluster("up", "--dir", cluster_dir, "--nodes", str(args.nodes))
        kubeconfig = f"{cluster_dir}/kubeconfig"
    nodes = prepare(kubeconfig)
    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    lease = f"bench-{int(time.time())}"
    pair = Pair(api, kubeconfig, NAMESPACE, nodes, workdir, lease)
    times: dict[str, list[float]] = {how: [] for how in args.how}
    print(f"lease timings: {LEASE}")
    try:
        pair.start()
        for _ in range(args.runs):
            for how in args.how:
                times[how].append(one_run(pair, how))
    finally:
        pair.stop()
        if not args.kubeconfig:
            localcluster("down", "--dir", cluster_dir)
    print("\n== loss of the active replica -> a pod created then has its ports (s)")
    for how, values in times.items():
        if values:
            print(
                f"  {how:5} runs {len(values)}  min {min(values):.2f}  "
                f"median {statistics.median(values):.2f}  max {max(values):.2f}"
            )
    print(f"\nlogs: {workdir}")


if __name__ == "__main__":
    main()
