"""Nodes and pools: watch events into the cluster view (pods: controllers/pods.py).

Low-level event handlers only; start-up fills the view with LISTs before
any of these runs (see berth.view for why not kopf indexes). A change that
can add capacity wakes the pods waiting for ports at once; a change of what
a node can serve is advertised to the scheduler (berth.capacity).
"""

from __future__ import annotations

from typing import Any

import kopf

from berth.names import GROUP
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
