"""InferenceDeployment handlers: every change becomes one idempotent reconcile."""

from __future__ import annotations

from typing import Any

import kopf

from berth.names import GROUP
from berth.runtime import Runtime


@kopf.on.resume(GROUP, "inferencedeployments")
@kopf.on.create(GROUP, "inferencedeployments")
@kopf.on.update(GROUP, "inferencedeployments", field="spec")
async def reconcile_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    await runtime.reconciler.reconcile(dict(body))
