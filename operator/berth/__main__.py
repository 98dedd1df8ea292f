"""``python -m berth``: run the operator (what the container image runs)."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

import berth.controllers  # noqa: F401  (registers the handlers)
from berth.audit import configure_audit_stream
from berth.config import OperatorConfig


def main() -> None:
    parser = argparse.ArgumentParser(prog="berth", description=__doc__)
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
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.verbose:
        # One INFO line per handled pod event is noise at thousands of pods.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    configure_audit_stream()
    namespaces = OperatorConfig.from_env().watch_namespaces
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
