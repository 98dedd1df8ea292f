"""berth.dev/ports: the figure a node advertises, when it is written, what pods request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from tests.unit.fakes import FakeKube

from berth import capacity
from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeploymentSpec
from berth.capacity import NodeCapacity, scheduler_waiting, servable_ports, status_patch, tight
from berth.engines import resolve_role
from berth.kube import KubeError
from berth.ledger.records import Holder, NodeLedger
from berth.manifests import worker_pod
from berth.plan import PortPlan
from berth.pools import Pool
from berth.status import Observed, deployment_status

POOL = Pool("p", (PortRange(20000, 20099),), (PortRange(20010, 20019),))
NODES = "/api/v1/nodes"


def test_the_figure_is_the_pool_minus_reserved_and_foreign_ports() -> None:
    assert servable_ports(POOL) == 90
    # A foreign port inside the pool counts; one outside it, or on a reserved port, does not.
    foreign = [PortRange(20050, 20050), PortRange(20015, 20015), PortRange(9000, 9000)]
    assert servable_ports(POOL, foreign=foreign) == 89


def test_a_listener_inside_a_held_block_is_not_taken_twice() -> None:
    held = [PortRange(20000, 20004)]
    # The engine listening on its own port, and an agent-reported stranger.
    avoided = [PortRange(20002, 20002), PortRange(20060, 20060)]
    assert servable_ports(POOL, held, avoided) == 89


def test_free_runs_too_short_for_the_largest_block_are_not_advertised() -> None:
    held = [PortRange(20004, 20004), PortRange(20030, 20030)]
    # Free runs: 20000-20003 (4), 20005-20009 (5), 20020-20029 (10), 20031-20099 (69).
    assert servable_ports(POOL, held, largest_block=1) == 90
    assert servable_ports(POOL, held, largest_block=8) == 90 - 4 - 5
    assert servable_ports(POOL, held, largest_block=16) == 90 - 4 - 5 - 10


def test_a_change_is_written_at_once_only_where_the_count_decides() -> None:
    assert not tight(have=90, want=85, used=10, largest_pod=20)  # room for 3+ pods
    assert tight(have=90, want=85, used=50, largest_pod=20)
    assert tight(have=60, want=90, used=30, largest_pod=20)  # more room: say so now


def test_a_worker_pod_requests_its_plans_total_in_its_first_container() -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {
            "engine": {"preset": "vllm"},
            "roles": [
                {
                    "name": "decode",
                    "dataParallelSize": 4,
                    "template": {"spec": {"containers": [{"name": "a", "image": "i"}]}},
                }
            ],
        }
    )
    plan = PortPlan(resolve_role(spec, spec.roles[0]), 0)
    deployment = {"metadata": {"name": "d", "namespace": "ns", "uid": "u"}}
    template = {
        "spec": {
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "1"}}},
                {"name": "b"},
            ]
        }
    }
    pod = worker_pod(deployment, "decode", 0, template, plan)
    first, second = pod["spec"]["containers"]
    total = str(sum(b.size for b in plan.role.blocks))
    assert total == "9"  # http 1 + nixl 4 + kv-events 4
    assert first["resources"]["requests"] == {"cpu": "1", capacity.RESOURCE: total}
    assert first["resources"]["limits"] == {capacity.RESOURCE: total}
    assert "resources" not in second
    assert template["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "1"}}


def pending(message: str, node: str | None = None) -> dict[str, Any]:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": node} if node else {},
        "status": {"conditions": [{**condition, "message": message}]},
    }


def test_the_condition_points_at_the_scheduler_when_no_node_has_ports() -> None:
    message = "0/2 nodes are available: 2 Insufficient berth.dev/ports."
    pods = [pending(message), pending("0/2 nodes are available: 2 Insufficient cpu.")]
    waiting = scheduler_waiting(pods)
    assert waiting == [message]
    status = deployment_status(Observed(1, roles=[], unschedulable=waiting), None)
    condition = status.condition("PortsAllocated")
    assert condition is not None and condition.status == "False"
    assert condition.reason == "InsufficientPorts"
    assert "wait for the scheduler" in condition.message and message in condition.message


class View:
    def __init__(self, nodes: Sequence[str], pool: Pool = POOL) -> None:
        self._nodes = list(nodes)
        self.pool = pool
        self.foreign: dict[str, list[PortRange]] = {}

    def nodes(self) -> list[str]:
        return self._nodes

    def pool_for(self, node: str) -> Pool:
        return self.pool

    def avoided_ports(self, node: str) -> list[PortRange]:
        return self.foreign.get(node, [])


class Ledgers:
    def __init__(self) -> None:
        self.by_node: dict[str, NodeLedger] = {}

    def cached(self) -> dict[str, NodeLedger]:
        return dict(self.by_node)

    def hold(self, node: str, uid: str, *spans: PortRange) -> None:
        ledger = self.by_node.setdefault(node, NodeLedger.empty(node, POOL))
        blocks = {f"b{i}": span for i, span in enumerate(spans)}
        ledger.allocator.adopt(Assignment(uid, blocks))
        ledger.holders[uid] = Holder("ns", uid, uid, "d", "r")


def node(name: str, figure: int | None = None) -> dict[str, Any]:
    status = {} if figure is None else status_patch(figure)["status"]
    return {"metadata": {"name": name}, "status": status}


def setup(*nodes: dict[str, Any]) -> tuple[FakeKube, View, Ledgers, NodeCapacity]:
    api = FakeKube()
    for body in nodes:
        api.put(NODES, body)
    view, ledgers = View([n["metadata"]["name"] for n in nodes]), Ledgers()
    return api, view, ledgers, NodeCapacity(api, view, ledgers, delay=0)


def figure_of(api: FakeKube, name: str) -> int | None:
    body = api.at(f"{NODES}/{name}")
    assert body is not None
    return capacity.published(body)


async def test_start_up_writes_only_the_nodes_whose_figure_is_wrong() -> None:
    api, *_, publisher = setup(node("a", 90), node("b"), node("c", 7))
    await publisher.sync()
    assert [figure_of(api, n) for n in "abc"] == [90, 90, 90]
    assert sorted(url for _, url in api.writes) == [f"{NODES}/b/status", f"{NODES}/c/status"]
    api.writes.clear()
    await publisher.sync()  # a restart with nothing changed costs no write
    assert api.writes == []


async def test_pool_and_foreign_changes_are_written_and_allocations_only_when_tight() -> None:
    api, view, ledgers, publisher = setup(node("a", 90))
    await publisher.sync()
    view.foreign["a"] = [PortRange(20050, 20050)]
    assert await publisher.refresh("a")
    assert figure_of(api, "a") == 89
    view.pool = Pool("p", (PortRange(20000, 20199),))
    await publisher.refresh_all()
    assert figure_of(api, "a") == 199
    # A small pod strands a 3-port run below a larger one: not worth a write
    # while the node has plenty of room...
    ledgers.hold("a", "big", PortRange(20000, 20007))
    ledgers.hold("a", "small", PortRange(20011, 20011))
    ledgers.by_node["a"].allocator.release("big")
    ledgers.hold("a", "gap", PortRange(20003, 20007))
    api.writes.clear()
    assert not await publisher.refresh("a", only_if_tight=True)
    assert api.writes == []
    # ...but it is once the node is nearly full, and at every sweep.
    ledgers.hold("a", "fill", PortRange(20020, 20180))
    assert await publisher.refresh("a", only_if_tight=True)
    # Every free run is now shorter than the largest block (161): none can take
    # it. The foreign port lies inside the held block: not taken twice.
    assert figure_of(api, "a") == 200 - (3 + 3 + 8 + 19)


async def test_the_node_event_of_our_own_write_costs_nothing_and_a_removal_is_undone() -> None:
    api, *_, publisher = setup(node("a"))
    await publisher.sync()
    body = api.at(f"{NODES}/a")
    assert body is not None
    publisher.observe_node("MODIFIED", body)
    api.writes.clear()
    assert not await publisher.refresh("a")
    publisher.observe_node("MODIFIED", node("a"))  # someone took it off
    assert await publisher.refresh("a", only_if_tight=True)


async def test_remove_all_takes_the_resource_off_every_node() -> None:
    api, *_ = setup(node("a", 90), node("b"))
    assert await capacity.remove_all(api) == ["a"]
    body = api.at(f"{NODES}/a")
    assert body is not None
    assert capacity.RESOURCE not in body["status"]["capacity"]
    assert capacity.RESOURCE not in body["status"]["allocatable"]


@pytest.mark.parametrize(
    ("text", "count"),
    [("16", 16), ("10k", 10000), ("61k", 61000), ("1M", 10**6), ("2Ki", 2048), ("1.5k", None)],
)
def test_the_figure_is_read_back_in_the_api_servers_canonical_form(
    text: str, count: int | None
) -> None:
    assert capacity.parse_count(text) == count
    assert capacity.published({"status": {"allocatable": {capacity.RESOURCE: text}}}) == count


@pytest.mark.parametrize(
    ("pod", "host"),
    [
        ({"spec": {"containers": [{"ports": [{"containerPort": 80}]}]}}, False),
        ({"spec": {"containers": [{"ports": [{"containerPort": 80, "hostPort": 80}]}]}}, True),
        ({"spec": {"hostNetwork": True, "containers": [{"ports": [{"containerPort": 1}]}]}}, True),
    ],
)
def test_which_pods_can_change_a_figure(pod: dict[str, Any], host: bool) -> None:
    assert capacity.declares_host_ports(pod) is host


async def test_a_refused_write_is_logged_and_the_other_nodes_still_get_theirs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, _, _, publisher = setup(node("a"), node("b"))
    patch = api.merge_patch

    async def refuse_a(url: str, body: dict[str, Any]) -> dict[str, Any]:
        if url == f"{NODES}/a/status":
            raise KubeError(403, "Forbidden", 'cannot patch resource "nodes/status"')
        return await patch(url, body)

    api.merge_patch = refuse_a  # type: ignore[method-assign]
    await publisher.sync()
    assert figure_of(api, "a") is None and figure_of(api, "b") == 90
    assert 'cannot patch resource "nodes/status"' in caplog.text
