"""Prometheus metrics, served by the operator on BERTH_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ALLOCATIONS = Counter("berth_allocations_total", "Pods given their port blocks")
RELEASES = Counter("berth_releases_total", "Pods whose port blocks were freed")
RECLAIMED = Counter("berth_reclaimed_total", "Leaked holdings freed by a sweep")
EXHAUSTED = Counter("berth_exhausted_total", "Allocations refused for lack of space")
ALLOCATION_SECONDS = Histogram(
    "berth_allocation_seconds",
    "From handling a bound pod to its ports ConfigMap and annotation written",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
API_REQUESTS = Counter(
    "berth_api_requests_total",
    "Requests Berth's own client sent to the API server",
    ["verb", "resource"],
)
POD_EVENTS = Counter("berth_pod_events_total", "Watch events of Berth pods handled")
STARTUP_SWEEP_SECONDS = Gauge(
    "berth_startup_sweep_seconds", "From process start to the first leak sweep finished"
)
LEDGER_CONFLICTS = Counter(
    "berth_ledger_conflicts_total",
    "Ledger writes refused by compare-and-swap (another writer got there first) and redone",
)
REPAIRS = Counter(
    "berth_repairs_total",
    "Ledger entries changed to agree with the ports live pods were delivered",
)
PORT_CONFLICTS = Gauge(
    "berth_port_conflicts",
    "Ports claimed twice on a node now: two delivered assignments, or a delivered "
    "block and another pod's host port",
)
