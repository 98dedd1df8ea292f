"""Collisions side by side on the real node, as scripts/bench_collisions.py
measures them (tests/support/collisions.py runs the rounds): Berth's engines
never hit EADDRINUSE at 16 engines x 8 ports started at once, and the
engine's own port modes, which the benchmark compares with, do what they
model: fixed bases of two deployments collide, probed ports come from the
ephemeral range and are bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from tests.support.collisions import Collisions, Shape, berth_running, ephemeral_range

Cluster = Any  # tests/integration/conftest.py's Cluster
POOL = (21000, 21999)
FIXED_BASE = 31000  # no other test's engines bind here


def test_probing_engines_bind_the_ports_the_kernel_offered(
    api_client: k8s.ApiClient, real_node: str, namespace: str
) -> None:
    shape = Shape(engines=2, ports=8, group=2, startup_ms="100-300")
    outcome = Collisions(api_client, namespace, real_node, shape).run("probe")
    # Two engines can draw the same port (rarely): then one fails, loudly.
    assert outcome.starts == 2 and not outcome.other, outcome
    assert outcome.ready + outcome.eaddrinuse == 2 and outcome.ready >= 1, outcome
    low, high = ephemeral_range()
    for ports in outcome.ports.values():
        assert len(set(ports)) == 8, outcome
        assert all(low <= p <= high for p in ports), (low, high, outcome)


def test_deployments_with_the_same_fixed_base_collide_rank_by_rank(
    api_client: k8s.ApiClient, real_node: str, namespace: str
) -> None:
    # Two deployments of 2 ranks, 4 ports each, both from FIXED_BASE: rank r
    # binds FIXED_BASE + 4r on in both, so one engine per rank fails.
    shape = Shape(engines=4, ports=4, group=2, startup_ms="0-200", fixed_base=FIXED_BASE)
    outcome = Collisions(api_client, namespace, real_node, shape).run("fixed")
    assert outcome.starts == 4 and not outcome.other, outcome
    assert (outcome.ready, outcome.eaddrinuse) == (2, 2), outcome
    bound = sorted(p for ports in outcome.ports.values() for p in ports)
    assert bound == list(range(FIXED_BASE, FIXED_BASE + 8)), outcome


def test_berth_engines_never_collide_at_16_engines_x_8_ports(
    cluster: Cluster, api_client: k8s.ApiClient, real_node: str, namespace: str, tmp_path: Path
) -> None:
    shape = Shape(engines=16, ports=8, group=4)  # the benchmark's defaults
    with berth_running(cluster, real_node, POOL, tmp_path / "operator.log"):
        outcome = Collisions(api_client, namespace, real_node, shape).run("berth")
    assert outcome.eaddrinuse == 0, outcome
    assert (outcome.starts, outcome.ready, outcome.other) == (16, 16, []), outcome
    bound = [p for ports in outcome.ports.values() for p in ports]
    assert len(bound) == len(set(bound)) == 128, outcome
    assert all(POOL[0] <= p <= POOL[1] for p in bound), outcome
