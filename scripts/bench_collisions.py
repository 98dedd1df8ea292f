"""Port collisions side by side: engines that pick their ports vs Berth's.

Run from the repository root (Berth importable, e.g. after ``source hack/env.sh``):

  python -m scripts.bench_collisions                  # starts a test bed with 1 real node
  python -m scripts.bench_collisions --kubeconfig K   # an existing cluster with a real node

Prints figures; asserts nothing. On one real node, in one run, three modes,
each --engines engines x --ports ports started at once as hostNetwork pods
(the stand-in engine, testbed/csrc/engine.c), for --rounds rounds; the modes
take turns within each round, so they see the same machine:

  probe  plain pods; each engine picks its ports itself: bind port 0 on the
         node IP, read the port the kernel chose, close (one probe per port),
         then binds them all after its start-up delay.
  fixed  plain pods, in deployments of --group ranks; rank r binds
         base + r * ports on, and every deployment starts from the same base.
  berth  InferenceDeployments of --group replicas (custom preset, one block of
         --ports ports) with the operator running; ports from a NodePortPool
         of the real node.

Every engine waits a random start-up delay (--startup-ms) between choosing
its ports and binding them, as an engine loads its model. Pods are deleted
between rounds, and the next round starts when they are gone. How starts are
counted: tests/support/collisions.py (each pod is one start; a start failed
with EADDRINUSE when its container exited non-zero with EADDRINUSE in its
termination message, the tail of its log).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import config
from tests.support.collisions import (
    MODES,
    Collisions,
    Kube,
    Outcome,
    Shape,
    berth_running,
    ephemeral_range,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = (21000, 21999)  # Berth's ports on the real node: below the ephemeral range


def testbed(*args: str) -> None:
    """The local test bed (``python -m testbed``)."""
    subprocess.run([sys.executable, "-m", "testbed", *args], check=True, cwd=ROOT)


def real_node(kube: Kube, wanted: str | None) -> tuple[str, str]:
    """The real node (the first labelled type=real unless named) and its IP."""
    nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    for node in nodes:
        meta = node["metadata"]
        if meta["name"] == wanted or (not wanted and meta["labels"].get("type") == "real"):
            ips = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
            return meta["name"], ips[0] if ips else "?"
    raise SystemExit(f"no real node ({wanted or 'label type=real'}) in this cluster")


def describe(args: argparse.Namespace, node: str, ip: str) -> None:
    low, high = ephemeral_range()
    shape = f"{args.engines} engines x {args.ports} ports"
    deployments = f"{-(-args.engines // args.group)} deployments x {args.group}"
    print(f"node {node} ({ip}): {shape} started at once per mode, {args.rounds} rounds")
    print(f"start-up delay between choosing ports and binding them: {args.startup_ms} ms,")
    print("  random per engine; every pod hostNetwork, restartPolicy Never")
    print(f"ephemeral range (this host's ip_local_port_range): {low}-{high}")
    print("  probe: each engine probes its ports (bind port 0 on the node IP, getsockname,")
    print("         close), waits its delay, then binds them")
    last = args.fixed_base + args.group * args.ports - 1
    print(f"  fixed: {deployments} ranks, each deployment from base {args.fixed_base};")
    print(f"         rank r binds {args.fixed_base} + {args.ports}r on ({args.fixed_base}-{last})")
    print(f"  berth: {deployments} replicas (InferenceDeployments, custom preset,")
    print(f"         one {args.ports}-port block), NodePortPool {POOL[0]}-{POOL[1]}")


def table(totals: dict[str, list[Outcome]]) -> None:
    print("\nmode  | starts | failed with EADDRINUSE | % failed | on a port of the round | other")
    print("----- | ------ | ---------------------- | -------- | ---------------------- | -----")
    for mode, rounds in totals.items():
        starts = sum(o.starts for o in rounds)
        failed = sum(o.eaddrinuse for o in rounds)
        ours = sum(o.in_use_by_the_round() for o in rounds)
        other = sum(len(o.other) for o in rounds)
        share = 100 * failed / starts if starts else 0.0
        print(f"{mode:5} | {starts:6} | {failed:22} | {share:6.1f} % | {ours:22} | {other}")
    print(
        "\ncounted from each container's final state: one pod is one start (restartPolicy\n"
        "Never); failed with EADDRINUSE = exited 1 with EADDRINUSE in its termination\n"
        "message (the tail of its log, terminationMessagePolicy FallbackToLogsOnError);\n"
        "on a port of the round = the port it failed on is one a started engine of the\n"
        "same round listens on (the rest were held by something else at that moment);\n"
        "other = failures without EADDRINUSE and starts with no outcome in time"
    )
    for mode, rounds in totals.items():
        for line in [line for o in rounds for line in o.other][:5]:
            print(f"  ! {mode}: {line}"[:300])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", type=int, default=16, help="engines per mode and round")
    parser.add_argument("--ports", type=int, default=8, help="ports per engine")
    parser.add_argument("--group", type=int, default=4, help="ranks/replicas per deployment")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--startup-ms", default="200-2000", help="LO-HI, random per engine")
    parser.add_argument("--fixed-base", type=int, default=29500, help="fixed mode's base port")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--node", help="the real node (default: the first labelled type=real)")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a test bed")
    parser.add_argument("--dir", help="the test bed's directory (default: a temp dir)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="berth-collisions-"))
    cluster_dir = args.dir or str(workdir / "cluster")
    kubeconfig = args.kubeconfig
    if not kubeconfig:
        print(f"starting a test bed with 1 real node in {cluster_dir}")
        testbed("up", "--dir", cluster_dir, "--nodes", "1", "--real-nodes", "1")
        kubeconfig = f"{cluster_dir}/kubeconfig"
    kube = Kube(kubeconfig)
    namespace = f"bench-collisions-{int(time.time())}"
    try:
        node, ip = real_node(kube, args.node)
        kube.kubectl("create", "namespace", namespace)
        shape = Shape(args.engines, args.ports, args.group, args.startup_ms, args.fixed_base)
        api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        bench = Collisions(api, namespace, node, shape)
        describe(args, node, ip)
        totals: dict[str, list[Outcome]] = {m: [] for m in modes}
        with berth_running(kube, node, POOL, workdir / "operator.log"):
            for r in range(args.rounds):
                for mode in modes:
                    outcome = bench.run(mode, r)
                    totals[mode].append(outcome)
                    print(
                        f"round {r + 1} {mode:5}: {outcome.starts} starts, {outcome.ready} ready, "
                        f"{outcome.eaddrinuse} EADDRINUSE ({outcome.in_use_by_the_round()} on "
                        f"a port of the round), {len(outcome.other)} other "
                        f"({outcome.seconds:.1f} s to the last start's outcome)",
                        flush=True,
                    )
        table(totals)
    finally:
        kube.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false")
        if not args.kubeconfig:
            testbed("down", "--dir", cluster_dir)
    print(f"\noperator log: {workdir / 'operator.log'}")


if __name__ == "__main__":
    main()
