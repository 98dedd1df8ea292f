"""The node agent without a cluster: /proc parsing, the report, the kernel
reservation on a fake /proc tree, and writes only on change (fakes.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.unit.fakes import FakeKube

from berth.agent.agent import Agent, AgentConfig, NotOurs, ReportWriter
from berth.agent.procfs import (
    TCP_LISTEN,
    UDP_UNCONNECTED,
    ProcFS,
    format_ranges,
    parse_port_range,
    parse_ranges,
    parse_sockets,
)
from berth.agent.report import NodeReport, report_configmap
from berth.agent.reservation import KernelReservation
from berth.allocator.ranges import PortRange
from berth.pools import Pool

# Captured on Linux 6.x: listeners on 127.0.0.1:20005 (tcp) and [::]:20006
# (tcp6), a connection to 20005 from an ephemeral port (both ends ESTABLISHED),
# unconnected UDP sockets on 0.0.0.0:20007 and [::1]:20008, and a connected
# UDP socket (state 01) talking to 20007.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   1: 0100007F:4E25 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8318648 1 00000000df911f14 100 0 0 10 0
  15: 0100007F:BE86 0100007F:4E25 01 00000000:00000000 00:00000000 00000000     0        0 8318650 2 00000000f20ccb90 20 0 0 10 -1
 213: 0100007F:4E25 0100007F:BE86 01 00000000:00000000 00:00000000 00000000     0        0 8318651 1 000000004eeb5f7c 20 0 0 10 -1
"""  # noqa: E501
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:4E26 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8318649 1 00000000c895c2a4 100 0 0 10 0
"""  # noqa: E501
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
10580: 00000000:4E27 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 8318652 2 00000000eb9b1b07 0
14383: 0100007F:DD02 0100007F:4E27 01 00000000:00000000 00:00000000 00000000     0        0 8318654 2 0000000080cb8295 0
"""  # noqa: E501
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
10581: 00000000000000000000000001000000:4E28 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 8318653 2 00000000cc13f68c 0
"""  # noqa: E501

CONFIGMAPS = "/api/v1/namespaces/berth-system/configmaps"


def fake_proc(root: Path, port_range: str = "32768\t60999\n", reserved: str = "\n") -> ProcFS:
    (root / "net").mkdir(parents=True)
    (root / "sys/net/ipv4").mkdir(parents=True)
    for name, text in (("tcp", TCP), ("tcp6", TCP6), ("udp", UDP), ("udp6", UDP6)):
        (root / "net" / name).write_text(text)
    (root / "sys/net/ipv4/ip_local_port_range").write_text(port_range)
    (root / "sys/net/ipv4/ip_local_reserved_ports").write_text(reserved)
    return ProcFS(root)


def test_tcp_listeners_only_in_listen_state() -> None:
    assert parse_sockets(TCP, TCP_LISTEN) == {20005}
    assert parse_sockets(TCP6, TCP_LISTEN) == {20006}


def test_udp_bound_sockets_only_unconnected() -> None:
    assert parse_sockets(UDP, UDP_UNCONNECTED) == {20007}
    assert parse_sockets(UDP6, UDP_UNCONNECTED) == {20008}


def test_header_only_tables_have_no_listeners() -> None:
    assert parse_sockets(TCP.splitlines()[0], TCP_LISTEN) == set()


def test_sysctl_formats() -> None:
    assert parse_port_range("32768\t60999\n") == PortRange(32768, 60999)
    assert parse_ranges("\n") == ()
    assert parse_ranges("20000-20099,25000\n") == (PortRange(20000, 20099), PortRange(25000, 25000))
    assert format_ranges([PortRange(5, 6), PortRange(1, 4), PortRange(9, 9)]) == "1-6,9"


def test_proc_tree_read_whole(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, reserved="25000\n")
    listeners = proc.listeners()
    assert listeners.tcp == {20005, 20006}
    assert listeners.udp == {20007, 20008}
    assert proc.ephemeral_range() == PortRange(32768, 60999)
    assert proc.reserved_ports() == (PortRange(25000, 25000),)


def test_missing_ipv6_tables_are_empty(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    (tmp_path / "net/tcp6").unlink()
    (tmp_path / "net/udp6").unlink()
    assert proc.listeners().tcp == {20005}


def test_report_round_trip() -> None:
    report = NodeReport(
        "n1",
        PortRange(32768, 60999),
        (PortRange(20000, 20099),),
        (PortRange(20000, 20099),),
        (PortRange(22, 22), PortRange(8000, 8003)),
        (PortRange(53, 53),),
    )
    data = report.encode()
    assert data == {
        "ephemeral": "32768-60999",
        "kernelReserved": "20000-20099",
        "agentReserved": "20000-20099",
        "tcp": "22,8000-8003",
        "udp": "53",
    }
    assert NodeReport.decode("n1", data) == report
    assert report.listener_ports() == {22, 53, 8000, 8001, 8002, 8003}
    with pytest.raises(ValueError):
        NodeReport.decode("n1", {"tcp": "not-a-port"})


def test_ephemeral_overlap_minus_kernel_reserved() -> None:
    pool = (PortRange(20000, 20999), PortRange(40000, 40099))
    lowered = NodeReport("n1", PortRange(20500, 60999))
    assert lowered.ephemeral_overlap(pool) == (PortRange(20500, 20999), PortRange(40000, 40099))
    reserved = NodeReport("n1", PortRange(20500, 60999), kernel_reserved=(PortRange(20000, 20999),))
    assert reserved.ephemeral_overlap(pool) == (PortRange(40000, 40099),)
    assert NodeReport("n1", PortRange(32768, 60999)).ephemeral_overlap(pool[:1]) == ()
    assert NodeReport("n1").ephemeral_overlap(pool) == ()


def test_reservation_adds_pool_and_takes_back_only_its_own(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, reserved="20050,25000\n")
    reservation = KernelReservation(proc)
    added = reservation.apply([PortRange(20000, 20099)])
    assert proc.reserved_ports() == (PortRange(20000, 20099), PortRange(25000, 25000))
    assert added == (PortRange(20000, 20049), PortRange(20051, 20099))
    # The pool shrinks: what the agent added outside it goes, 20050 stays.
    reservation.apply([PortRange(20000, 20009)])
    assert proc.reserved_ports() == (
        PortRange(20000, 20009),
        PortRange(20050, 20050),
        PortRange(25000, 25000),
    )
    reservation.release()
    assert proc.reserved_ports() == (PortRange(20050, 20050), PortRange(25000, 25000))


def test_reservation_resumes_what_an_earlier_run_added(tmp_path: Path) -> None:
    """After a crash the kernel still holds the pool; the report says it was ours."""
    proc = fake_proc(tmp_path, reserved="20000-20099,25000\n")
    reservation = KernelReservation(proc, earlier=[PortRange(20000, 20099)])
    reservation.apply([PortRange(20000, 20099)])
    reservation.release()
    assert proc.reserved_ports() == (PortRange(25000, 25000),)


def test_reservation_writes_nothing_when_already_reserved(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, reserved="20000-20099\n")
    path = tmp_path / "sys/net/ipv4/ip_local_reserved_ports"
    path.chmod(0o444)  # a write would fail (root ignores modes: also compare the text)
    reservation = KernelReservation(proc)
    assert reservation.apply([PortRange(20000, 20099)]) == ()
    reservation.release()
    assert path.read_text() == "20000-20099\n"


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_writer_writes_once_per_change() -> None:
    kube = FakeKube()
    writer = ReportWriter(kube, "berth-system", "n1")
    report = NodeReport("n1", PortRange(32768, 60999), tcp=(PortRange(22, 22),))
    assert run(writer.publish(report, "node-uid")) is True
    assert run(writer.publish(report, "node-uid")) is False
    changed = NodeReport("n1", PortRange(32768, 60999), tcp=(PortRange(22, 23),))
    assert run(writer.publish(changed, "node-uid")) is True
    assert writer.writes == 2
    stored = kube.at(f"{CONFIGMAPS}/{report_configmap('n1')}")
    assert stored is not None
    assert stored["data"]["tcp"] == "22-23"
    assert stored["metadata"]["ownerReferences"][0]["uid"] == "node-uid"
    assert stored["metadata"]["labels"]["berth.dev/node-report"] == "true"


def test_writer_adds_the_owner_once_the_node_is_known() -> None:
    kube = FakeKube()
    writer = ReportWriter(kube, "berth-system", "n1")
    report = NodeReport("n1", tcp=(PortRange(22, 22),))
    assert run(writer.publish(report, None)) is True
    assert run(writer.publish(report, "node-uid")) is True
    assert run(writer.publish(report, "node-uid")) is False
    assert run(writer.publish(report, None)) is False  # a failed Node read keeps the owner
    stored = kube.at(f"{CONFIGMAPS}/{report_configmap('n1')}")
    assert stored is not None
    assert stored["metadata"]["ownerReferences"][0]["uid"] == "node-uid"


def test_writer_survives_a_concurrent_write_with_cas() -> None:
    kube = FakeKube()
    writer = ReportWriter(kube, "berth-system", "n1")
    run(writer.publish(NodeReport("n1", tcp=(PortRange(22, 22),)), None))
    url = f"{CONFIGMAPS}/{report_configmap('n1')}"
    stale = kube.at(url)
    assert stale is not None
    kube.objects[url]["metadata"]["resourceVersion"] = "999"  # someone else wrote it
    newer = NodeReport("n1", tcp=(PortRange(80, 80),))
    assert run(writer.publish(newer, None)) is True
    assert [w for w, _ in kube.writes] == ["create", "replace", "replace"]
    assert kube.objects[url]["data"]["tcp"] == "80"


def test_writer_resumes_without_rewriting_an_unchanged_report() -> None:
    kube = FakeKube()
    report = NodeReport("n1", tcp=(PortRange(22, 22),))
    run(ReportWriter(kube, "berth-system", "n1").publish(report, None))
    restarted = ReportWriter(kube, "berth-system", "n1")
    assert run(restarted.load()) == report
    assert run(restarted.publish(report, None)) is False


def test_writer_refuses_a_configmap_berth_did_not_write() -> None:
    kube = FakeKube()
    kube.put(CONFIGMAPS, {"metadata": {"name": report_configmap("n1")}, "data": {}})
    with pytest.raises(NotOurs):
        run(ReportWriter(kube, "berth-system", "n1").load())


def test_agent_polls_reserve_and_report(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.put("/api/v1/nodes", {"metadata": {"name": "n1", "labels": {}}})
    proc_root = tmp_path / "proc"
    fake_proc(proc_root, port_range="20000 60999\n", reserved="25000\n")
    config = AgentConfig(
        node="n1",
        proc=str(proc_root),
        reserve=True,
        default_pool=Pool("default", (PortRange(20000, 20099),)),
    )
    url = f"{CONFIGMAPS}/{report_configmap('n1')}"

    async def scenario() -> None:
        agent = Agent(config, kube)
        await agent.start()
        assert await agent.step() is True
        running = kube.at(url)
        assert running is not None
        assert running["data"]["agentReserved"] == "20000-20099"
        assert running["data"]["kernelReserved"] == "20000-20099,25000"
        assert await agent.step() is False  # nothing changed: no write
        await agent.stop()

    run(scenario())
    stored = kube.at(url)
    assert stored is not None
    # The last write says the reservation is gone; the kernel has what it had.
    assert stored["data"]["agentReserved"] == ""
    assert stored["data"]["kernelReserved"] == "25000"
    assert stored["data"]["tcp"] == "20005-20006"
    assert ProcFS(proc_root).reserved_ports() == (PortRange(25000, 25000),)


def test_agent_config_from_env() -> None:
    config = AgentConfig.from_env(
        {
            "BERTH_AGENT_NODE": "gpu-1",
            "BERTH_AGENT_RESERVE": "true",
            "BERTH_AGENT_PROC": "/host/proc",
            "BERTH_DEFAULT_POOL": "21000-21999",
            "BERTH_NAMESPACE": "ops",
        }
    )
    assert (config.node, config.reserve, config.proc, config.namespace) == (
        "gpu-1",
        True,
        "/host/proc",
        "ops",
    )
    assert config.default_pool.ranges == (PortRange(21000, 21999),)
    with pytest.raises(SystemExit):
        AgentConfig.from_env({})
