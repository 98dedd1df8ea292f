"""``berth ranges``: the per-node range map, read from the ledgers.

Works against any cluster the kubeconfig points at; needs only read access
to the ledger ConfigMaps in the operator's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from berth.config import OperatorConfig
from berth.kube import Kube
from berth.ledger.records import NodeLedger
from berth.ledger.store import LedgerStore


def render_table(ledgers: Sequence[NodeLedger]) -> str:
    lines = []
    for ledger in sorted(ledgers, key=lambda ledger: ledger.node):
        allocator = ledger.allocator
        lines.append(
            f"{ledger.node}  pool={ledger.pool.name} "
            f"[{','.join(map(str, ledger.pool.ranges))}]  "
            f"used={allocator.size - allocator.free}/{allocator.size}"
        )
        for holder, assignment in ledger.held():
            blocks = " ".join(f"{name}={rng}" for name, rng in assignment.blocks.items())
            who = f"{holder.namespace}/{holder.pod}"
            lines.append(f"  {who:<40} {holder.role or '-':<8} {blocks}")
    return "\n".join(lines) if lines else "(no allocations)"


def render_json(ledgers: Sequence[NodeLedger]) -> str:
    out = {
        ledger.node: {
            "pool": ledger.pool.name,
            "ranges": [str(r) for r in ledger.pool.ranges],
            "pods": [
                {
                    "namespace": h.namespace,
                    "pod": h.pod,
                    "uid": h.uid,
                    "deployment": h.deployment,
                    "role": h.role,
                    "blocks": {n: str(r) for n, r in a.blocks.items()},
                }
                for h, a in ledger.held()
            ],
        }
        for ledger in ledgers
    }
    return json.dumps(out, indent=2, sort_keys=True)


async def _ledgers(namespace: str) -> list[NodeLedger]:
    client = await Kube.connect()
    try:
        return await LedgerStore(client, namespace).list()
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth", description="Berth port ranges")
    sub = parser.add_subparsers(dest="command", required=True)
    ranges = sub.add_parser("ranges", help="print the per-node range map")
    ranges.add_argument(
        "--namespace",
        default=OperatorConfig.from_env().namespace,
        help="the operator's namespace, where the ledgers live",
    )
    ranges.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    ledgers = asyncio.run(_ledgers(args.namespace))
    print(render_json(ledgers) if args.output == "json" else render_table(ledgers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
