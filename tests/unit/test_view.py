"""The in-memory cluster view: what other pods claim, which pool a node uses,
and LISTs that race with watch events."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from berth.allocator.ranges import PortRange
from berth.capacity import INSUFFICIENT, scheduler_waiting
from berth.config import OperatorConfig
from berth.pods import foreign_claim, is_berths, is_ready, owned_by
from berth.view import ClusterView, SnapshotCache

Body = dict[str, Any]


def pod(
    uid: str = "u1",
    node: str | None = "n1",
    ports: list[Body] | None = None,
    *,
    host_network: bool = False,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
) -> Body:
    spec: Body = {"containers": [{"name": "c", "ports": ports or []}]}
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    return {
        "metadata": {"name": f"pod-{uid}", "namespace": "ns", "uid": uid, "labels": labels or {}},
        "spec": spec,
        "status": {"phase": phase},
    }


def pool(name: str, start: int, end: int, priority: int = 0, gpu: bool = True) -> Body:
    selector = {"matchLabels": {"gpu": "yes"}} if gpu else None
    spec: Body = {"ranges": [{"start": start, "end": end}], "priority": priority}
    if selector:
        spec["nodeSelector"] = selector
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        "spec": spec,
    }


def node(name: str, labels: dict[str, str] | None = None) -> Body:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "labels": labels or {}}}


def test_host_ports_are_claimed_and_container_ports_only_with_host_network() -> None:
    bridged = pod(ports=[{"containerPort": 80}, {"containerPort": 81, "hostPort": 9001}])
    claim = foreign_claim(bridged)
    assert claim is not None and (claim.node, claim.ports) == ("n1", (9001,))
    host = pod(ports=[{"containerPort": 9100}, {"containerPort": 9101}], host_network=True)
    claim = foreign_claim(host)
    assert claim is not None and (claim.node, claim.ports) == ("n1", (9100, 9101))


def test_pods_that_claim_nothing_on_a_node() -> None:
    ports = [{"containerPort": 9100}]
    assert foreign_claim(pod(ports=ports)) is None  # no host network, no hostPort
    assert foreign_claim(pod(ports=ports, host_network=True, node=None)) is None  # unbound
    finished = pod(ports=ports, host_network=True, phase="Succeeded")
    assert foreign_claim(finished) is None
    berths = pod(ports=ports, host_network=True, labels={"app.kubernetes.io/managed-by": "berth"})
    assert foreign_claim(berths) is None  # its ports are in the ledger already


def test_foreign_ports_follow_pod_events_per_node() -> None:
    cache = ClusterView(OperatorConfig())
    cache.observe_pod(None, pod("a", "n1", [{"containerPort": 1, "hostPort": 20005}]))
    cache.observe_pod("ADDED", pod("b", "n2", [{"containerPort": 1, "hostPort": 20006}]))
    assert cache.foreign_ports("n1") == [PortRange(20005, 20005)]
    cache.observe_pod("DELETED", pod("a", "n1", [{"containerPort": 1, "hostPort": 20005}]))
    assert cache.foreign_ports("n1") == []
    finished = pod("b", "n2", [{"containerPort": 1, "hostPort": 20006}], phase="Failed")
    cache.observe_pod("MODIFIED", finished)
    assert cache.foreign_ports("n2") == []


def test_pool_choice_follows_node_and_pool_events() -> None:
    cache = ClusterView(OperatorConfig())
    cache.observe_node(None, node("g1", {"gpu": "yes"}))
    cache.observe_node(None, node("c1"))
    cache.observe_pool(None, pool("gpu", 21000, 21999))
    cache.observe_pool(None, pool("gpu-hi", 23000, 23099, priority=5))
    assert cache.pool_for("g1").name == "gpu-hi"
    assert cache.pool_for("c1").name == "default"
    assert cache.node_uid("g1") == "uid-g1"
    cache.observe_pool("DELETED", pool("gpu-hi", 23000, 23099, priority=5))
    assert cache.pool_for("g1").ranges == (PortRange(21000, 21999),)
    assert sorted(cache.nodes()) == ["c1", "g1"]


def test_an_invalid_pool_is_left_out_not_raised() -> None:
    cache = ClusterView(OperatorConfig())
    broken = pool("broken", 22000, 21000)  # end before start: the schema refuses it
    cache.observe_pool(None, broken)
    assert cache.pools() == []


async def test_a_list_never_overrides_what_an_event_said_meanwhile() -> None:
    cache: SnapshotCache[str, int] = SnapshotCache()
    cache.observe("kept", 1)
    cache.observe("stale", 1)
    cache.observe("deleted-during-list", 1)
    listed = asyncio.Event()

    async def listing() -> dict[str, int]:
        await listed.wait()
        # A snapshot taken before the events below were seen.
        return {"kept": 1, "deleted-during-list": 1, "updated-during-list": 1, "new": 1}

    resync = asyncio.create_task(cache.resync(listing))
    await asyncio.sleep(0)
    cache.observe("deleted-during-list", None)
    cache.observe("updated-during-list", 2)
    listed.set()
    await resync
    assert dict(zip(cache.keys(), cache.values(), strict=True)) == {
        "kept": 1,
        "updated-during-list": 2,
        "new": 1,
    }
    # Outside a LIST, events apply as they come; the next LIST wins again.
    await cache.resync(lambda: _const({"new": 3}))
    assert cache.keys() == ["new"] and cache.get("new") == 3


async def _const(value: dict[str, int]) -> dict[str, int]:
    return value


def test_worker_pods_are_kept_as_summaries_per_deployment() -> None:
    cache = ClusterView(OperatorConfig())
    labels = {"app.kubernetes.io/managed-by": "berth", "berth.dev/deployment": "llama"}
    worker = pod("w1", "n1", [{"containerPort": 8000}], host_network=True, labels=dict(labels))
    worker["metadata"].update(
        namespace="ml",
        annotations={"berth.dev/ports": '{"http":"20000"}', "berth.dev/port-plan": "x" * 500},
        ownerReferences=[{"kind": "InferenceDeployment", "name": "llama", "uid": "d1"}],
    )
    worker["metadata"]["labels"]["team"] = "search"  # the user's own: not kept
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T00:00:00Z"}
    waits = f"0/4 nodes are available: 4 {INSUFFICIENT}."
    scheduled = {"type": "PodScheduled", "status": "False", "message": waits}
    worker["status"].update(
        hostIP="10.0.0.1",
        podIP="10.0.0.1",
        conditions=[{"type": "Initialized"}, ready, scheduled],
    )
    cache.observe_pod("ADDED", worker)
    (summary,) = cache.workers("ml", "llama")
    assert summary["metadata"]["annotations"] == {"berth.dev/ports": '{"http":"20000"}'}
    assert summary["metadata"]["labels"] == labels and summary["metadata"]["ownerReferences"] == [
        {"uid": "d1"}
    ]
    assert is_ready(summary) and owned_by(summary, "d1") and is_berths(summary)
    assert scheduler_waiting([{**summary, "spec": {}}]) == [waits]  # as if still unbound
    assert summary["spec"] == {"nodeName": "n1", "hostNetwork": True}
    assert summary["status"] == {
        "phase": "Running",
        "hostIP": "10.0.0.1",
        "podIP": "10.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}, scheduled],
    }
    assert cache.workers("ml", "other") == [] and cache.workers("other", "llama") == []
    assert cache.foreign_ports("n1") == []  # Berth's own ports are in the ledger, not here
    cache.observe_pod("DELETED", worker)
    assert cache.workers() == []


class Listing:
    """Collections by path: just what ClusterView.resync iterates."""

    def __init__(self, **collections: list[Body]) -> None:
        self.collections = collections
        self.calls: list[tuple[str, str | None]] = []

    async def iterate(
        self, url: str, label_selector: str | None = None, *, versions: list[str] | None = None
    ) -> Any:
        if versions is not None:
            versions.append("1")
        self.calls.append((url.rsplit("/", 1)[-1], label_selector))
        for item in self.collections[url.rsplit("/", 1)[-1]]:
            if (
                label_selector is None
                or item["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by")
                == label_selector.split("=")[1]
            ):
                yield item


async def test_start_up_fills_every_view_with_one_pass_over_pods() -> None:
    labels = {"app.kubernetes.io/managed-by": "berth", "berth.dev/deployment": "llama"}
    worker = pod("w1", "g1", labels=labels)
    worker["metadata"]["namespace"] = "ml"
    other = pod("o1", "g1", [{"containerPort": 1, "hostPort": 21000}])
    client = Listing(
        nodes=[node("g1", {"gpu": "yes"})],
        nodeportpools=[pool("gpu", 21000, 21999)],
        pods=[worker, other],
        configmaps=[],  # no node agent reports
    )
    cache = ClusterView(OperatorConfig())
    listing = await cache.fill(client)  # type: ignore[arg-type]
    assert listing.unserved == [worker]  # bound, no ports yet: whole
    assert cache.pool_for("g1").name == "gpu"
    assert [w["metadata"]["uid"] for w in cache.workers("ml", "llama")] == ["w1"]
    assert cache.foreign_ports("g1") == [PortRange(21000, 21000)]
    assert [c for c in client.calls if c[0] == "pods"] == [("pods", None)]
    # A sweep re-lists only Berth's pods; the worker is gone by then.
    client.collections["pods"] = [other]
    await cache.resync(client)  # type: ignore[arg-type]
    assert cache.workers() == []
    assert client.calls[-1] == ("pods", "app.kubernetes.io/managed-by=berth")
    assert cache.foreign_ports("g1") == [PortRange(21000, 21000)]


async def test_two_lists_in_flight_at_once_each_respect_the_events_they_raced() -> None:
    cache: SnapshotCache[str, int] = SnapshotCache()
    first_started, release_first = asyncio.Event(), asyncio.Event()

    async def slow() -> dict[str, int]:
        first_started.set()
        await release_first.wait()
        return {"a": 1}

    async def fast() -> dict[str, int]:
        cache.observe("b", 2)  # an event while both LISTs are in flight
        return {"a": 1}

    first = asyncio.create_task(cache.resync(slow))
    await first_started.wait()
    await cache.resync(fast)
    release_first.set()
    await first
    assert cache.get("b") == 2  # neither LIST, older than the event, dropped it
    assert cache.get("a") == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["observe", "resync", "replace"]),
            st.dictionaries(
                st.sampled_from("abcdef"), st.none() | st.sampled_from(["n1", "n2", "n3"])
            ),
        ),
        max_size=12,
    )
)
def test_indexes_agree_with_a_scan_after_any_events_and_lists(
    steps: list[tuple[str, dict[str, str | None]]],
) -> None:
    """What select() returns is what scanning every object would find."""
    cache: SnapshotCache[str, tuple[str, str | None]] = SnapshotCache(node=lambda v: v[1])

    async def listing(items: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
        cache.observe("a", ("a", "n1"))  # an event racing with the LIST
        return items

    for action, changes in steps:
        items = {key: (key, node) for key, node in changes.items()}
        if action == "observe":
            for key, value in items.items():
                cache.observe(key, value if value[1] != "n3" else None)
        elif action == "resync":
            asyncio.run(cache.resync(lambda items=items: listing(items)))  # type: ignore[misc]
        else:
            cache.replace(items)
        for node in ("n1", "n2", "n3", None):
            scanned = sorted(v for v in cache.values() if v[1] == node)
            selected = sorted(cache.select("node", node)) if node else scanned
            assert selected == scanned
