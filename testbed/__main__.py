"""``python -m testbed up|down|status --dir DIR``: the test bed from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import testbed
from testbed.cluster import LocalCluster
from testbed.procs import ClusterError, say_stderr


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed", description=testbed.__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane with N fake GPU nodes")
    up.add_argument("--dir", required=True, help="state directory (created)")
    up.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
    up.add_argument(
        "--real-nodes", type=int, default=1, help="real nodes: kubelet + containerd (default 1)"
    )
    up.add_argument("--max-pods", type=int, default=256, help="pods per node (default 256)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    down = sub.add_parser("down", help="stop everything and remove the etcd data")
    down.add_argument("--dir", required=True)
    down.add_argument("--grace", type=float, default=10.0, help="seconds between TERM and KILL")
    status = sub.add_parser("status", help="print components, ports, readiness (JSON)")
    status.add_argument("--dir", required=True)
    args = parser.parse_args(argv)

    try:
        cluster = LocalCluster(args.dir)
        if args.cmd == "up":
            cluster.up(
                args.nodes,
                real_nodes=args.real_nodes,
                max_pods=args.max_pods,
                timeout=args.timeout,
            )
            print(f"export KUBECONFIG={cluster.kubeconfig}")
            return 0
        if args.cmd == "down":
            stopped = cluster.down(args.grace)
            say_stderr(f"stopped {', '.join(stopped) or 'nothing (not running)'}")
            return 0
        info = cluster.status()
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 1
    except ClusterError as e:
        say_stderr(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
