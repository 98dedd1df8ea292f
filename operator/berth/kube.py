"""A thin async JSON client for the Kubernetes API.

Berth speaks plain dicts everywhere (kopf hands us dicts too), so it skips the
generated model classes: their (de)serialisation costs more than the HTTP
round trip on the allocation hot path. Credentials come from
``berth.credentials`` (the service account or the kubeconfig).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import kopf
from pydantic_core import from_json

from berth import metrics
from berth.credentials import Token, connection_info

Body = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """A non-2xx answer from the API server, with its Status message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def gone(self) -> bool:
        """The object or its namespace no longer exists, or is being deleted."""
        return self.status == 404 or (self.status == 403 and "being terminated" in self.message)

    @property
    def expired(self) -> bool:
        """410: a watch's or a LIST's resourceVersion is too old to resume from."""
        return self.status == 410

    @property
    def conflict(self) -> bool:
        """409: a stale resourceVersion or a name already taken."""
        return self.status == 409


def failure(response: aiohttp.ClientResponse, payload: bytes) -> KubeError:
    """The error a non-2xx response stands for, with its Status message when it has one."""
    try:
        status = json.loads(payload)
        return KubeError(response.status, status.get("reason", ""), status.get("message", ""))
    except ValueError:
        return KubeError(response.status, response.reason or "", payload.decode(errors="replace"))


def path(
    resource: str,
    *,
    namespace: str | None = None,
    name: str | None = None,
    group: str = "",
    version: str = "v1",
    subresource: str | None = None,
) -> str:
    """The REST path of a resource collection or object."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(resource)
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def resource_of(url: str) -> str:
    """``configmaps``, ``pods/status``, ...: what a REST path addresses."""
    segments = url.partition("?")[0].strip("/").split("/")
    rest = segments[2:] if segments[0] == "api" else segments[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    return "/".join(rest[:1] + rest[2:3])


#: Where a LIST puts its resourceVersion (``list`` names a method in the classes).
Versions = list[str]


class KubeApi(Protocol):
    """The calls Berth's services make; :class:`Kube` speaks them to an API server,
    the unit tests' fake keeps objects in a dict."""

    async def get_or_none(self, url: str) -> Body | None: ...
    async def list(self, url: str, label_selector: str | None = None) -> list[Body]: ...
    def iterate(
        self, url: str, label_selector: str | None = None, *, versions: Versions | None = None
    ) -> AsyncIterator[Body]: ...
    def watch(self, url: str, resource_version: str) -> AsyncIterator[Body]: ...
    async def create(self, url: str, body: Body) -> Body: ...
    async def replace(self, url: str, body: Body) -> Body: ...
    async def merge_patch(self, url: str, patch: Body) -> Body: ...
    async def delete(self, url: str, body: Body | None = None) -> bool: ...
    async def close(self) -> None: ...


#: Seconds a watch request lasts before the server ends it (and it is renewed).
WATCH_SECONDS = 300
#: Requests in flight at once: the API server's latency, not Berth's CPU,
#: bounds allocation throughput, so several run at a time.
CONNECTIONS = 64


class Kube:
    """One aiohttp session against one API server."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._token = Token(info)
        self._session = aiohttp.ClientSession(
            base_url=info.server,
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=CONNECTIONS),
            # No deadline on the wait for a free connection: under a burst,
            # requests queue there, and failing them would only retry them.
            # A server that stops answering is caught on the socket.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30),
        )

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig."""
        return cls(await connection_info())

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Body | list[Body] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Body:
        metrics.API_REQUESTS.labels(method, resource_of(url)).inc()
        headers = {
            "Accept": "application/json",
            "Content-Type": content_type,
            **self._token.headers(),
        }
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        async with self._session.request(
            method, url, data=data, params=params, headers=headers
        ) as response:
            payload = await response.read()
            if response.status >= 400:
                raise failure(response, payload)
            # pydantic's Rust parser: 2-3x json's speed on a page of pods, and
            # the event loop stands still while a page is parsed.
            result: Body = from_json(payload) if payload else {}
            return result

    async def get(self, url: str, params: Mapping[str, str] | None = None) -> Body:
        return await self.request("GET", url, params=params)

    async def get_or_none(self, url: str) -> Body | None:
        try:
            return await self.get(url)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def list(self, url: str, label_selector: str | None = None) -> list[Body]:
        """Every item of a collection, following continue tokens."""
        return [item async for item in self.iterate(url, label_selector)]

    async def iterate(
        self, url: str, label_selector: str | None = None, *, versions: Versions | None = None
    ) -> AsyncIterator[Body]:
        """Every item of a collection, a page at a time: parsing a page of 250
        pods holds the event loop some 40 ms. ``versions`` gets the LIST's
        resourceVersion, where a watch can take over."""
        params: dict[str, str] = {"limit": "250"}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            page = await self.get(url, params)
            if versions is not None and "continue" not in params:
                versions.append(page["metadata"]["resourceVersion"])
            for item in page.get("items", []):
                yield item
            token = page.get("metadata", {}).get("continue")
            if not token:
                return
            params["continue"] = token

    async def watch(self, url: str, resource_version: str) -> AsyncIterator[Body]:
        """Watch events after ``resource_version`` (bookmarks included) until the
        server ends the stream; an ERROR event (410: too old) raises KubeError."""
        metrics.API_REQUESTS.labels("WATCH", resource_of(url)).inc()
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        headers = {"Accept": "application/json", **self._token.headers()}
        # Quiet streams are normal: the server sends a bookmark about once a minute.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30)
        async with self._session.get(
            url, params=params, headers=headers, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise failure(response, await response.read())
            pending = b""
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event: Body = from_json(line)
                    if event["type"] == "ERROR":
                        status = event["object"]
                        raise KubeError(
                            status.get("code", 500),
                            status.get("reason", ""),
                            status.get("message", ""),
                        )
                    yield event

    async def create(self, url: str, body: Body) -> Body:
        return await self.request("POST", url, body=body)

    async def replace(self, url: str, body: Body) -> Body:
        return await self.request("PUT", url, body=body)

    async def merge_patch(self, url: str, patch: Body) -> Body:
        return await self.request("PATCH", url, body=patch, content_type=MERGE_PATCH)

    async def delete(self, url: str, body: Body | None = None) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self.request("DELETE", url, body=body)
        except KubeError as error:
            if error.not_found:
                return False
            raise
        return True
