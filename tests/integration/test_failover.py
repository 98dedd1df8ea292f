"""Failover between two elected replicas on a real API server (berth.leadership).

Two ``python -m berth`` processes with leader election on share one Lease;
the active one is SIGKILLed, paused (SIGSTOP: a node gone NotReady, frozen
but not dead), cut off from the API server (a partition), or stopped
gracefully. Each time a pod created at that moment must get its ports
within 15 s (the requirement; the defaults aim at about 10 s: an 8 s Lease,
then the new leader's start-up), no port is ever delivered twice or
changed (every ``berth.dev/ports`` annotation, from a watch, and every
ledger state), and the old replica never acts again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.failover import Pair, PortsLog, exited_on_its_own
from tests.support.operator_process import wait_for
from tests.support.watcher import ClusterWatcher

BOUND = 15.0  # seconds from the active replica's loss to allocation resuming
LEASE_DURATION = 8.0  # the operator's default, set explicitly by the harness


@pytest.fixture
def pair(
    cluster: Any, crds: None, namespace: str, api_client: Any, tmp_path: Path
) -> Iterator[Pair]:
    """Replica a active, b a warm standby; a Lease of this test's own."""
    started = Pair(api_client, cluster.kubeconfig, namespace, cluster.nodes, tmp_path, namespace)
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture
def watched(pair: Pair, core_api: Any) -> Iterator[PortsLog]:
    """Every state of the cluster during the test (ClusterWatcher: I1, the ledgers,
    I3), and every delivery in this namespace: none overlaps, none changes."""
    with ClusterWatcher(core_api), PortsLog(core_api, pair.namespace) as ports:
        yield ports
        time.sleep(1)  # the last events reach the watch
    assert ports.overlaps() == []
    assert ports.changed == []
    assert len(ports.delivered) == pair.probes


def healthy(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_sigkill_of_the_active_replica(pair: Pair, watched: PortsLog) -> None:
    old, elapsed = pair.fail_over("kill")
    assert elapsed < BOUND, f"allocation resumed {elapsed:.1f} s after the SIGKILL"
    # A silent holder keeps the Lease for its whole duration: not sooner.
    assert elapsed > LEASE_DURATION - 2.5
    pair.replace(old)  # the replacement pod waits as the new standby
    assert pair.standby() is old
    pair.allocate_probe()
    for replica in pair.replicas:
        healthy(replica.log)


def test_a_paused_active_replica_and_its_return(pair: Pair, watched: PortsLog) -> None:
    """SIGSTOP: the node froze. It stops renewing; the standby takes over; on
    SIGCONT the old leader leaves before handing out a single port."""
    old, elapsed = pair.fail_over("pause")
    assert elapsed < BOUND, f"allocation resumed {elapsed:.1f} s after the SIGSTOP"
    # Work waiting for it when it wakes: events already in its watch streams.
    waiting = [pair.create_probe() for _ in range(3)]
    resumed = time.time()
    old.resume()
    assert exited_on_its_own(old, 10) == 1, "the old leader kept running after SIGCONT"
    assert old.said("resumed after the lease deadline")
    assert old.allocations_since(resumed) == []
    for name in waiting:
        pair.wait_delivered(name, 30)
    assert pair.holder() != old.identity
    pair.replace(old)
    pair.allocate_probe()


def test_an_active_replica_cut_off_from_the_api_server(pair: Pair, watched: PortsLog) -> None:
    """A partition: the old leader cannot renew, leaves at its renew deadline,
    before the standby may take the Lease."""
    old, elapsed = pair.fail_over("cut")
    assert elapsed < BOUND, f"allocation resumed {elapsed:.1f} s after the cut"
    # Gone before the new leader's first allocation: never two acting at once.
    assert not old.alive()
    assert exited_on_its_own(old, 0) == 1
    assert old.said("lost the lease")
    pair.replace(old)
    pair.allocate_probe()


def test_the_standby_answers_its_health_probe_then_kopf_does(pair: Pair) -> None:
    """The chart's probes reach a standby too: it must not be restarted as dead."""
    standby, active = pair.standby(), pair.active()
    assert standby.health() == (200, '{"standby": true}')
    assert active.health()[0] == 200 and "standby" not in active.health()[1]
    pair.fail_over("term")
    wait_for(lambda: standby.health()[0] == 200, timeout=10, what="the new leader's probe")
    assert "standby" not in standby.health()[1]  # kopf's own endpoint now


def test_a_graceful_stop_hands_the_lease_over_at_once(pair: Pair, watched: PortsLog) -> None:
    """SIGTERM (a rollout, a drain): the Lease is released, nobody waits it out."""
    old, elapsed = pair.fail_over("term")
    assert elapsed < LEASE_DURATION, f"{elapsed:.1f} s: the Lease was waited out, not released"
    assert exited_on_its_own(old, 20) == 0
    assert old.said("released the lease")
    healthy(old.log)
