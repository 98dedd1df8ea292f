"""Nodes, pools and other pods: watch events into the cluster view.

Low-level event handlers only; start-up fills the view with LISTs before
any of these runs (see berth.view for why not kopf indexes). A change that
can add capacity wakes the pods waiting for ports at once.
"""

from __future__ import annotations

from typing import Any

import kopf

from berth.names import GROUP
from berth.pods import is_berths
from berth.runtime import Runtime


@kopf.on.event("nodes")
async def node_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    if runtime.view.observe_node(type, body):  # labels changed: maybe another pool
        await runtime.allocation.retry_waiting(body["metadata"]["name"])


@kopf.on.event(GROUP, "nodeportpools")
async def pool_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    runtime.view.observe_pool(type, body)
    await runtime.allocation.retry_waiting()


def _not_berths(body: kopf.Body, **_: Any) -> bool:
    return not is_berths(body)


@kopf.on.event("pods", when=_not_berths)
def foreign_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Ports other pods claim on their node: never handed out, reported if already held."""
    runtime: Runtime = memo["runtime"]
    node = runtime.view.observe_pod(type, body)
    if node is not None:
        runtime.repairer.check_foreign(node)
