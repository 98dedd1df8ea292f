"""``python -m berth.agent``: run the node agent (the DaemonSet's container)."""

from __future__ import annotations

import asyncio
import signal

from berth.agent.agent import Agent, AgentConfig
from berth.kube import Kube
from berth.logs import configure_logging


async def serve(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A DaemonSet delete (or uninstall) sends SIGTERM: the reservation is taken back.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await Kube.connect()
    try:
        await Agent(config, client).run(stop)
    finally:
        await client.close()


def main() -> None:
    config = AgentConfig.from_env()
    configure_logging(config.log_level, config.log_format)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
