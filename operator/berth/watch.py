"""Every pod's events, from the start-up LIST on, as an informer delivers them.

Not kopf's pod watch: kopf lists every pod again when its watch starts and
runs its per-event machinery for each, which made a restart with 11,000
pods take 18 s after start-up had already listed and repaired them all.
Here the watch starts at the start-up LIST's resourceVersion, so nothing is
replayed. Each pod's events are handled in order and pods concurrently; a
pod whose events pile up while one is handled skips to the newest, since
handlers act on a pod's current state, not on the change. A watch too old
to resume (410 Gone) re-lists, and every pod the view knows that the LIST
lacks is handed over as deleted: no deletion is lost in a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from berth import kube
from berth.kube import KubeApi, KubeError

Body = Mapping[str, Any]
Handler = Callable[[str, Body], Awaitable[None]]
log = logging.getLogger("berth.watch")
#: Seconds before watching again after a failure (the API server restarting, say).
RETRY_SECONDS = 1.0


class PodWatch:
    def __init__(
        self,
        client: KubeApi,
        handle: Handler,
        known: Callable[[], Mapping[str, Body]],
    ) -> None:
        """``handle(event_type, pod)``; ``known()``: uid -> the pods the view
        holds, for the deletions a re-list finds."""
        self._client = client
        self._handle = handle
        self._known = known
        self._latest: dict[str, tuple[str, Body]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        #: The resourceVersion of the last event seen: where another watch resumes.
        self.version = ""

    def start(self, resource_version: str) -> None:
        self._task = asyncio.create_task(self.run(resource_version))

    async def stop(self) -> str:
        """Stop watching once the events seen are handled; returns ``version``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        return self.version

    async def run(self, resource_version: str) -> None:
        """Watch from ``resource_version`` until cancelled."""
        self.version = resource_version
        url = kube.path("pods")
        while True:
            try:
                async for event in self._client.watch(url, self.version):
                    body = event["object"]
                    self.version = body["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.deliver(event["type"], body)
            except KubeError as error:
                if not error.expired:
                    log.warning("pod watch failed: %s; watching again", error)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                log.info("pod watch too old to resume (%s): listing every pod again", error)
                self.version = await self.relist()
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("pod watch interrupted: %r; watching again", error)
                await asyncio.sleep(RETRY_SECONDS)

    async def relist(self) -> str:
        """Hand over every pod as modified and every vanished one as deleted."""
        versions: list[str] = []
        seen = set()
        async for pod in self._client.iterate(kube.path("pods"), versions=versions):
            seen.add(pod["metadata"]["uid"])
            self.deliver("MODIFIED", pod)
        for uid, gone in self._known().items():
            if uid not in seen:
                self.deliver("DELETED", gone)
        return versions[0]

    def deliver(self, event_type: str, pod: Body) -> None:
        uid = pod["metadata"]["uid"]
        self._latest[uid] = (event_type, pod)
        if uid not in self._running:
            self._running[uid] = asyncio.create_task(self._drain(uid))

    async def _drain(self, uid: str) -> None:
        try:
            while (latest := self._latest.pop(uid, None)) is not None:
                try:
                    await self._handle(*latest)
                except Exception:
                    log.exception("handling pod %s failed", uid)
        finally:
            del self._running[uid]

    async def close(self) -> None:
        """Stop at once, handlers too."""
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
