"""Pod events: allocate when a Berth pod is bound, release when it is gone.

Low-level event handlers, not @kopf.on.create/update: those would write
progress annotations, finalizers and an extra PATCH into every pod.
"""

from __future__ import annotations

from typing import Any

import kopf

from berth import metrics
from berth.controllers.runtime import Runtime
from berth.names import LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from berth.ports import is_terminated


@kopf.on.event("pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: kopf.PRESENT})
async def berth_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    metrics.POD_EVENTS.inc()
    runtime.cluster.observe_pod(type, body)  # what reconciles read
    pod = dict(body)
    meta = pod["metadata"]
    if type == "DELETED":
        await runtime.ports.release(pod, reason="pod deleted")
    elif is_terminated(pod):
        await runtime.ports.release(pod, reason=f"pod {pod['status']['phase']}")
    elif pod["spec"].get("nodeName") and not meta.get("deletionTimestamp"):
        await runtime.ports.ensure_allocated(pod)
    # Let the owner recreate, scale and report (coalesced per deployment).
    runtime.refresh(meta["namespace"], meta["labels"][LABEL_DEPLOYMENT])
