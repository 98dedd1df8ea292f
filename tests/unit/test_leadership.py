"""Leader election rules (berth.leadership) on the in-memory API; the real
API server and real processes are in tests/integration/test_failover.py."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import NoReturn

import aiohttp
import pytest
from tests.unit.fakes import FakeKube

from berth import leadership as module
from berth.config import LeaseTimings, OperatorConfig
from berth.kube import Body
from berth.leadership import FencedKube, Leadership, LostLease

FAST = LeaseTimings(
    identity="a", duration=0.4, renew_deadline=0.25, renew_period=0.05, retry_period=0.02
)
URL = "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases/berth-operator"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Abdicated(Exception):
    pass


@pytest.fixture
def abdications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """abdicate() would end the test process: record the reason and raise."""
    reasons: list[str] = []

    def record(reason: str) -> NoReturn:
        reasons.append(reason)
        raise Abdicated(reason)

    monkeypatch.setattr(module, "abdicate", record)
    return reasons


def candidate(api: FakeKube, clock: Clock, identity: str, **timings: float) -> Leadership:
    settings = LeaseTimings(
        identity=identity,
        **{
            "duration": 8,
            "renew_deadline": 5,
            "renew_period": 2,
            "retry_period": 1,
            **timings,
        },
    )
    return Leadership(api, "berth-system", settings, clock=clock, wall=lambda: 1.7e9 + clock())


def spec(api: FakeKube) -> Body:
    lease = api.at(URL)
    assert lease is not None
    result: Body = lease["spec"]
    return result


async def test_the_first_candidate_creates_the_lease_and_holds_it() -> None:
    api, clock = FakeKube(), Clock()
    a = candidate(api, clock, "a")
    assert await a.try_acquire()
    assert a.held()
    lease = spec(api)
    assert lease["holderIdentity"] == "a"
    assert lease["leaseDurationSeconds"] == 8 and lease["leaseTransitions"] == 0
    assert lease["renewTime"].endswith("Z") and "." in lease["renewTime"]


async def test_a_standby_waits_out_the_holders_duration_on_its_own_clock() -> None:
    api, clock = FakeKube(), Clock()
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert await a.try_acquire()
    assert not await b.try_acquire()  # b first sees this version now
    for _ in range(5):  # a renews every 2 s: b never takes it
        clock.now += 2
        await a.renew()
        assert not await b.try_acquire()
    # a goes silent (SIGKILL): b takes it 8 s after it first saw the last version.
    clock.now += 1
    assert not await b.try_acquire()
    clock.now += 6.9
    assert not await b.try_acquire()
    clock.now += 0.1
    assert await b.try_acquire()
    assert spec(api)["holderIdentity"] == "b" and spec(api)["leaseTransitions"] == 1
    # a stopped acting at its renew deadline, 5 s after its last renewal began.
    assert not a.held()


async def test_the_old_holder_cannot_renew_a_lease_taken_from_it() -> None:
    api, clock = FakeKube(), Clock()
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    clock.now += 8
    assert await b.try_acquire()
    with pytest.raises(LostLease, match="taken by b"):
        await a.renew()


async def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = FakeKube(), Clock()
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    await a.release()
    assert not a.held()
    assert spec(api)["holderIdentity"] is None
    assert await b.try_acquire()


async def test_a_restart_under_the_same_identity_takes_its_lease_back_at_once() -> None:
    api, clock = FakeKube(), Clock()
    assert await candidate(api, clock, "pod-1").try_acquire()
    again = candidate(api, clock, "pod-1")  # the container restarted in the same pod
    assert await again.try_acquire()
    assert spec(api)["leaseTransitions"] == 0


class Interleaved(FakeKube):
    """Every read yields to the other tasks: all racers read before anyone writes."""

    async def get_or_none(self, url: str) -> Body | None:
        body = self.at(url)
        await asyncio.sleep(0)
        return body


async def test_candidates_racing_for_a_missing_or_expired_lease_never_both_win() -> None:
    api, clock = Interleaved(), Clock()
    racers = [candidate(api, clock, name) for name in "abcd"]
    won = await asyncio.gather(*(r.try_acquire() for r in racers))
    assert won.count(True) == 1  # one create, three 409s
    holder = spec(api)["holderIdentity"]
    await asyncio.gather(*(r.try_acquire() for r in racers if r.identity != holder))
    clock.now += 8  # the holder went silent; the others all see it expire at once
    won = await asyncio.gather(*(r.try_acquire() for r in racers if r.identity != holder))
    assert won.count(True) == 1  # every write carried the version it read
    assert spec(api)["holderIdentity"] != holder and spec(api)["leaseTransitions"] == 1


async def test_renewal_keeps_going_through_a_conflict_on_its_own_lease() -> None:
    api, clock = FakeKube(), Clock()
    a = candidate(api, clock, "a")
    assert await a.try_acquire()
    lease = api.at(URL)
    assert lease is not None
    lease["metadata"]["labels"] = {"touched": "by-hand"}
    await api.replace(URL, lease)  # someone labels it: a's version is stale
    with pytest.raises(Exception, match="409"):
        await a.renew()
    await a.renew()  # retried on the fresh version
    assert spec(api)["holderIdentity"] == "a"


class Unreachable(FakeKube):
    """The API server cut off: every call fails."""

    async def replace(self, url: str, body: Body) -> Body:
        raise aiohttp.ClientConnectionError("connection refused")


async def test_a_holder_that_cannot_renew_gives_up_at_its_deadline() -> None:
    api = Unreachable()
    a = Leadership(api, "berth-system", FAST)  # the real monotonic clock
    assert await a.try_acquire()  # create still works; renewals fail from now on
    started = asyncio.get_running_loop().time()
    with pytest.raises(LostLease, match=r"not renewed within 0\.25 s"):
        await asyncio.wait_for(a.keep(), 5)
    assert 0.2 <= asyncio.get_running_loop().time() - started < 1.0
    assert not a.held()


class Hanging(FakeKube):
    """Renewals that never get an answer (a partition that drops packets)."""

    async def replace(self, url: str, body: Body) -> Body:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_a_hanging_renewal_is_cut_off_at_the_deadline() -> None:
    a = Leadership(Hanging(), "berth-system", FAST)
    assert await a.try_acquire()
    with pytest.raises(LostLease):
        await asyncio.wait_for(a.keep(), 5)


async def test_fenced_writes_leave_the_process_once_the_deadline_passed(
    abdications: list[str],
) -> None:
    api, clock = FakeKube(), Clock()
    a = candidate(api, clock, "a")
    assert await a.try_acquire()
    fenced = FencedKube(api, a)
    url = "/api/v1/namespaces/berth-system/configmaps"
    await fenced.create(url, {"metadata": {"name": "before"}})
    clock.now += 5  # no renewal for the whole deadline: maybe no longer ours
    assert await fenced.get_or_none(f"{url}/before") is not None  # reads still pass
    for write in (
        fenced.create(url, {"metadata": {"name": "after"}}),
        fenced.replace(f"{url}/before", {"metadata": {"name": "before"}}),
        fenced.merge_patch(f"{url}/before", {"data": {"x": "1"}}),
        fenced.delete(f"{url}/before"),
    ):
        with pytest.raises(Abdicated):
            await write
    assert len(abdications) == 4 and "no longer holds the lease" in abdications[0]
    assert api.at(f"{url}/after") is None


def test_sigcont_after_the_deadline_leaves_before_anything_else_runs(
    abdications: list[str],
) -> None:
    clock = Clock()
    a = candidate(FakeKube(), clock, "a")
    asyncio.run(a.try_acquire())
    previous = signal.getsignal(signal.SIGCONT)
    try:
        a.stop_if_resumed_late()
        os.kill(os.getpid(), signal.SIGCONT)  # still within the deadline: stays
        assert abdications == []
        clock.now += 5.1  # "paused" past the deadline
        with pytest.raises(Abdicated):
            os.kill(os.getpid(), signal.SIGCONT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        assert "resumed after the lease deadline" in abdications[0]
    finally:
        signal.signal(signal.SIGCONT, previous)


def test_lease_settings_from_the_environment() -> None:
    config = OperatorConfig.from_env(
        {
            "BERTH_LEADER_ELECTION": "true",
            "BERTH_LEASE_NAME": "berth-x",
            "BERTH_POD_NAME": "berth-x-7d9f-abcde",
            "BERTH_LEASE_DURATION": "15",
            "BERTH_LEASE_RENEW_DEADLINE": "10",
            "BERTH_LEASE_RENEW_PERIOD": "3",
            "BERTH_LEASE_RETRY_PERIOD": "2",
        }
    )
    assert config.leader_election
    assert config.lease == LeaseTimings("berth-x", "berth-x-7d9f-abcde", 15, 10, 3, 2)
    default = OperatorConfig.from_env({})
    assert not default.leader_election
    assert default.lease.name == "berth-operator"
    assert default.lease.identity.endswith(f"-{os.getpid()}")  # host and pid: unique


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BERTH_LEADER_ELECTION": "maybe"}, "BERTH_LEADER_ELECTION"),
        ({"BERTH_LEASE_DURATION": "4"}, r"RENEW_DEADLINE \(5\) must be below .*DURATION \(4\)"),
        ({"BERTH_LEASE_RENEW_PERIOD": "6"}, r"RENEW_PERIOD \(6\) must be above 0 and below"),
        ({"BERTH_LEASE_RETRY_PERIOD": "0"}, "BERTH_LEASE_RETRY_PERIOD must be above 0"),
    ],
)
def test_bad_lease_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)
