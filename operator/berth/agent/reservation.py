"""Kernel reservation: keep outgoing connections out of the node's pool.

Ports in ``net.ipv4.ip_local_reserved_ports`` are never chosen as ephemeral
ports (an explicit bind still works, as Berth's engines do). The agent adds
the pool, leaves everything it found there, and takes back only what it
added: on SIGTERM, and when the node's pool shrinks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from berth.agent.procfs import ProcFS, ports_of, ranges_of
from berth.allocator.ranges import PortRange

log = logging.getLogger("berth.agent")


class KernelReservation:
    def __init__(self, proc: ProcFS, earlier: Iterable[PortRange] = ()) -> None:
        """``earlier``: what a previous run of the agent said it added (its
        report), so a restart after a crash still takes it back on exit."""
        self._proc = proc
        self.added: set[int] = ports_of(earlier) & ports_of(proc.reserved_ports())

    def apply(self, pool: Iterable[PortRange]) -> tuple[PortRange, ...]:
        """Make the kernel reserve ``pool``; returns what the agent added so far."""
        want = ports_of(pool)
        current = ports_of(self._proc.reserved_ports())
        stale = self.added - want
        missing = want - current
        if stale or missing:
            self._write((current - stale) | missing)
        self.added = (self.added & want & current) | missing
        return ranges_of(self.added)

    def release(self) -> None:
        """Take back what this agent added, nothing else."""
        if self.added:
            current = ports_of(self._proc.reserved_ports())
            self._write(current - self.added)
            self.added = set()

    def _write(self, ports: set[int]) -> None:
        ranges = ranges_of(ports)
        self._proc.write_reserved_ports(ranges)
        log.info("ip_local_reserved_ports is now %s", ",".join(map(str, ranges)) or "empty")
