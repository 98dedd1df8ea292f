"""Operator settings, read once from the environment (12-factor, Helm-friendly)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from berth.allocator.ranges import PortRange
from berth.pools import Pool


def _ranges(text: str) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(part) for part in text.split(",") if part.strip())


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", ""):
        raise ValueError(f"BERTH_LEADER_ELECTION: {text!r} is not true or false")
    return value in ("true", "1", "yes")


@dataclass(frozen=True)
class LeaseTimings:
    """The leader-election Lease: who holds it and how long a silent holder keeps it.

    A standby takes an unrenewed Lease ``duration`` after it last saw it change;
    the holder stops itself once ``renew_deadline`` has passed since its last
    successful renewal began, so it has stopped acting before anyone else can
    hold the Lease (``renew_deadline < duration``).
    """

    name: str = "berth-operator"
    #: This replica's holderIdentity: the pod name in the chart, else host and pid.
    identity: str = ""
    duration: float = 8.0
    renew_deadline: float = 5.0
    renew_period: float = 2.0
    retry_period: float = 1.0

    def __post_init__(self) -> None:
        if not self.renew_deadline < self.duration:
            raise ValueError(
                f"BERTH_LEASE_RENEW_DEADLINE ({self.renew_deadline:g}) must be below "
                f"BERTH_LEASE_DURATION ({self.duration:g})"
            )
        if not 0 < self.renew_period < self.renew_deadline:
            raise ValueError(
                f"BERTH_LEASE_RENEW_PERIOD ({self.renew_period:g}) must be above 0 and below "
                f"BERTH_LEASE_RENEW_DEADLINE ({self.renew_deadline:g})"
            )
        if self.retry_period <= 0:
            raise ValueError("BERTH_LEASE_RETRY_PERIOD must be above 0")

    @classmethod
    def from_env(cls, env: dict[str, str]) -> LeaseTimings:
        return cls(
            name=env.get("BERTH_LEASE_NAME", cls.name),
            identity=env.get("BERTH_POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            duration=float(env.get("BERTH_LEASE_DURATION", cls.duration)),
            renew_deadline=float(env.get("BERTH_LEASE_RENEW_DEADLINE", cls.renew_deadline)),
            renew_period=float(env.get("BERTH_LEASE_RENEW_PERIOD", cls.renew_period)),
            retry_period=float(env.get("BERTH_LEASE_RETRY_PERIOD", cls.retry_period)),
        )


@dataclass(frozen=True)
class OperatorConfig:
    """Everything an operator process needs to know that is not in the cluster."""

    namespace: str = "berth-system"
    #: Below the NodePort range (30000-32767) and Linux's default ephemeral
    #: range (32768-60999): no outgoing connection takes these ports.
    default_ranges: tuple[PortRange, ...] = (PortRange(20000, 29999),)
    default_reserved: tuple[PortRange, ...] = ()
    sweep_interval: float = 60.0
    #: Seconds between re-reads of the node agents' reports (node_reports.py);
    #: 0 leaves them to the sweep (no agent runs).
    node_report_interval: float = 5.0
    metrics_port: int = 8080
    watch_namespaces: tuple[str, ...] = field(default=())
    log_level: str = "info"
    log_format: str = "text"
    #: Off for a process run by hand (it acts at once, like kopf standalone);
    #: the chart turns it on for its replicas (docs/install.md, "Failover").
    leader_election: bool = False
    lease: LeaseTimings = field(default_factory=LeaseTimings)

    @property
    def default_pool(self) -> Pool:
        """Nodes no NodePortPool selects draw from this one."""
        return Pool("default", self.default_ranges, self.default_reserved)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        env = dict(os.environ) if env is None else env
        return cls(
            namespace=env.get("BERTH_NAMESPACE", cls.namespace),
            default_ranges=_ranges(env["BERTH_DEFAULT_POOL"])
            if env.get("BERTH_DEFAULT_POOL")
            else cls.default_ranges,
            default_reserved=_ranges(env.get("BERTH_DEFAULT_RESERVED", "")),
            sweep_interval=float(env.get("BERTH_SWEEP_INTERVAL", cls.sweep_interval)),
            node_report_interval=float(
                env.get("BERTH_NODE_REPORT_INTERVAL", cls.node_report_interval)
            ),
            metrics_port=int(env.get("BERTH_METRICS_PORT", cls.metrics_port)),
            watch_namespaces=tuple(
                ns for ns in env.get("BERTH_WATCH_NAMESPACES", "").split(",") if ns
            ),
            log_level=env.get("BERTH_LOG_LEVEL", cls.log_level).lower(),
            log_format=env.get("BERTH_LOG_FORMAT", cls.log_format).lower(),
            leader_election=_flag(env.get("BERTH_LEADER_ELECTION", "")),
            lease=LeaseTimings.from_env(env),
        )
