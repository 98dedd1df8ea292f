"""Berth's pods: allocate when one is bound, release when it is gone or finished.

Low-level event handlers, not @kopf.on.create/update: those would write
progress annotations, finalizers and an extra PATCH into every pod.
"""

from __future__ import annotations

from typing import Any

import kopf

from berth import metrics
from berth.names import LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from berth.pods import awaits_ports, is_terminated
from berth.runtime import Runtime


@kopf.on.event("pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: kopf.PRESENT})
async def berth_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    metrics.POD_EVENTS.inc()
    pod = dict(body)
    meta = pod["metadata"]
    if runtime.view.replayed(pod) and type != "DELETED" and not awaits_ports(pod):
        return  # start-up's LIST and repair saw this revision: nothing to do
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
