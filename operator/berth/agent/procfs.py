"""Parsers for the /proc files the agent reads, and a reader rooted anywhere.

The root is configurable (``BERTH_AGENT_PROC``) so tests can feed a fake
tree; in a hostNetwork pod ``/proc/net`` is the host network namespace's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from berth.allocator.ranges import PortRange

# Socket states in /proc/net/{tcp,udp}* (include/net/tcp_states.h).
TCP_LISTEN = "0A"
#: An unconnected UDP socket: bound, receiving from anyone (a UDP "listener").
UDP_UNCONNECTED = "07"

SYSCTL = "sys/net/ipv4"
PORT_RANGE = f"{SYSCTL}/ip_local_port_range"
RESERVED_PORTS = f"{SYSCTL}/ip_local_reserved_ports"


def parse_port_range(text: str) -> PortRange:
    """``ip_local_port_range``: two numbers separated by whitespace."""
    low, high = text.split()
    return PortRange(int(low), int(high))


def parse_ranges(text: str) -> tuple[PortRange, ...]:
    """``ip_local_reserved_ports`` (and the report's lists): ``"22,8000-8010"``."""
    return tuple(PortRange.parse(part) for part in text.split(",") if part.strip())


def format_ranges(ranges: Iterable[PortRange]) -> str:
    """The inverse of :func:`parse_ranges`, merged and sorted (what the kernel prints)."""
    return ",".join(map(str, merge(ranges)))


def merge(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, with overlapping or touching ranges joined."""
    out: list[PortRange] = []
    for r in sorted(ranges):
        if out and r.start <= out[-1].end + 1:
            out[-1] = PortRange(out[-1].start, max(out[-1].end, r.end))
        else:
            out.append(r)
    return tuple(out)


def ports_of(ranges: Iterable[PortRange]) -> set[int]:
    return {port for r in ranges for port in range(r.start, r.end + 1)}


def ranges_of(ports: Iterable[int]) -> tuple[PortRange, ...]:
    return merge(PortRange(port, port) for port in ports)


def parse_sockets(text: str, state: str) -> set[int]:
    """Local ports of the sockets in ``state`` in a /proc/net/{tcp,udp}[6] table.

    Each row reads ``sl local_address rem_address st ...``, the address being
    hex ``ADDR:PORT`` (8 hex digits for IPv4, 32 for IPv6).
    """
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != state:
            continue
        port = int(fields[1].rpartition(":")[2], 16)
        if port:
            ports.add(port)
    return ports


@dataclass(frozen=True)
class Listeners:
    tcp: frozenset[int]
    udp: frozenset[int]


class ProcFS:
    """The node's /proc (or a copy of it) as the agent reads it."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = Path(root)

    def _read(self, name: str) -> str:
        return (self.root / name).read_text()

    def ephemeral_range(self) -> PortRange:
        return parse_port_range(self._read(PORT_RANGE))

    def reserved_ports(self) -> tuple[PortRange, ...]:
        return parse_ranges(self._read(RESERVED_PORTS))

    def write_reserved_ports(self, ranges: Iterable[PortRange]) -> None:
        """Replace the kernel's reserved set (needs CAP_NET_ADMIN, /proc/sys writable)."""
        (self.root / RESERVED_PORTS).write_text(format_ranges(ranges) + "\n")

    def listeners(self) -> Listeners:
        def table(name: str, state: str) -> set[int]:
            path = self.root / "net" / name
            # tcp6/udp6 are absent on a kernel booted without IPv6.
            return parse_sockets(path.read_text(), state) if path.exists() else set()

        return Listeners(
            frozenset(table("tcp", TCP_LISTEN) | table("tcp6", TCP_LISTEN)),
            frozenset(table("udp", UDP_UNCONNECTED) | table("udp6", UDP_UNCONNECTED)),
        )
