"""``berth ranges``: the per-node range map, read from the ledgers."""

from __future__ import annotations

import json
from collections.abc import Sequence

from berth.ledger.records import NodeLedger


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
