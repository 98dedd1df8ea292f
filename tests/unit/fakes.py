"""An in-memory stand-in for the API server, for unit tests of the services.

It keeps objects by REST path and mimics what the services rely on: 409 on
a taken name or a stale resourceVersion, 404 on a missing object, merge
patches, uid preconditions on delete, label selectors on lists. The
integration tests hold the services to the real API server.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

from berth.kube import KubeError

Body = dict[str, Any]


def _merge(target: Body, patch: Mapping[str, Any]) -> Body:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, Body] = {}
        self.writes: list[tuple[str, str]] = []
        self._versions = itertools.count(1)
        #: What watch() hands out, in order: events, or an exception to raise.
        self.events: list[Body | BaseException] = []

    def put(self, url: str, body: Body) -> Body:
        """Store an object as if someone else had created it."""
        stored = copy.deepcopy(body)
        meta = stored.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._versions)}")
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[f"{url}/{meta['name']}"] = stored
        return copy.deepcopy(stored)

    def at(self, url: str) -> Body | None:
        return copy.deepcopy(self.objects.get(url))

    async def get_or_none(self, url: str) -> Body | None:
        return self.at(url)

    async def list(self, url: str, label_selector: str | None = None) -> list[Body]:
        wanted = dict(p.split("=", 1) for p in (label_selector or "").split(",") if p)
        found = []
        for key, body in sorted(self.objects.items()):
            head, _, _ = key.rpartition("/")
            labels = body["metadata"].get("labels") or {}
            if head == url and all(labels.get(k) == v for k, v in wanted.items()):
                found.append(copy.deepcopy(body))
        return found

    async def iterate(
        self, url: str, label_selector: str | None = None, *, versions: list[str] | None = None
    ) -> AsyncIterator[Body]:
        if versions is not None:
            versions.append(str(next(self._versions)))
        for body in await self.list(url, label_selector):
            yield body

    async def watch(self, url: str, resource_version: str) -> AsyncIterator[Body]:
        """The events queued in ``self.events`` (a test's script of the server)."""
        while self.events:
            event = self.events.pop(0)
            if isinstance(event, BaseException):
                raise event
            yield event
            await asyncio.sleep(0)  # events arrive apart, as from a socket
        await asyncio.Event().wait()  # a quiet stream, until cancelled

    async def create(self, url: str, body: Body) -> Body:
        self.writes.append(("create", url))
        if f"{url}/{body['metadata']['name']}" in self.objects:
            raise KubeError(409, "AlreadyExists", f"{body['metadata']['name']} already exists")
        return self.put(url, body)

    async def replace(self, url: str, body: Body) -> Body:
        self.writes.append(("replace", url))
        current = self.objects.get(url)
        if current is None:
            raise KubeError(404, "NotFound", url)
        version = body["metadata"].get("resourceVersion")
        if version is not None and version != current["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified")
        stored = copy.deepcopy(body)
        stored["metadata"]["uid"] = current["metadata"]["uid"]
        stored["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[url] = stored
        return copy.deepcopy(stored)

    async def merge_patch(self, url: str, patch: Body) -> Body:
        self.writes.append(("patch", url))
        target = url.removesuffix("/status")
        current = self.objects.get(target)
        if current is None:
            raise KubeError(404, "NotFound", url)
        _merge(current, patch)
        current["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(current)

    async def delete(self, url: str, body: Body | None = None) -> bool:
        self.writes.append(("delete", url))
        current = self.objects.get(url)
        if current is None:
            return False
        uid = ((body or {}).get("preconditions") or {}).get("uid")
        if uid is not None and uid != current["metadata"]["uid"]:
            raise KubeError(409, "Conflict", "uid precondition failed")
        del self.objects[url]
        return True

    async def close(self) -> None:
        return None


class Events:
    """Collects what the services would post as Events."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        self.posted.append((body["metadata"]["name"], reason, message))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.posted]
