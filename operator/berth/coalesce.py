"""Run a keyed async job at most once at a time, folding bursts of requests.

Fifty pod events for one deployment within a few milliseconds become one or
two reconciles of it, so the port map and status cost a few writes per
burst rather than one each per pod.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger("berth.coalesce")


class Coalescer(Generic[K]):
    def __init__(self, job: Callable[[K], Awaitable[None]], delay: float = 0.2) -> None:
        self._job = job
        self._delay = delay
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._again: set[K] = set()

    def request(self, key: K) -> None:
        """Ask for a run soon; joins a pending run or queues one after the current."""
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.create_task(self._run(key))
        else:
            self._again.add(key)

    async def _run(self, key: K) -> None:
        try:
            while True:
                await asyncio.sleep(self._delay)
                self._again.discard(key)
                try:
                    await self._job(key)
                except Exception:
                    log.exception("job for %s failed; it runs again on the next request", key)
                if key not in self._again:
                    return
        finally:
            self._tasks.pop(key, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
