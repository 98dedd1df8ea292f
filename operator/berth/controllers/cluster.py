"""Nodes, pools and other pods' host ports: watch events into the ClusterCache.

Low-level event handlers only; the start-up handler fills the cache with
LISTs before any of these runs (see berth.cluster for why not kopf indexes).
"""

from __future__ import annotations

from typing import Any

import kopf

from berth.cluster import is_berths
from berth.controllers.runtime import Runtime
from berth.names import GROUP


@kopf.on.event("nodes")
def node_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    runtime.cluster.observe_node(type, body)


@kopf.on.event(GROUP, "nodeportpools")
def pool_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    runtime.cluster.observe_pool(type, body)


def _not_berths(body: kopf.Body, **_: Any) -> bool:
    return not is_berths(body)


@kopf.on.event("pods", when=_not_berths)
def foreign_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Ports other pods already claim on their node: Berth must not hand them out."""
    runtime: Runtime = memo["runtime"]
    runtime.cluster.observe_pod(type, body)
