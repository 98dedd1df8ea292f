"""``berth``: the command-line tool (the operator itself is ``python -m berth``).

``berth ranges`` prints the per-node range map from the ledgers; ``berth
check`` compares ledgers, delivered ports, ConfigMaps and foreign claims.
Both work against whatever cluster the kubeconfig points at, read-only.
``berth capacity`` prints the ``berth.dev/ports`` each node advertises;
``--remove`` takes it off every node (uninstall, after the operator is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from berth import capacity
from berth.agent.report import REPORT_SELECTOR, NodeReport, report_entry
from berth.cli import check, ranges
from berth.config import OperatorConfig
from berth.kube import Kube, path
from berth.ledger.records import NodeLedger
from berth.ledger.store import LedgerStore
from berth.names import LABEL_MANAGED_BY, MANAGED_BY


async def _read(
    namespace: str, everything: bool
) -> tuple[list[NodeLedger], list[Any], list[Any], list[NodeReport]]:
    client = await Kube.connect()
    try:
        ledgers = await LedgerStore(client, namespace).list()
        if not everything:
            listed = await client.list(path("configmaps", namespace=namespace), REPORT_SELECTOR)
            reports = [r for r in map(report_entry, listed) if r is not None]
            return ledgers, [], [], reports
        pods = await client.list(path("pods"))
        managed = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        configmaps = await client.list(path("configmaps"), label_selector=managed)
        return ledgers, pods, configmaps, []
    finally:
        await client.close()


async def _capacity(remove: bool) -> str:
    client = await Kube.connect()
    try:
        if remove:
            removed = await capacity.remove_all(client)
            return f"removed {capacity.RESOURCE} from {len(removed)} node(s)"
        lines = []
        async for node in client.iterate(path("nodes")):
            figure = capacity.published(node)
            shown = "-" if figure is None else str(figure)
            lines.append(f"{node['metadata']['name']}  {capacity.RESOURCE}={shown}")
        return "\n".join(lines) or "(no nodes)"
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("ranges", "print the per-node range map"),
        ("check", "find overlaps and disagreements; exit 1 on any overlap"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--namespace",
            default=OperatorConfig.from_env().namespace,
            help="the operator's namespace, where the ledgers live",
        )
        command.add_argument("-o", "--output", choices=("text", "json"), default="text")
    command = sub.add_parser("capacity", help=f"print (or --remove) {capacity.RESOURCE}")
    command.add_argument(
        "--remove", action="store_true", help="remove it from every node (stop the operator first)"
    )
    args = parser.parse_args(argv)
    if args.command == "capacity":
        print(asyncio.run(_capacity(args.remove)))
        return 0
    json_out = args.output == "json"
    ledgers, pods, configmaps, reports = asyncio.run(_read(args.namespace, args.command == "check"))
    if args.command == "ranges":
        render = ranges.render_json if json_out else ranges.render_table
        print(render(ledgers, reports))
        return 0
    findings = check.find(ledgers, pods, configmaps)
    print(check.render_json(findings) if json_out else check.render_text(findings))
    return 1 if any(f.error for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
