"""Where the API server is and how Berth proves who it is.

The pod's service account, else the kubeconfig, read by kopf's own
readers; kopf's login and Berth's client share what they find. The
generated client libraries would cost the operator some 40 MB of RSS
only to read credentials, so they are imported in one case alone: a
kubeconfig user that runs an exec plugin or an auth provider (a laptop
against a cloud cluster), which kopf's readers do not handle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import kopf

log = logging.getLogger("berth.credentials")

TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
#: Projected service account tokens rotate; the kubelet rewrites the file.
TOKEN_REREAD_SECONDS = 60.0


async def connection_info() -> kopf.ConnectionInfo:
    """The API server and credentials: in a pod, its service account."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings)
    if info is not None:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT"),
        )
        if host and port:  # no cluster DNS needed
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
            info = dataclasses.replace(info, server=server)
        return info
    info = kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig (KUBECONFIG or ~/.kube/config)")
    if info.token or info.certificate_path or info.certificate_data or info.username:
        return info
    log.info("kubeconfig user without a token or certificate: asking the client library")
    for library in ("kubernetes", "kubernetes_asyncio"):  # see berth.__main__
        if library in sys.modules and sys.modules[library] is None:
            del sys.modules[library]
    found = await kopf.login_via_async_client(logger=log, settings=settings)
    if found is None:
        raise kopf.LoginError("the kubeconfig's user has no credentials Berth can use")
    return found


class Token:
    """The bearer token of ``info``, re-read from the service account's file
    (when that is where it came from) once a minute."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        # connection_info() takes the service account whenever its token exists.
        self._file = TOKEN_FILE if info.token and TOKEN_FILE.exists() else None
        self._read_at = time.monotonic()

    def headers(self) -> dict[str, str]:
        if self._file is not None and time.monotonic() - self._read_at > TOKEN_REREAD_SECONDS:
            self._read_at = time.monotonic()
            try:
                token = self._file.read_text().strip()
            except OSError as error:
                log.warning("service account token not re-read: %s", error)
            else:
                self._info = dataclasses.replace(self._info, token=token)
        return self._info.as_http_headers()
