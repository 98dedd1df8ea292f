"""Berth acting on node agent reports (node_reports.py), on the in-memory API:
listeners are never handed out, a listener in a block a pod cannot own is a
conflict, and an ephemeral overlap warns once per change and names the node
in its pool's status."""

from __future__ import annotations

import json

from tests.unit.fakes import FakeKube
from tests.unit.test_cli import ledger
from tests.unit.test_services import PODS, Bed, delivered

from berth.agent.report import NodeReport, report_body
from berth.allocator.ranges import PortRange
from berth.cli import ranges
from berth.node_reports import OVERLAP_REASON, NodeReports

REPORTS = "/api/v1/namespaces/berth-system/configmaps"
POOLS = "/apis/berth.dev/v1alpha1/nodeportpools"


def publish(kube: FakeKube, report: NodeReport) -> None:
    body = report_body(report, "berth-system", None, None)
    url = f"{REPORTS}/berth-node.{report.node}"
    if url in kube.objects:
        kube.objects[url]["data"] = report.encode()
    else:
        kube.put(REPORTS, body)


def reports(bed: Bed) -> NodeReports:
    return NodeReports(bed.kube, bed.view, bed.repairer, bed.allocation, bed.events)


async def test_a_reported_listener_is_never_handed_out() -> None:
    bed = Bed.make()
    publish(
        bed.kube, NodeReport("n1", tcp=(PortRange(20000, 20000),), udp=(PortRange(20002, 20002),))
    )
    assert await reports(bed).refresh() == {"n1"}
    got = await bed.deliver("web-d-0")
    ports = {p for span in got["web-d-0"].values() for p in range(span.start, span.end + 1)}
    assert not ports & {20000, 20002}
    # Other nodes are unaffected: n2 still starts at the pool's first port.
    assert (await bed.deliver("web-d-1", node="n2"))["web-d-1"]["http"] == PortRange(20000, 20000)


async def test_refresh_acts_only_on_change() -> None:
    bed = Bed.make()
    nodes = reports(bed)
    publish(bed.kube, NodeReport("n1", tcp=(PortRange(22, 22),)))
    assert await nodes.refresh() == {"n1"}
    assert await nodes.refresh() == set()
    publish(bed.kube, NodeReport("n1", tcp=(PortRange(22, 23),)))
    assert await nodes.refresh() == {"n1"}
    del bed.kube.objects[f"{REPORTS}/berth-node.n1"]
    assert await nodes.refresh() == {"n1"}
    assert bed.view.node_report("n1") is None


async def test_a_listener_inside_a_block_of_a_pod_without_host_network_is_a_conflict() -> None:
    bed = Bed.make()
    got = await bed.deliver("web-d-0")
    nixl = delivered(bed.current("web-d-0"))["nixl"]
    assert got["web-d-0"]["nixl"] == nixl
    publish(bed.kube, NodeReport("n1", tcp=(PortRange(nixl.start, nixl.start),)))
    await reports(bed).refresh()
    (conflict,) = bed.repairer.conflicts_of("ns", "web")
    assert f"ports {nixl.start} claimed by ns/web-d-0 and a TCP listener" in conflict
    assert [p for p, reason, _ in bed.events.posted if reason == "PortConflict"] == ["web-d-0"]
    # The listener goes: so does the conflict.
    publish(bed.kube, NodeReport("n1"))
    await reports(bed).refresh()
    assert bed.repairer.conflicts_of("ns", "web") == []


async def test_a_host_network_pods_own_listener_is_not_a_conflict() -> None:
    bed = Bed.make()
    await bed.deliver("web-d-0")
    pod = bed.kube.objects[f"{PODS}/web-d-0"]
    pod["spec"]["hostNetwork"] = True
    bed.current("web-d-0")
    http = delivered(pod)["http"]
    publish(bed.kube, NodeReport("n1", tcp=(http,)))
    await reports(bed).refresh()
    assert bed.repairer.conflicts_of("ns", "web") == []


async def test_an_ephemeral_overlap_warns_once_and_shows_in_the_pool_status() -> None:
    kube = FakeKube()
    kube.put("/api/v1/nodes", {"metadata": {"name": "n1", "labels": {"gpu": "yes"}}})
    kube.put(
        POOLS,
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "NodePortPool",
            "metadata": {"name": "gpu", "generation": 1},
            "spec": {
                "nodeSelector": {"matchLabels": {"gpu": "yes"}},
                "ranges": [{"start": 31000, "end": 31999}],
                "allowUnsafeRanges": True,
            },
        },
    )
    bed = Bed.make(kube)
    await bed.view.resync(kube)
    nodes = reports(bed)
    publish(kube, NodeReport("n1", PortRange(31500, 60999)))
    await nodes.refresh()
    await nodes.refresh()
    warnings = [(who, m) for who, reason, m in bed.events.posted if reason == OVERLAP_REASON]
    assert len(warnings) == 1
    assert warnings[0][0] == "n1"
    assert "ports 31500-31999 of pool gpu" in warnings[0][1]
    await bed.repairer.report_pools()
    assert kube.objects[f"{POOLS}/gpu"]["status"]["ephemeralOverlap"] == ["n1"]
    # The kernel reserves the pool (the agent's opt-in): no overlap, status cleared.
    reserved = (PortRange(31000, 31999),)
    publish(kube, NodeReport("n1", PortRange(31500, 60999), kernel_reserved=reserved))
    await nodes.refresh()
    await bed.view.resync(kube)
    await bed.repairer.report_pools()
    assert "ephemeralOverlap" not in kube.objects[f"{POOLS}/gpu"]["status"]
    assert len([r for _, r, _ in bed.events.posted if r == OVERLAP_REASON]) == 1


def test_berth_ranges_shows_what_each_node_reports() -> None:
    report = NodeReport(
        "n1",
        PortRange(25000, 60999),
        tcp=(PortRange(22, 22), PortRange(20000, 20000), PortRange(20100, 20100)),
        udp=(PortRange(20200, 20200),),
    )
    other = NodeReport("n2", PortRange(32768, 60999))
    table = ranges.render_table([ledger(("a", "20000"))], [report, other])
    assert "ephemeral=25000-60999" in table
    assert "undeclared-listeners-in-pool: tcp=20100 udp=20200" in table
    assert "CONFLICT ephemeral range overlaps the pool at 25000-29999" in table
    assert "CONFLICT TCP 20000 in ns/a http=20000" in table
    assert "n2  (no allocations)" in table
    parsed = json.loads(ranges.render_json([ledger(("a", "20000"))], [report]))
    assert parsed["n1"]["agent"]["ephemeralOverlap"] == "25000-29999"
    assert parsed["n1"]["agent"]["listenersInBlocks"] == ["TCP 20000 in ns/a http=20000"]
