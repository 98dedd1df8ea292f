"""The services the handlers share, wired once at start-up, and the sweep loop."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
import time
from dataclasses import dataclass, field

from berth import metrics
from berth.allocation import AllocationService
from berth.capacity import NodeCapacity
from berth.config import OperatorConfig
from berth.events import EventPoster
from berth.kube import KubeApi
from berth.ledger.ledgers import Ledgers
from berth.ledger.store import LedgerStore
from berth.node_reports import NodeReports
from berth.reconcile import Reconciler
from berth.repair import Repairer
from berth.view import ClusterView, StartupListing
from berth.watch import Handler, PodWatch

log = logging.getLogger("berth.runtime")
PROCESS_STARTED = time.time()


@dataclass
class Runtime:
    config: OperatorConfig
    client: KubeApi
    view: ClusterView
    allocation: AllocationService
    reconciler: Reconciler
    repairer: Repairer
    reports: NodeReports
    capacity: NodeCapacity
    background: list[asyncio.Task[None]] = field(default_factory=list)
    pods: PodWatch | None = None

    @classmethod
    def build(
        cls, config: OperatorConfig, client: KubeApi, view: ClusterView | None = None
    ) -> Runtime:
        view = view or ClusterView(config)
        post_event = EventPoster(client)
        ledgers = Ledgers(LedgerStore(client, config.namespace))
        reconciler = Reconciler(client, post_event, workers=view.workers)
        allocation = AllocationService(
            client, ledgers, view, post_event, on_change=reconciler.request_refresh
        )
        repairer = Repairer(
            client, ledgers, view, allocation, post_event, on_change=reconciler.request_refresh
        )
        reconciler.waiting = allocation.waiting_reasons
        reconciler.conflicts = repairer.conflicts_of
        reconciler.remember = functools.partial(view.observe_pod, "ADDED")
        reports = NodeReports(
            client, view, repairer, allocation, post_event, config.node_report_interval
        )
        capacity = NodeCapacity(client, view, ledgers)
        return cls(config, client, view, allocation, reconciler, repairer, reports, capacity)

    def serves(self, namespace: str) -> bool:
        """Whether this operator serves ``namespace`` (BERTH_WATCH_NAMESPACES)."""
        return not self.config.watch_namespaces or namespace in self.config.watch_namespaces

    def refresh(self, namespace: str, name: str) -> None:
        self.reconciler.request_refresh(namespace, name)

    async def start(self, on_pod: Handler, listed: StartupListing | None = None) -> None:
        """Fill the view, then repair every ledger: before any watch, so before
        any allocation (the view must know every pool, host port and delivered
        assignment from the first event on); then watch pods from the start-up
        LIST on, and correct every node's ``berth.dev/ports`` meanwhile.

        ``listed``: the view was filled and kept current by a standby
        (berth.standby); the watch resumes where the standby's stopped.
        """
        if listed is None:
            listed = await self.view.fill(self.client)
        await self.repairer.sweep(relist=False)
        self.pods = PodWatch(self.client, on_pod, self.view.known_pods)
        for pod in listed.unserved:  # bound while no operator ran
            self.pods.deliver("MODIFIED", pod)
        self.pods.start(listed.version)
        await self.capacity.sync()
        metrics.STARTUP_SWEEP_SECONDS.set(time.time() - PROCESS_STARTED)
        settle_heap()
        self.reports.warn_overlaps()
        self.background.append(asyncio.create_task(self._sweep_forever()))
        if self.reports.interval > 0:
            self.background.append(asyncio.create_task(self.reports.follow()))

    async def _sweep_forever(self) -> None:
        # Jitter keeps replicas (and restarts) from sweeping in step.
        while True:
            await asyncio.sleep(self.config.sweep_interval * random.uniform(0.9, 1.1))
            try:
                dropped = await self.repairer.sweep()
                await self.capacity.refresh_all()
                if dropped:
                    log.info("sweep dropped %d holdings of pods that are gone", dropped)
                settle_heap()
            except Exception:
                log.exception("sweep failed; retrying on the next interval")

    async def close(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.pods is not None:
            await self.pods.close()
        await self.reconciler.close()
        await self.capacity.close()
        await self.client.close()


def settle_heap() -> None:
    """A full collection, then freeze what survived it.

    What is alive after a sweep is long-lived (modules, caches, ledgers), and
    each gen2 pass over it stalls the event loop (60-120 ms with 600-800
    pods, measured). Frozen objects are thawed and checked again at the next
    sweep, so a cycle that dies meanwhile waits one interval, not forever.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
