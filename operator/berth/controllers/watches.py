"""Nodes, pools and other pods: watch events into the cluster view.

Low-level event handlers only; start-up fills the view with LISTs before
any of these runs (see berth.view for why not kopf indexes). A change that
can add capacity wakes the pods waiting for ports at once; a change of what
a node can serve is advertised to the scheduler (berth.capacity).
"""

from __future__ import annotations

from typing import Any

import kopf

from berth.capacity import declares_host_ports
from berth.names import GROUP
from berth.pods import is_berths
from berth.runtime import Runtime


@kopf.on.event("nodes")
async def node_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    name = body["metadata"]["name"]
    runtime.capacity.observe_node(type, body)
    relabelled = runtime.view.observe_node(type, body)
    if type != "DELETED":
        # Also restores a figure someone removed; otherwise no write.
        await runtime.capacity.refresh(name, only_if_tight=not relabelled)
    if relabelled:  # maybe another pool
        await runtime.allocation.retry_waiting(name)


@kopf.on.event(GROUP, "nodeportpools")
async def pool_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    runtime.view.observe_pool(type, body)
    await runtime.capacity.refresh_all()
    await runtime.allocation.retry_waiting()


def _not_berths(body: kopf.Body, **_: Any) -> bool:
    return not is_berths(body)


@kopf.on.event("pods", when=_not_berths)
async def foreign_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Ports other pods claim on their node: never handed out, reported if already held,
    and not advertised."""
    runtime: Runtime = memo["runtime"]
    node = runtime.view.observe_pod(type, body)
    if node is not None:
        runtime.repairer.check_foreign(node)
    bound = body.get("spec", {}).get("nodeName")
    if bound and declares_host_ports(body):  # claimed, changed or given back
        await runtime.capacity.refresh(bound)
