"""Operator start-up and shutdown: settings chosen on purpose, runtime built once."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from prometheus_client import start_http_server

from berth.config import OperatorConfig
from berth.kube import Kube
from berth.names import FINALIZER, GROUP
from berth.runtime import Runtime

log = logging.getLogger("berth.startup")


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The same credentials as our own client: in-cluster, else kubeconfig.
    return await kopf.login_via_async_client(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = OperatorConfig.from_env()
    # Our own prefix for kopf's bookkeeping on InferenceDeployments, never kopf's.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events only for warnings from kopf itself; Berth posts its own Events.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "berth"
    # Reconnect watches well before load balancers drop idle streams.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Our CRDs are installed before the operator: no CRD watch, no RBAC on CRDs.
    settings.scanning.disabled = True
    # Failed handlers retry quickly at first: allocation is latency-sensitive.
    settings.networking.error_backoffs = (0.5, 1, 2, 5, 10)
    client = await Kube.connect()
    runtime = Runtime.build(config, client)
    start_http_server(config.metrics_port)
    # kopf starts no watch before start-up handlers finish.
    await runtime.start()
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
