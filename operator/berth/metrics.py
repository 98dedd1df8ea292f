"""Prometheus metrics, served by the operator on BERTH_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ALLOCATIONS = Counter("berth_allocations_total", "Pods given their port blocks")
RELEASES = Counter("berth_releases_total", "Pods whose port blocks were freed")
RECLAIMED = Counter("berth_reclaimed_total", "Leaked holdings freed by a sweep")
EXHAUSTED = Counter("berth_exhausted_total", "Allocations refused for lack of space")
ALLOCATION_SECONDS = Histogram(
    "berth_allocation_seconds",
    "From handling a bound pod to its ports ConfigMap and annotation written",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
