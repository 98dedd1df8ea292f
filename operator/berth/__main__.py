"""``python -m berth``: run the operator (what the container image runs).

With ``BERTH_LEADER_ELECTION=true`` (the chart's setting) the process first
waits as a warm standby: imported, connected, answering its health probe,
watching the Lease. Only once it holds the Lease does kopf start, so no
handler runs and no port is handed out before then (berth.leadership).
"""

# ruff: noqa: E402  (the client libraries are hidden before kopf is imported)
from __future__ import annotations

import sys

# kopf imports the generated Kubernetes clients whenever they are installed,
# only to recognise their model objects, which Berth never hands it: in this
# process they would hold some 40 MB. berth.credentials brings them back in
# the one case that needs them.
for _library in ("kubernetes", "kubernetes_asyncio"):
    if _library not in sys.modules:  # None there makes `import` raise ImportError
        sys.modules[_library] = None  # type: ignore[assignment]

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import kopf
from aiohttp import web
from prometheus_client import start_http_server

import berth.controllers  # noqa: F401  (registers the handlers)
from berth.config import OperatorConfig
from berth.kube import Kube, KubeError
from berth.leadership import Leadership, abdicate
from berth.logs import configure_logging
from berth.standby import WarmView

log = logging.getLogger("berth.main")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m berth", description=__doc__)
    parser.add_argument(
        "--liveness",
        default=os.environ.get("BERTH_LIVENESS", ""),
        help="health endpoint, e.g. http://0.0.0.0:8081/healthz (kopf's once active)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logs (BERTH_LOG_LEVEL=debug)")
    args = parser.parse_args()
    config = OperatorConfig.from_env()
    configure_logging("debug" if args.verbose else config.log_level, config.log_format)
    # Every replica serves metrics (berth_leader says which one acts).
    start_http_server(config.metrics_port)
    asyncio.run(run(config, args.liveness))


async def run(config: OperatorConfig, liveness: str) -> None:
    if not config.leader_election:
        await operate(config, liveness, kopf.Memo())
        return
    client = await Kube.connect()
    leadership = Leadership(client, config.namespace, config.lease)
    warm: WarmView | None = None
    try:
        async with serve_health(liveness):
            warm = await _filled(WarmView(config, client))
            await leadership.acquire()
        leadership.stop_if_resumed_late()
        keeper = asyncio.create_task(leadership.keep())
        keeper.add_done_callback(_lost)
        try:
            await operate(config, liveness, kopf.Memo(leadership=leadership, warm=warm))
        finally:
            keeper.remove_done_callback(_lost)
            keeper.cancel()
            await leadership.release()
    finally:
        if warm is not None:
            await warm.close()
        await client.close()


async def _filled(warm: WarmView) -> WarmView | None:
    """The standby's view, listed while it waits; None if that failed (the
    leader lists at start-up then, as without election)."""
    try:
        await warm.start()
    except (KubeError, aiohttp.ClientError, TimeoutError) as error:
        log.warning("standby: no view kept (%s); taking over will list every pod", error)
        await warm.close()
        return None
    return warm


def _lost(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        abdicate(f"lost the lease: {task.exception()}")


async def operate(config: OperatorConfig, liveness: str, memo: kopf.Memo) -> None:
    namespaces = config.watch_namespaces
    await kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        # One operator acts at a time by the Lease (or by hand), not by kopf peering.
        standalone=True,
        liveness_endpoint=liveness or None,
        memo=memo,
    )


@contextlib.asynccontextmanager
async def serve_health(endpoint: str) -> AsyncIterator[None]:
    """The standby's own answer on the health endpoint, until kopf's takes over:
    a waiting replica is healthy, and restarting it would only make it cold."""
    if not endpoint:
        yield
        return
    url = urlsplit(endpoint)

    async def healthy(_: web.Request) -> web.Response:
        return web.json_response({"standby": True})

    app = web.Application()
    app.router.add_get(url.path or "/", healthy)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, url.hostname, url.port).start()
    try:
        yield
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
