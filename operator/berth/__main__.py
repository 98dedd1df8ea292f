"""``python -m berth``: run the operator (what the container image runs)."""

from __future__ import annotations

import argparse
import os

import kopf

import berth.controllers  # noqa: F401  (registers the handlers)
from berth.config import OperatorConfig
from berth.logs import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m berth", description=__doc__)
    parser.add_argument(
        "--liveness",
        default=os.environ.get("BERTH_LIVENESS", ""),
        help="e.g. http://0.0.0.0:8081/healthz",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(os.environ.get("BERTH_PRIORITY", "0")),
        help="kopf peering priority: the highest live replica is active",
    )
    parser.add_argument(
        "--peering",
        default=os.environ.get("BERTH_PEERING", ""),
        help="ClusterKopfPeering name; empty runs standalone",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logs (BERTH_LOG_LEVEL=debug)")
    args = parser.parse_args()
    config = OperatorConfig.from_env()
    configure_logging("debug" if args.verbose else config.log_level, config.log_format)
    namespaces = config.watch_namespaces
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
