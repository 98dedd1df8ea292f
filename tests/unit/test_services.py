"""Allocation, repair and reconcile driven directly, on an in-memory API (fakes.py).

The properties under test are the invariants of docs/design.md: a delivered
port never changes (I3) and is never handed to anyone else (I1), whatever
happened to the ledger; and Berth writes over nothing it does not own.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from tests.unit.fakes import Events, FakeKube

from berth import metrics
from berth.allocation import AllocationService
from berth.allocator.ranges import PortRange
from berth.coalesce import Coalescer
from berth.config import OperatorConfig
from berth.ledger.ledgers import Ledgers
from berth.ledger.store import LedgerStore
from berth.names import (
    ANNOTATION_GROUP_LEADER,
    ANNOTATION_PORT_PLAN,
    ANNOTATION_PORTS,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    MANAGED_BY,
)
from berth.plan import EnvBinding, GroupEnv, PlanBlock, PortPlan, RolePlan
from berth.pods import decode_ports
from berth.reconcile import Reconciler
from berth.repair import Repairer
from berth.view import ClusterView

Body = dict[str, Any]
PODS = "/api/v1/namespaces/ns/pods"
CONFIGMAPS = "/api/v1/namespaces/ns/configmaps"
LEDGERS = "/api/v1/namespaces/berth-system/configmaps"
PLAN = PortPlan(
    RolePlan(
        blocks=(
            PlanBlock("http", 1, 1, (EnvBinding("HTTP_PORT", "start"),)),
            PlanBlock("nixl", 4, 1, (EnvBinding("NIXL_PORT", "rankBase", 1),)),
        )
    ),
    first_rank=0,
)


@dataclass
class Bed:
    kube: FakeKube
    view: ClusterView
    events: Events
    allocation: AllocationService
    repairer: Repairer

    @classmethod
    def make(cls, kube: FakeKube | None = None, pool: str = "20000-20099") -> Bed:
        """A freshly started operator: its view listed from ``kube``."""
        kube = kube or FakeKube()
        config = OperatorConfig(default_ranges=(PortRange.parse(pool),))
        view = ClusterView(config)
        events = Events()
        ledgers = Ledgers(LedgerStore(kube, "berth-system"))
        allocation = AllocationService(kube, ledgers, view, events)
        repairer = Repairer(kube, ledgers, view, allocation, events)
        for node in ("n1", "n2"):
            view.observe_node("ADDED", {"metadata": {"name": node, "uid": f"uid-{node}"}})
        for pod in kube.objects.values():
            if pod.get("kind") == "Pod":
                view.observe_pod("ADDED", pod)
        return cls(kube, view, events, allocation, repairer)

    def pod(self, name: str, node: str = "n1") -> Body:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: "web", LABEL_ROLE: "d"},
                "annotations": {ANNOTATION_PORT_PLAN: PLAN.encode()},
            },
            "spec": {"nodeName": node, "containers": [{"name": "engine"}]},
            "status": {"phase": "Running"},
        }
        stored = self.kube.put(PODS, body)
        self.view.observe_pod("ADDED", stored)
        return stored

    def current(self, name: str) -> Body:
        body = self.kube.at(f"{PODS}/{name}")
        assert body is not None
        self.view.observe_pod("MODIFIED", body)
        return body

    async def deliver(self, *names: str, node: str = "n1") -> dict[str, dict[str, PortRange]]:
        """Bind and allocate each pod; what each was delivered, read back from the API."""
        for name in names:
            await self.allocation.ensure_allocated(self.pod(name, node))
        return {name: delivered(self.current(name)) for name in names}


def delivered(pod: Body) -> dict[str, PortRange]:
    return decode_ports(pod["metadata"]["annotations"][ANNOTATION_PORTS])


def ports_of(blocks: dict[str, PortRange]) -> set[int]:
    return {p for span in blocks.values() for p in range(span.start, span.end + 1)}


def assert_disjoint(assignments: dict[str, dict[str, PortRange]]) -> None:
    seen: dict[int, str] = {}
    for name, blocks in assignments.items():
        for port in ports_of(blocks):
            assert port not in seen, f"port {port} held by {seen[port]} and {name}"
            seen[port] = name


def ledger_of(kube: FakeKube, node: str = "n1") -> Body | None:
    return kube.at(f"{LEDGERS}/berth-ledger.{node}")


async def test_delivery_writes_configmap_then_annotation_once() -> None:
    bed = Bed.make()
    pod = bed.pod("web-d-0")
    await bed.allocation.ensure_allocated(pod)
    cm = bed.kube.at(f"{CONFIGMAPS}/web-d-0-ports")
    assert cm is not None and cm["data"] == {"HTTP_PORT": "20000", "NIXL_PORT": "20001"}
    assert delivered(bed.current("web-d-0")) == {
        "http": PortRange(20000, 20000),
        "nixl": PortRange(20001, 20004),
    }
    assert [verb for verb, _ in bed.kube.writes] == ["create", "create", "patch"]
    await bed.allocation.ensure_allocated(bed.current("web-d-0"))  # a replayed event
    assert len(bed.kube.writes) == 3


@pytest.mark.parametrize("restart", [True, False])
async def test_a_lost_ledger_never_moves_a_running_pod(restart: bool) -> None:
    """The incident of the repair issue: pods whose name order differs from their
    creation order, their node's ledger deleted, then more allocation."""
    bed = Bed.make()
    names = [f"web-d-{i}" for i in range(12)]
    before = await bed.deliver(*names)
    ledger = ledger_of(bed.kube)
    assert ledger is not None
    await bed.kube.delete(f"{LEDGERS}/berth-ledger.n1")
    if restart:
        bed = Bed.make(bed.kube)
        await bed.repairer.sweep(relist=False)  # what start-up runs before any watch
        repaired = ledger_of(bed.kube)
        assert repaired is not None and len(repaired["data"]) == 1 + len(names)
    for name in sorted(names):  # name order: -0, -1, -10, -11, -2, ...
        await bed.allocation.ensure_allocated(bed.current(name))
    after = {name: delivered(bed.current(name)) for name in names}
    assert after == before
    newcomer = await bed.deliver("web-d-12")
    assert_disjoint({**after, **newcomer})


async def test_a_ledger_deleted_while_running_is_rebuilt_by_the_next_sweep() -> None:
    bed = Bed.make()
    before = await bed.deliver("web-d-0", "web-d-1")
    await bed.kube.delete(f"{LEDGERS}/berth-ledger.n1")
    await bed.repairer.sweep(relist=False)
    rebuilt = ledger_of(bed.kube)
    assert rebuilt is not None
    assert {bed.current(n)["metadata"]["uid"] for n in before} <= set(rebuilt["data"])


async def test_a_ledger_edited_by_hand_yields_to_the_pods() -> None:
    bed = Bed.make()
    before = await bed.deliver("web-d-0", "web-d-1")
    ledger = ledger_of(bed.kube)
    assert ledger is not None
    uid = bed.current("web-d-1")["metadata"]["uid"]
    ledger["data"][uid] = "ns web-d-1 web d http=20000,nixl=20001-20004"  # on top of -0
    await bed.kube.replace(f"{LEDGERS}/berth-ledger.n1", ledger)
    await bed.repairer.sweep(relist=False)
    rebuilt = ledger_of(bed.kube)
    assert rebuilt is not None and rebuilt["data"][uid].endswith("http=20005,nixl=20006-20009")
    assert {n: delivered(bed.current(n)) for n in before} == before
    assert_disjoint({**before, **await bed.deliver("web-d-2")})


async def test_a_garbage_ledger_is_rebuilt_from_the_pods() -> None:
    bed = Bed.make()
    before = await bed.deliver("web-d-0", "web-d-1")
    ledger = ledger_of(bed.kube)
    assert ledger is not None
    ledger["data"] = {"pool": "what is this", "x": "y"}
    await bed.kube.replace(f"{LEDGERS}/berth-ledger.n1", ledger)
    bed = Bed.make(bed.kube)
    await bed.repairer.sweep(relist=False)
    assert_disjoint({**before, **await bed.deliver("web-d-2")})
    rebuilt = ledger_of(bed.kube)
    assert rebuilt is not None and rebuilt["data"]["pool"].startswith("default 20000-20099")
    assert "LedgerRepaired" in bed.events.reasons()


async def test_a_ledger_berth_did_not_write_is_replaced_by_the_repaired_one() -> None:
    bed = Bed.make()
    bed.kube.put(LEDGERS, {"metadata": {"name": "berth-ledger.n2"}, "data": {"x": "y"}})
    after = await bed.deliver("web-d-1", node="n2")
    assert after["web-d-1"]["http"] == PortRange(20000, 20000)
    rebuilt = ledger_of(bed.kube, "n2")
    assert rebuilt is not None and rebuilt["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGED_BY
    damage = [m for _, reason, m in bed.events.posted if reason == "LedgerRepaired"]
    assert damage and "Berth did not write it" in damage[0]


async def test_overlapping_deliveries_are_reported_and_given_to_nobody_else() -> None:
    bed = Bed.make()
    await bed.deliver("web-d-0", "web-d-1")
    text = bed.current("web-d-0")["metadata"]["annotations"][ANNOTATION_PORTS]
    patch = {"metadata": {"annotations": {ANNOTATION_PORTS: text}}}
    await bed.kube.merge_patch(f"{PODS}/web-d-1", patch)  # a hand edit: -1 now claims -0's
    await bed.kube.delete(f"{LEDGERS}/berth-ledger.n1")
    bed = Bed.make(bed.kube)
    await bed.repairer.sweep(relist=False)
    assert metrics.PORT_CONFLICTS._value.get() >= 1
    conflicts = [(pod, reason) for pod, reason, _ in bed.events.posted if reason == "PortConflict"]
    assert {pod for pod, _ in conflicts} == {"web-d-0", "web-d-1"}
    assert bed.repairer.conflicts_of("ns", "web")
    newcomer = await bed.deliver("web-d-2")
    assert_disjoint({"held": decode_ports(text), **newcomer})
    await bed.allocation.ensure_allocated(bed.current("web-d-1"))
    assert delivered(bed.current("web-d-1")) == decode_ports(text)  # never moved


async def test_a_late_foreign_pod_on_a_held_port_is_reported() -> None:
    bed = Bed.make()
    await bed.deliver("web-d-0")
    foreign = bed.kube.put(
        PODS,
        {
            "kind": "Pod",
            "metadata": {"name": "node-agent", "namespace": "ns"},
            "spec": {
                "nodeName": "n1",
                "hostNetwork": True,
                "containers": [{"name": "a", "ports": [{"containerPort": 20002}]}],
            },
            "status": {"phase": "Running"},
        },
    )
    node = bed.view.observe_pod("ADDED", foreign)
    assert node == "n1"
    bed.repairer.check_foreign(node)
    flagged = {pod for pod, reason, _ in bed.events.posted if reason == "PortConflict"}
    assert flagged == {"web-d-0", "node-agent"}
    assert any("20002" in c for c in bed.repairer.conflicts_of("ns", "web"))


async def test_a_users_configmap_is_never_overwritten() -> None:
    bed = Bed.make()
    mine = {"metadata": {"name": "web-d-0-ports"}, "data": {"mine": "keep-me"}}
    bed.kube.put(CONFIGMAPS, mine)
    await bed.allocation.ensure_allocated(bed.pod("web-d-0"))
    cm = bed.kube.at(f"{CONFIGMAPS}/web-d-0-ports")
    assert cm is not None and cm["data"] == {"mine": "keep-me"}
    assert "ownerReferences" not in cm["metadata"]
    assert ANNOTATION_PORTS not in bed.current("web-d-0")["metadata"]["annotations"]
    assert "NameTaken" in bed.events.reasons()
    assert bed.allocation.waiting_reasons("ns", "web")


async def test_a_delivery_through_the_configmap_alone_stands() -> None:
    """The operator stopped between writing the ConfigMap and the annotation, and
    the ledger was lost: the containers may run with the ConfigMap's ports."""
    bed = Bed.make()
    await bed.deliver("web-d-0")
    pod = bed.pod("web-d-1")
    earlier = '{"http":"20050","nixl":"20051-20054"}'
    bed.kube.put(
        CONFIGMAPS,
        {
            "metadata": {
                "name": "web-d-1-ports",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY},
                "annotations": {ANNOTATION_PORTS: earlier},
                "ownerReferences": [
                    {"kind": "Pod", "name": "web-d-1", "uid": pod["metadata"]["uid"]}
                ],
            },
            "data": {"HTTP_PORT": "20050", "NIXL_PORT": "20051"},
        },
    )
    await bed.allocation.ensure_allocated(pod)
    assert delivered(bed.current("web-d-1")) == decode_ports(earlier)


async def test_a_release_wakes_the_pods_waiting_on_that_node() -> None:
    bed = Bed.make(pool="20000-20006")  # one pod's 5 ports fit, two do not
    await bed.deliver("web-d-0")
    waiting = bed.pod("web-d-1")
    await bed.allocation.ensure_allocated(waiting)
    assert "PortsExhausted" in bed.events.reasons()
    await bed.allocation.release(bed.current("web-d-0"), reason="pod deleted")
    assert delivered(bed.current("web-d-1"))["http"] == PortRange(20000, 20000)
    assert not bed.allocation.waiting_reasons("ns", "web")


async def test_the_sweep_drops_holdings_of_pods_that_are_gone_only() -> None:
    bed = Bed.make()
    await bed.deliver("web-d-0", "web-d-1")
    gone = bed.current("web-d-0")
    await bed.kube.delete(f"{PODS}/web-d-0")
    bed.view.observe_pod("DELETED", gone)  # the DELETED event was missed by the ledger
    assert await bed.repairer.sweep(relist=False) == 1
    ledger = ledger_of(bed.kube)
    assert ledger is not None and gone["metadata"]["uid"] not in ledger["data"]
    assert bed.current("web-d-1")["metadata"]["uid"] in ledger["data"]


# ----------------------------------------------------------------- reconcile

DEPLOYMENTS = "/apis/berth.dev/v1alpha1/namespaces/ns/inferencedeployments"


def deployment(kube: FakeKube) -> Body:
    return kube.put(
        DEPLOYMENTS,
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "InferenceDeployment",
            "metadata": {"name": "web", "namespace": "ns", "generation": 1},
            "spec": {
                "engine": {"preset": "custom"},
                "ports": [{"name": "http", "size": 1, "env": [{"name": "HTTP_PORT"}]}],
                "roles": [
                    {
                        "name": "worker",
                        "replicas": 2,
                        "template": {"spec": {"containers": [{"name": "e", "image": "e"}]}},
                    }
                ],
            },
        },
    )


def reconciler(kube: FakeKube, events: Events, view: ClusterView) -> Reconciler:
    return Reconciler(kube, events, workers=view.workers)


def condition(kube: FakeKube, type_: str) -> Body:
    body = kube.at(f"{DEPLOYMENTS}/web")
    assert body is not None
    return next(c for c in body["status"]["conditions"] if c["type"] == type_)


async def test_reconcile_creates_the_workers_and_reports_status() -> None:
    kube, events = FakeKube(), Events()
    view = ClusterView(OperatorConfig())
    await reconciler(kube, events, view).reconcile(deployment(kube))
    created = sorted(k for k in kube.objects if k.startswith(PODS))
    assert created == [f"{PODS}/web-worker-0", f"{PODS}/web-worker-1"]
    assert condition(kube, "Degraded")["status"] == "False"
    assert condition(kube, "PortsAllocated")["reason"] == "Allocated"
    assert kube.at(f"{CONFIGMAPS}/web-port-map") is not None


async def test_reconcile_leaves_a_users_objects_alone_and_says_so() -> None:
    kube, events = FakeKube(), Events()
    view = ClusterView(OperatorConfig())
    kube.put(CONFIGMAPS, {"metadata": {"name": "web-port-map"}, "data": {"important": "user"}})
    kube.put(CONFIGMAPS, {"metadata": {"name": "web-worker-0-ports"}, "data": {"mine": "k"}})
    kube.put(PODS, {"kind": "Pod", "metadata": {"name": "web-worker-1"}, "spec": {}})
    await reconciler(kube, events, view).reconcile(deployment(kube))
    port_map = kube.at(f"{CONFIGMAPS}/web-port-map")
    assert port_map is not None and port_map["data"] == {"important": "user"}
    assert kube.at(f"{PODS}/web-worker-0") is None  # its ConfigMap name is taken
    worker = kube.at(f"{PODS}/web-worker-1")
    assert worker is not None and "ownerReferences" not in worker["metadata"]
    degraded = condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "NameClash"
    for name in ("web-port-map", "web-worker-0-ports", "web-worker-1"):
        assert name in degraded["message"]
    assert events.reasons() == ["NameClash"]


# ------------------------------------------------------------------ plumbing


async def test_the_coalescer_folds_a_burst_into_one_run_plus_one() -> None:
    runs: list[str] = []
    started = asyncio.Event()

    async def job(key: str) -> None:
        runs.append(key)
        started.set()
        await asyncio.sleep(0.05)

    coalescer: Coalescer[str] = Coalescer(job, delay=0.01)
    for _ in range(50):
        coalescer.request("a")
    await started.wait()
    for _ in range(50):
        coalescer.request("a")  # during the run: one more run, not fifty
    await asyncio.sleep(0.3)
    assert runs == ["a", "a"]
    await coalescer.close()


def test_port_map_entries_are_json_per_worker() -> None:
    entry = json.dumps({"http": "20000"})
    assert decode_ports(entry) == {"http": PortRange(20000, 20000)}
    with pytest.raises(ValueError):
        decode_ports('["not", "a", "map"]')


async def test_a_dp_group_follower_gets_its_leaders_address_and_rpc_port() -> None:
    plan = RolePlan(
        blocks=(PlanBlock("dp-rpc", 1, 1, (EnvBinding("BERTH_DP_RPC_PORT", "start"),)),),
        group_env=(
            GroupEnv("BERTH_DP_ADDRESS", "leaderAddress"),
            GroupEnv("BERTH_DP_LEADER_RPC_PORT", "leaderBlock", "dp-rpc"),
            GroupEnv("BERTH_DP_START_RANK", "firstRank"),
        ),
    )
    bed = Bed.make()

    def member(name: str, rank: int) -> Body:
        pod = bed.pod(name)
        annotations = {
            ANNOTATION_PORT_PLAN: PortPlan(plan, rank).encode(),
            ANNOTATION_GROUP_LEADER: "web-d-0",
        }
        meta = {**pod["metadata"], "annotations": annotations}
        return {**pod, "metadata": meta, "status": {"phase": "Running", "podIP": f"10.0.0.{rank}"}}

    follower = member("web-d-1", 4)
    bed.kube.objects[f"{PODS}/web-d-1"] = follower
    bed.view.observe_pod("MODIFIED", follower)
    await bed.allocation.ensure_allocated(follower)
    assert bed.kube.at(f"{CONFIGMAPS}/web-d-1-ports") is None  # the leader is unknown yet
    leader = member("web-d-0", 0)
    bed.kube.objects[f"{PODS}/web-d-0"] = leader
    bed.view.observe_pod("MODIFIED", leader)
    await bed.allocation.ensure_allocated(leader)
    await bed.allocation.wake_followers(bed.current("web-d-0"))
    theirs = bed.kube.at(f"{CONFIGMAPS}/web-d-1-ports")
    mine = bed.kube.at(f"{CONFIGMAPS}/web-d-0-ports")
    assert theirs is not None and mine is not None
    assert theirs["data"]["BERTH_DP_ADDRESS"] == mine["data"]["BERTH_DP_ADDRESS"] == "10.0.0.0"
    assert theirs["data"]["BERTH_DP_LEADER_RPC_PORT"] == mine["data"]["BERTH_DP_RPC_PORT"]
    assert theirs["data"]["BERTH_DP_START_RANK"] == "4"


async def test_a_deleted_nodes_ledger_is_not_brought_back() -> None:
    """The garbage collector removes a deleted node's ledger; its pods are going
    away too, so repair must not write the ledger again (it would have no owner)."""
    bed = Bed.make()
    await bed.deliver("web-d-0", node="n2")
    bed.view.observe_node("DELETED", {"metadata": {"name": "n2", "uid": "uid-n2"}})
    await bed.kube.delete(f"{LEDGERS}/berth-ledger.n2")
    await bed.repairer.sweep(relist=False)
    assert ledger_of(bed.kube, "n2") is None


async def test_reconcile_drops_the_configmap_a_gone_pod_of_that_name_left() -> None:
    kube, events = FakeKube(), Events()
    view = ClusterView(OperatorConfig())
    stale = {
        "metadata": {
            "name": "web-worker-0-ports",
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [{"kind": "Pod", "name": "web-worker-0", "uid": "gone-uid"}],
        },
        "data": {"HTTP_PORT": "20000"},
    }
    kube.put(CONFIGMAPS, stale)
    live = kube.put(PODS, {"kind": "Pod", "metadata": {"name": "web-worker-1"}, "spec": {}})
    kept = {**stale, "metadata": {**stale["metadata"], "name": "web-worker-1-ports"}}
    kept["metadata"]["ownerReferences"] = [
        {"kind": "Pod", "name": "web-worker-1", "uid": live["metadata"]["uid"]}
    ]
    kube.put(CONFIGMAPS, kept)
    await reconciler(kube, events, view).reconcile(deployment(kube))
    assert kube.at(f"{CONFIGMAPS}/web-worker-0-ports") is None  # could start the new pod
    assert kube.at(f"{PODS}/web-worker-0") is not None
    assert kube.at(f"{CONFIGMAPS}/web-worker-1-ports") is not None  # its pod lives


async def test_a_transient_api_failure_is_retried_soon_without_another_event() -> None:
    bed = Bed.make()
    create = bed.kube.create
    failed: list[str] = []

    async def flaky_create(url: str, body: Body) -> Body:
        if not failed:  # the first write (the ledger's) times out once
            failed.append(url)
            raise TimeoutError
        return await create(url, body)

    bed.kube.create = flaky_create  # type: ignore[method-assign]
    assert await bed.allocation.ensure_allocated(bed.pod("web-d-0")) is None
    assert bed.allocation.waiting_reasons("ns", "web")
    await asyncio.sleep(0.7)  # the first retry comes after 0.5 s
    assert failed and delivered(bed.current("web-d-0"))["http"] == PortRange(20000, 20000)
    assert not bed.allocation.waiting_reasons("ns", "web")


async def test_a_sweep_keeps_a_ledger_written_while_it_listed() -> None:
    bed = Bed.make()
    await bed.deliver("web-d-0")
    ledgers = bed.allocation.ledgers
    list_ = bed.kube.list

    async def slow_list(url: str, label_selector: str | None = None) -> list[Body]:
        listed = await list_(url, label_selector)
        await bed.deliver("web-d-1")  # written after the LIST's snapshot was taken
        return listed

    bed.kube.list = slow_list  # type: ignore[method-assign]
    before = metrics.LEDGER_CONFLICTS._value.get()
    await ledgers.load_all()
    bed.kube.list = list_  # type: ignore[method-assign]
    await bed.deliver("web-d-2")
    assert metrics.LEDGER_CONFLICTS._value.get() == before  # no stale copy was written over
    assert_disjoint({n: delivered(bed.current(n)) for n in ("web-d-0", "web-d-1", "web-d-2")})
