"""Operator start-up and shutdown: settings chosen on purpose, runtime built once."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from berth.api import InferenceDeployment
from berth.config import OperatorConfig
from berth.controllers import pods
from berth.credentials import connection_info
from berth.kube import Kube, KubeApi
from berth.leadership import FencedKube, Leadership
from berth.names import FINALIZER, GROUP
from berth.runtime import Runtime
from berth.standby import WarmView

log = logging.getLogger("berth.startup")
KIND: str = InferenceDeployment.model_fields["kind"].default


class DeploymentsDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the body) for every event of
    every kind; only InferenceDeployments have handlers that read one, so
    other kinds' events skip it (it was 8 % of the CPU with 10,000 pods)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        if body.get("kind") != KIND:
            return {}
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return super().fetch(body=body) if body.get("kind") == KIND else None


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    # The same credentials as our own client: in-cluster, else kubeconfig.
    return await connection_info()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = OperatorConfig.from_env()
    # Our own prefix for kopf's bookkeeping on InferenceDeployments, never kopf's.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DeploymentsDiffBase(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events only for warnings from kopf itself; Berth posts its own Events.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "berth"
    # Reconnect watches well before load balancers drop idle streams.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # The start-up burst sets the heap's size for good: pymalloc never gives
    # back an arena that a long-lived object still touches. kopf lists every
    # object in one response unless told to page, and keeps each object's
    # worker (holding its last body) alive for 5 s after its last event, so
    # all the bodies of a restart were alive at once (when kopf still watched
    # pods: after a restart with 3,000 pods, RSS 148 MB instead of 203 MB,
    # docs/scaling.md). It still lists nodes and InferenceDeployments.
    settings.watching.chunk_size = 500
    settings.queueing.idle_timeout = 0.5
    # Our CRDs are installed before the operator: no CRD watch, no RBAC on CRDs.
    settings.scanning.disabled = True
    # Failed handlers retry quickly at first: allocation is latency-sensitive.
    settings.networking.error_backoffs = (0.5, 1, 2, 5, 10)
    client: KubeApi = await Kube.connect()
    leadership: Leadership | None = memo.get("leadership")
    if leadership is not None:
        # Elected (python -m berth): no write once the Lease may be someone else's.
        client = FencedKube(client, leadership)
    # A standby's view, filled and kept current while it waited (berth.standby).
    warm: WarmView | None = memo.get("warm")
    view, listed = await warm.hand_over() if warm is not None else (None, None)
    runtime = Runtime.build(config, client, view)
    # kopf starts no watch before start-up handlers finish.
    await runtime.start(functools.partial(pods.pod_event, runtime), listed)
    memo["runtime"] = runtime
    log.info(
        "berth started: ledgers in namespace %s, default pool %s",
        config.namespace,
        ",".join(map(str, config.default_ranges)),
    )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.close()
