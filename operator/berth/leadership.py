"""Leader election on a ``coordination.k8s.io/v1`` Lease: one replica acts, the others wait.

The rules are client-go's leaderelection, written against our own client:

* every write to the Lease is a compare-and-swap on its ``resourceVersion``,
  so two candidates never both take it;
* a standby takes a held Lease only after watching it stay unchanged for the
  holder's ``leaseDurationSeconds`` by its own monotonic clock (no trust in
  the holder's wall clock), or at once when the holder released it;
* the holder renews every ``renew_period`` and stops acting once
  ``renew_deadline`` (< duration) has passed since its last successful
  renewal *began*, so it has stopped before any standby can hold the Lease.

Stopping means leaving the process (:func:`abdicate`): a replica that lost
the Lease has a stale view and may have writes in flight, and a fresh start
as a standby is the one state that is sure to be right. Three paths lead
there: the renew loop (API unreachable, Lease taken), a SIGCONT after the
process was paused past its deadline (checked in the signal handler, before
the event loop runs anything), and :class:`FencedKube`, which refuses every
write of an operator whose deadline passed. Ledger CAS (I5) stays the safety
net under all of this: two replicas that both act never share a port.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from types import FrameType
from typing import NoReturn

import aiohttp
from prometheus_client import Gauge

from berth.config import LeaseTimings
from berth.kube import Body, KubeApi, KubeError, Versions, path

log = logging.getLogger("berth.leadership")

LEADER = Gauge("berth_leader", "1 while this replica holds the leader Lease and acts")

#: What a failed Lease call can raise: the API's answer, or no answer at all.
TRANSIENT = (KubeError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class LostLease(Exception):
    """This replica no longer holds the Lease (taken, or not renewed in time)."""


def micro_time(epoch: float) -> str:
    """A Lease MicroTime: RFC 3339 in UTC with microseconds."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def describe(error: BaseException) -> str:
    """The API's own words (RBAC refusals are matched on them), else the type."""
    return str(error) or type(error).__name__


def abdicate(reason: str) -> NoReturn:
    """Leave now: no handler may finish, no write may start after this."""
    LEADER.set(0)
    log.critical("leaving the process: %s", reason)
    for stream in (sys.stdout, sys.stderr):  # the audit lines already written
        stream.flush()
    os._exit(1)


class Leadership:
    """One candidate for one Lease."""

    def __init__(
        self,
        client: KubeApi,
        namespace: str,
        timings: LeaseTimings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.timings = timings
        self._client = client
        self._collection = path("leases", namespace=namespace, group="coordination.k8s.io")
        self._url = path(
            "leases", namespace=namespace, name=timings.name, group="coordination.k8s.io"
        )
        self._clock = clock
        self._wall = wall
        self._lease: Body | None = None  # the last version we wrote, while we hold it
        self._valid_until = -math.inf  # monotonic; we act only before this
        self._seen: tuple[str, float] = ("", 0.0)  # resourceVersion, when it first showed
        self._said = ""  # the last standby message logged (logged once per change)

    @property
    def identity(self) -> str:
        return self.timings.identity

    def held(self) -> bool:
        """True while this replica may act: it renewed within the deadline."""
        return self._clock() < self._valid_until

    # -- standby ----------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        while not await self.try_acquire():  # noqa: ASYNC110 (polling the API, not a flag)
            await asyncio.sleep(self.timings.retry_period)
        self._say(f"leader: holding lease {self.timings.name} as {self.identity}")

    async def try_acquire(self) -> bool:
        """One attempt: True when the Lease is now ours."""
        started = self._clock()
        try:
            lease = await self._client.get_or_none(self._url)
            if lease is None:
                return self._won(await self._client.create(self._collection, self._new()), started)
            holder = lease.get("spec", {}).get("holderIdentity") or ""
            if holder != self.identity and not self._expired(lease, started):
                self._say(f"standby: lease held by {holder}")
                return False
            return self._won(await self._client.replace(self._url, self._taken(lease)), started)
        except KubeError as error:
            if error.conflict:  # another candidate wrote first
                return False
            self._say(f"standby: lease call failed: {error}")
            return False
        except TRANSIENT as error:
            self._say(f"standby: lease call failed: {describe(error)}")
            return False

    def _expired(self, lease: Body, now: float) -> bool:
        """Unchanged for the holder's own duration since we first saw this version."""
        version = lease["metadata"]["resourceVersion"]
        if version != self._seen[0]:
            self._seen = (version, now)
        spec = lease.get("spec", {})
        if not spec.get("holderIdentity"):
            return True  # released
        duration = float(spec.get("leaseDurationSeconds") or self.timings.duration)
        return now >= self._seen[1] + duration

    def _spec(self, transitions: int) -> Body:
        now = micro_time(self._wall())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.timings.duration),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _new(self) -> Body:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.timings.name,
                "labels": {"app.kubernetes.io/managed-by": "berth"},
            },
            "spec": self._spec(0),
        }

    def _taken(self, lease: Body) -> Body:
        body = copy.deepcopy(lease)
        spec = body.get("spec", {})
        if spec.get("holderIdentity") == self.identity:
            # Ours already (a restart in the same pod): keep the history as is.
            spec.update(renewTime=micro_time(self._wall()))
        else:
            spec = self._spec(int(spec.get("leaseTransitions") or 0) + 1)
        body["spec"] = spec
        return body  # metadata.resourceVersion rides along: the write is a CAS

    def _won(self, lease: Body, started: float) -> bool:
        self._lease = lease
        self._valid_until = started + self.timings.renew_deadline
        LEADER.set(1)
        return True

    def _say(self, message: str) -> None:
        if message != self._said:
            self._said = message
            log.info("%s", message)

    # -- holder -----------------------------------------------------------------

    async def renew(self) -> None:
        """One renewal (CAS on the version we last wrote); LostLease if taken."""
        assert self._lease is not None, "renew() before acquire()"
        started = self._clock()
        body = copy.deepcopy(self._lease)
        body["spec"]["renewTime"] = micro_time(self._wall())
        try:
            self._won(await self._client.replace(self._url, body), started)
        except KubeError as error:
            if not error.conflict:
                raise
            current = await self._client.get_or_none(self._url)
            holder = (current or {}).get("spec", {}).get("holderIdentity")
            if current is None or holder != self.identity:
                raise LostLease(f"lease taken by {holder or 'nobody'}") from error
            self._lease = current  # someone else touched it (labels?): retry on it
            raise

    async def keep(self) -> None:
        """Renew until the Lease is lost; raises LostLease, never returns."""
        while True:
            await asyncio.sleep(self.timings.renew_period)
            while not await self._renewed():  # noqa: ASYNC110 (as above)
                await asyncio.sleep(min(self.timings.retry_period, max(self._left(), 0.0)))

    async def _renewed(self) -> bool:
        """One renewal attempt, cut off at the deadline; LostLease past it."""
        left = self._left()
        if left <= 0:
            raise LostLease(f"not renewed within {self.timings.renew_deadline:g} s")
        try:
            await asyncio.wait_for(self.renew(), left)
        except LostLease:
            raise
        except TRANSIENT as error:
            log.warning("lease renewal failed (%.1f s left): %s", self._left(), describe(error))
            return False
        return True

    def _left(self) -> float:
        return self._valid_until - self._clock()

    async def release(self) -> None:
        """Hand the Lease over at once (graceful stop): standbys need not wait it out."""
        if self._lease is None or not self.held():
            return
        body = copy.deepcopy(self._lease)
        body["spec"].update(
            holderIdentity=None, leaseDurationSeconds=1, renewTime=micro_time(self._wall())
        )
        self._valid_until = -math.inf
        LEADER.set(0)
        try:
            await self._client.replace(self._url, body)
            log.info("released the lease")
        except TRANSIENT as error:
            log.warning("could not release the lease (it will expire): %s", error)

    def stop_if_resumed_late(self) -> None:
        """Install a SIGCONT handler: a process paused past its deadline leaves
        before its event loop runs another step."""

        def resumed(_signum: int, _frame: FrameType | None) -> None:
            if self._lease is not None and not self.held():
                abdicate("resumed after the lease deadline: another replica may be acting")

        signal.signal(signal.SIGCONT, resumed)


class FencedKube:
    """The API client for an elected operator: every write first checks that
    this replica still holds the Lease, and leaves the process if it does not."""

    def __init__(self, client: KubeApi, leadership: Leadership) -> None:
        self._client = client
        self._leadership = leadership

    def _check(self, verb: str, url: str) -> None:
        if not self._leadership.held():
            abdicate(f"{verb} {url} refused: this replica no longer holds the lease")

    async def get_or_none(self, url: str) -> Body | None:
        return await self._client.get_or_none(url)

    async def list(self, url: str, label_selector: str | None = None) -> list[Body]:
        return await self._client.list(url, label_selector)

    def iterate(
        self, url: str, label_selector: str | None = None, *, versions: Versions | None = None
    ) -> AsyncIterator[Body]:
        return self._client.iterate(url, label_selector, versions=versions)

    def watch(self, url: str, resource_version: str) -> AsyncIterator[Body]:
        return self._client.watch(url, resource_version)

    async def create(self, url: str, body: Body) -> Body:
        self._check("POST", url)
        return await self._client.create(url, body)

    async def replace(self, url: str, body: Body) -> Body:
        self._check("PUT", url)
        return await self._client.replace(url, body)

    async def merge_patch(self, url: str, patch: Body) -> Body:
        self._check("PATCH", url)
        return await self._client.merge_patch(url, patch)

    async def delete(self, url: str, body: Body | None = None) -> bool:
        self._check("DELETE", url)
        return await self._client.delete(url, body)

    async def close(self) -> None:
        await self._client.close()
