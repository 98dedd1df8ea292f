"""Kubernetes Events, posted with Berth's own client.

kopf.event() only works inside kopf's handler context; Berth also reports
from background work (coalesced reconciles, sweeps), so it posts directly.
An Event that cannot be posted (namespace terminating, API hiccup) is logged
and dropped: Events are hints, never state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from berth import kube
from berth.kube import KubeApi, KubeError

log = logging.getLogger("berth.events")
COMPONENT = "berth"


class EventSink(Protocol):
    """Posts an Event about ``body``; never fails its caller."""

    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


class EventPoster:
    def __init__(self, client: KubeApi) -> None:
        self._client = client
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        """Fire and forget: callers never wait on, or fail because of, an Event."""
        task = asyncio.create_task(self.post(body, type=type, reason=reason, message=message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def post(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", "v1"),
                "kind": body.get("kind", "Pod"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._client.create(kube.path("events", namespace=meta["namespace"]), event)
        except (TimeoutError, KubeError, OSError) as error:
            log.info(
                "event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], error
            )
