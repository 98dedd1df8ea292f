"""The agent's loop: read /proc, reserve the pool if allowed, publish on change.

Every ``interval`` seconds it reads the node; the report is written only
when its data differ from what was last written (so an idle node costs no
write), with compare-and-swap on the resourceVersion like the ledgers. The
node's pool (for the reservation) is re-read every ``pool_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from berth import kube
from berth.agent.procfs import ProcFS, merge, ranges_of
from berth.agent.report import NodeReport, report_body, report_configmap
from berth.agent.reservation import KernelReservation
from berth.allocator.ranges import PortRange
from berth.config import OperatorConfig
from berth.kube import KubeApi, KubeError
from berth.names import GROUP, VERSION
from berth.pods import is_managed
from berth.pools import Pool, choose_pool
from berth.view import pool_entry

log = logging.getLogger("berth.agent")
TRANSIENT = (KubeError, aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class AgentConfig:
    node: str
    namespace: str = "berth-system"
    proc: str = "/proc"
    interval: float = 5.0
    pool_interval: float = 60.0
    reserve: bool = False
    default_pool: Pool = OperatorConfig().default_pool
    log_level: str = "info"
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentConfig:
        env = dict(os.environ if env is None else env)
        node = env.get("BERTH_AGENT_NODE", "")
        if not node:
            raise SystemExit("BERTH_AGENT_NODE must name the node (downward API: spec.nodeName)")
        operator = OperatorConfig.from_env(env)
        return cls(
            node=node,
            namespace=operator.namespace,
            proc=env.get("BERTH_AGENT_PROC", cls.proc),
            interval=float(env.get("BERTH_AGENT_INTERVAL", cls.interval)),
            pool_interval=float(env.get("BERTH_AGENT_POOL_INTERVAL", cls.pool_interval)),
            reserve=env.get("BERTH_AGENT_RESERVE", "false").lower() == "true",
            default_pool=operator.default_pool,
            log_level=operator.log_level,
            log_format=operator.log_format,
        )


class NotOurs(Exception):
    """A ConfigMap of the report's name exists and Berth did not write it."""


class ReportWriter:
    """The node's report ConfigMap: written with CAS, and only when it changed."""

    def __init__(self, client: KubeApi, namespace: str, node: str) -> None:
        self._client = client
        self._namespace = namespace
        self._node = node
        self._version: str | None = None
        self._written: dict[str, str] | None = None
        self._owner: str | None = None
        self.writes = 0

    def _url(self, named: bool = True) -> str:
        name = report_configmap(self._node) if named else None
        return kube.path("configmaps", namespace=self._namespace, name=name)

    async def load(self) -> NodeReport | None:
        """The stored report (to resume from); raises NotOurs on a foreign ConfigMap."""
        body = await self._client.get_or_none(self._url())
        if body is None:
            self._version, self._written, self._owner = None, None, None
            return None
        if not is_managed(body):
            raise NotOurs(
                f"ConfigMap {self._namespace}/{report_configmap(self._node)} exists and Berth "
                "did not write it: the agent reports nothing until it is deleted or renamed"
            )
        self._version = body["metadata"]["resourceVersion"]
        self._written = dict(body.get("data") or {})
        owners = body["metadata"].get("ownerReferences") or ()
        self._owner = next((o.get("uid") for o in owners if o.get("kind") == "Node"), None)
        try:
            return NodeReport.decode(self._node, self._written)
        except ValueError:
            return None

    async def publish(self, report: NodeReport, node_uid: str | None) -> bool:
        """Write ``report`` unless it is what the object already says; True if written."""
        data = report.encode()
        # A report written before the Node could be read gets its owner later.
        node_uid = node_uid or self._owner
        while data != self._written or node_uid != self._owner:
            body = report_body(report, self._namespace, node_uid, self._version)
            try:
                if self._version is None:
                    saved = await self._client.create(self._url(named=False), body)
                else:
                    saved = await self._client.replace(self._url(), body)
            except KubeError as error:
                if not (error.conflict or error.not_found):
                    raise
                await self.load()  # someone else wrote or deleted it: start from theirs
                continue
            self._version = saved["metadata"]["resourceVersion"]
            self._written, self._owner = data, node_uid
            self.writes += 1
            log.info("report of node %s written: %s", self._node, data)
            return True
        return False


class Agent:
    def __init__(self, config: AgentConfig, client: KubeApi) -> None:
        self.config = config
        self.client = client
        self.proc = ProcFS(config.proc)
        self.writer = ReportWriter(client, config.namespace, config.node)
        self.reservation: KernelReservation | None = None
        self._node_uid: str | None = None
        self._pool: Pool | None = None
        self._pool_read = float("-inf")
        self.started = False

    async def start(self) -> None:
        """Resume from the stored report: what an earlier run reserved is ours."""
        earlier = await self.writer.load()
        if self.config.reserve:
            self.reservation = KernelReservation(
                self.proc, earlier.agent_reserved if earlier else ()
            )
        self.started = True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set, then take back the kernel reservation."""
        try:
            while not stop.is_set():
                try:
                    if not self.started:
                        await self.start()
                    await self.step()
                except TRANSIENT as error:
                    log.warning("node %s: report deferred: %s", self.config.node, error)
                except NotOurs as error:
                    log.error("%s", error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.interval)
        finally:
            await self.stop()

    async def step(self) -> bool:
        """One poll; True when the report was written."""
        now = asyncio.get_running_loop().time()
        if self._node_uid is None or now - self._pool_read >= self.config.pool_interval:
            await self._read_node()
            self._pool_read = now
        agent_reserved: tuple[PortRange, ...] = ()
        if self.reservation is not None and self._pool is not None:
            agent_reserved = self.reservation.apply(self._pool.ranges)
        return await self.writer.publish(self.observe(agent_reserved), self._node_uid)

    def observe(self, agent_reserved: tuple[PortRange, ...] = ()) -> NodeReport:
        listeners = self.proc.listeners()
        return NodeReport(
            self.config.node,
            self.proc.ephemeral_range(),
            merge(self.proc.reserved_ports()),
            agent_reserved,
            ranges_of(listeners.tcp),
            ranges_of(listeners.udp),
        )

    async def _read_node(self) -> None:
        node = await self.client.get_or_none(kube.path("nodes", name=self.config.node))
        if node is None:
            log.warning("node %s not found: its report has no owner yet", self.config.node)
            return
        self._node_uid = node["metadata"]["uid"]
        if self.config.reserve:
            url = kube.path("nodeportpools", group=GROUP, version=VERSION)
            entries = [pool_entry(item) for item in await self.client.list(url)]
            pools = [pool for pool in entries if pool is not None]
            labels = node["metadata"].get("labels") or {}
            self._pool = choose_pool(pools, labels, self.config.default_pool)

    async def stop(self) -> None:
        """Take back what the agent reserved, and say so in the report (best effort)."""
        if self.reservation is None or not self.reservation.added:
            return
        self.reservation.release()
        try:
            await self.writer.publish(self.observe(), self._node_uid)
        except TRANSIENT as error:
            log.warning("node %s: final report not written: %s", self.config.node, error)
