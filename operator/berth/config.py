"""Operator settings, read once from the environment (12-factor, Helm-friendly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from berth.allocator.ranges import PortRange
from berth.pools import Pool


def _ranges(text: str) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(part) for part in text.split(",") if part.strip())


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
        )
