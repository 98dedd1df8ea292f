"""The pod watch: each pod's events in order, pods at once, a gap re-listed;
and the standby's view it keeps."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.fakes import FakeKube

from berth.config import OperatorConfig
from berth.kube import KubeError
from berth.standby import WarmView
from berth.watch import PodWatch

Body = dict[str, Any]
PODS = "/api/v1/pods"  # the fake lists by path: where the watch's re-list looks


def pod(uid: str, version: int, phase: str = "Pending") -> Body:
    return {
        "metadata": {
            "name": f"p-{uid}",
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": str(version),
        },
        "status": {"phase": phase},
    }


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.running: set[str] = set()
        self.overlapped = False
        self.concurrent = 0

    async def __call__(self, event_type: str, body: Any) -> None:
        uid = body["metadata"]["uid"]
        self.overlapped |= uid in self.running
        self.running.add(uid)
        self.concurrent = max(self.concurrent, len(self.running))
        await asyncio.sleep(0.01)
        self.seen.append((event_type, uid, body["metadata"].get("resourceVersion", "")))
        self.running.discard(uid)


async def settle(watch: PodWatch, events: list[Body | BaseException]) -> None:
    task = asyncio.create_task(watch.run("1"))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not events and not watch._running:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_pods_events_never_overlap_and_the_newest_wins() -> None:
    kube = FakeKube()
    kube.events = [
        {"type": "ADDED", "object": pod("a", 2)},
        {"type": "ADDED", "object": pod("b", 3)},
        {"type": "MODIFIED", "object": pod("a", 4)},  # queued while a@2 is handled
        {"type": "MODIFIED", "object": pod("a", 5, "Running")},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "6"}}},
    ]
    handled = Recorder()
    await settle(PodWatch(kube, handled, dict), kube.events)
    assert not handled.overlapped and handled.concurrent == 2  # a and b at once
    assert [e for e in handled.seen if e[1] == "a"] == [("ADDED", "a", "2"), ("MODIFIED", "a", "5")]


async def test_a_watch_too_old_relists_and_calls_vanished_pods_deleted() -> None:
    kube = FakeKube()
    kube.put(PODS, pod("kept", 1))
    known = {"kept": pod("kept", 1), "gone": pod("gone", 1)}
    kube.events = [KubeError(410, "Expired", "too old resource version")]
    handled = Recorder()
    await settle(PodWatch(kube, handled, lambda: known), kube.events)
    assert sorted((t, uid) for t, uid, _ in handled.seen) == [
        ("DELETED", "gone"),
        ("MODIFIED", "kept"),
    ]


async def test_a_standby_keeps_its_view_and_hands_over_where_it_stopped() -> None:
    labels = {"app.kubernetes.io/managed-by": "berth", "berth.dev/deployment": "web"}
    bound = {**pod("w1", 2), "spec": {"nodeName": "n1"}}
    bound["metadata"]["labels"] = labels
    kube = FakeKube()
    kube.put(PODS, bound)
    delivered = {**bound, "metadata": {**bound["metadata"], "resourceVersion": "9"}}
    delivered["metadata"]["annotations"] = {"berth.dev/ports": '{"http":"20000"}'}
    later = {**bound, "metadata": {**bound["metadata"], "uid": "w2", "name": "p-w2"}}
    kube.events = [
        {"type": "ADDED", "object": later},
        {"type": "MODIFIED", "object": delivered},
    ]
    warm = WarmView(OperatorConfig(), kube)
    await warm.start()
    for _ in range(50):
        await asyncio.sleep(0.01)
    view, listed = await warm.hand_over()
    assert listed.version == "9"  # the last event seen: the leader's watch resumes there
    assert [p["metadata"]["uid"] for p in listed.unserved] == ["w2"]  # w1 got its ports
    assert {p["metadata"]["uid"] for p in view.workers()} == {"w1", "w2"}
