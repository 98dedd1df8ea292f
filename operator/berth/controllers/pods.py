"""Pods: allocate when one of Berth's is bound, release when it is gone or
finished; note the host ports every other pod claims.

Called by berth.watch, which watches every pod from the start-up LIST on
(not kopf: see there why), one event of a pod at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from berth import metrics
from berth.capacity import declares_host_ports
from berth.names import LABEL_DEPLOYMENT
from berth.pods import is_berths, is_terminated
from berth.runtime import Runtime


async def pod_event(runtime: Runtime, type: str, body: Mapping[str, Any]) -> None:
    if not is_berths(body):
        await foreign_pod_event(runtime, type, body)
    elif runtime.serves(body["metadata"]["namespace"]):
        await berth_pod_event(runtime, type, body)


async def berth_pod_event(runtime: Runtime, type: str, body: Mapping[str, Any]) -> None:
    metrics.POD_EVENTS.inc()
    pod = dict(body)
    meta = pod["metadata"]
    runtime.view.observe_pod(type, pod)
    runtime.allocation.observed(pod)
    if type == "DELETED":
        await runtime.allocation.release(pod, reason="pod deleted")
    elif is_terminated(pod):
        await runtime.allocation.release(pod, reason=f"pod {pod['status']['phase']}")
    elif pod["spec"].get("nodeName") and not meta.get("deletionTimestamp"):
        await runtime.allocation.ensure_allocated(pod)
        await runtime.allocation.wake_followers(pod)
    if pod["spec"].get("nodeName"):  # in the background, and rarely a write
        runtime.capacity.ledger_changed(pod["spec"]["nodeName"])
    # Let the owner recreate, scale and report (coalesced per deployment).
    runtime.refresh(meta["namespace"], meta["labels"][LABEL_DEPLOYMENT])


async def foreign_pod_event(runtime: Runtime, type: str, body: Mapping[str, Any]) -> None:
    """Ports other pods claim on their node: never handed out, reported if already held,
    and not advertised."""
    node = runtime.view.observe_pod(type, body)
    if node is not None:
        runtime.repairer.check_foreign(node)
    bound = body.get("spec", {}).get("nodeName")
    if bound and declares_host_ports(body):  # claimed, changed or given back
        await runtime.capacity.refresh(bound)
