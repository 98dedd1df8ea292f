"""The node agent (``python -m berth.agent``) against a real API server.

The agent runs as a plain process on this machine, reporting for one of the
local control plane's kwok nodes: this machine's host network namespace is
what a hostNetwork agent pod on a real node would read. Its identity is the
chart's (templates/agent-rbac.yaml, ``reserveKernelPorts`` on, so every rule
the agent can be given), through a ServiceAccount token.

* RBAC: the agent does its job with those rules and no refusal; each verb
  taken away in turn gets exactly that call refused; calls outside its job
  are refused.
* A process bound to a pool port outside any pod is never handed out, and a
  listener inside a block of a pod without hostNetwork is a PortConflict.
* A node whose ephemeral floor is lowered into its pool is flagged (Event on
  the Node, NodePortPool status, ``berth ranges``). This machine's sysctls are
  shared with every other test, so the agent reads a fake /proc tree
  (``BERTH_AGENT_PROC``) here; its parsers are checked on real /proc content
  in tests/unit/test_agent.py and on the real /proc by the listener test.
* With the kernel reservation, an outgoing connection storm never takes a
  pool port. net.ipv4 sysctls are per network namespace, so the agent and the
  storm run in a namespace of their own (``ip netns``, root needed), reaching
  the API server through a Unix-socket bridge; the namespace is deleted after.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from tests.integration.test_rbac import (
    applied,
    apply,
    granted,
    helm_binary,
    without,
    write_kubeconfig,
)
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    all_allocated,
    apply_deployment,
    custom_deployment,
    install_crds,
    pods_of,
)

from berth.agent.report import REPORT_SELECTOR, report_configmap
from berth.allocator.ranges import PortRange
from berth.pods import decode_ports

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
ACCOUNT = "berth-agent"
POOL = PortRange(27000, 27063)
POOL_NAME = "node-agent-test"

Body = dict[str, Any]


# --- the agent's identity, a pool for its node, the processes ---------------


def render_agent_rbac() -> list[Body]:
    args = [helm_binary(), "template", "berth", str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--set", "agent.enabled=true", "--set", "agent.reserveKernelPorts=true"]
    args += ["--show-only", "templates/agent-rbac.yaml"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def agent_rbac(cluster: Any) -> Iterator[list[Body]]:
    with applied(cluster, render_agent_rbac()) as docs:
        yield docs


@pytest.fixture(scope="module")
def agent_kubeconfig(cluster: Any, agent_rbac: list[Body], tmp_path_factory: Any) -> str:
    token = cluster.kubectl(
        "create", "token", ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=2h"
    ).stdout.strip()
    return write_kubeconfig(cluster, token, tmp_path_factory.mktemp("agent") / "kubeconfig")


@pytest.fixture(scope="module")
def node(cluster: Any) -> Iterator[str]:
    """A kwok node whose pool (highest priority) is POOL; reports removed after."""
    if cluster.external:
        pytest.skip("the agent reports this machine's sockets: local control plane only")
    name: str = cluster.nodes[-1]
    install_crds(cluster)
    pool = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": POOL_NAME},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": name}},
            "ranges": [{"start": POOL.start, "end": POOL.end}],
            "priority": 1000,
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pool))
    yield name
    cluster.kubectl("delete", "nodeportpool", POOL_NAME, "--wait=false", check=False)


@pytest.fixture(autouse=True)
def no_reports_left(cluster: Any) -> Iterator[None]:
    """Reports of this machine's sockets must not outlive the test that made them."""
    yield
    cluster.kubectl(
        "delete", "configmap", "-n", OPERATOR_NAMESPACE, "-l", REPORT_SELECTOR, check=False
    )


@dataclass
class AgentProcess:
    node: str
    kubeconfig: str
    log: Path
    env: dict[str, str]
    prefix: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "BERTH_NAMESPACE": OPERATOR_NAMESPACE,
            "BERTH_AGENT_NODE": self.node,
            "BERTH_AGENT_INTERVAL": "0.3",
            "BERTH_AGENT_POOL_INTERVAL": "1",
            **self.env,
        }
        with self.log.open("a") as out:
            command = [*self.prefix, sys.executable, "-m", "berth.agent"]
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> int:
        """SIGTERM, as a DaemonSet delete sends; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def said(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def report(cluster: Any, node: str) -> Body | None:
    out = cluster.kubectl(
        "get", "configmap", report_configmap(node), "-n", OPERATOR_NAMESPACE, "-o", "json",
        check=False,
    )  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else None


def reported(cluster: Any, node: str, key: str) -> str | None:
    body = report(cluster, node)
    return None if body is None else str(body["data"].get(key, ""))


def ports_in(text: str | None) -> set[int]:
    spans = [PortRange.parse(part) for part in (text or "").split(",") if part]
    return {port for span in spans for port in range(span.start, span.end + 1)}


def fake_proc(root: Path, port_range: str = "32768 60999") -> Path:
    """A /proc tree with the real machine's socket tables and a chosen sysctl."""
    (root / "net").mkdir(parents=True)
    (root / "sys/net/ipv4").mkdir(parents=True)
    for table in ("tcp", "tcp6", "udp", "udp6"):
        source = Path("/proc/net") / table
        if source.exists():
            (root / "net" / table).write_text(source.read_text())
    (root / "sys/net/ipv4/ip_local_port_range").write_text(f"{port_range}\n")
    (root / "sys/net/ipv4/ip_local_reserved_ports").write_text("\n")
    return root


# --- the chart's agent objects on the API server -------------------------------


@pytest.mark.parametrize("reserve", [False, True])
def test_agent_objects_pass_server_side_validation(
    cluster: Any, namespace: str, reserve: bool
) -> None:
    args = [helm_binary(), "template", "berth", str(CHART), "--namespace", namespace]
    args += ["--set", "agent.enabled=true", "--set", f"agent.reserveKernelPorts={reserve}"]
    for template in ("agent-daemonset.yaml", "agent-rbac.yaml"):
        args += ["--show-only", f"templates/{template}"]
    manifest = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/warn=restricted")
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert "daemonset.apps/berth-agent created (server dry run)" in out.stdout
    # Why the agent is off by default: no hostNetwork under the restricted standard.
    assert "would violate PodSecurity" in out.stderr and "hostNetwork" in out.stderr


# --- RBAC: sufficient, necessary, nothing else --------------------------------

RBAC_DENIAL = re.compile(r"cannot [a-z]+ resource")


def run_agent_until(
    cluster: Any, node: str, kubeconfig: str, tmp_path: Path, refusal: re.Pattern[str] | None
) -> str:
    """Run the agent through its whole job: resume, read its node and pools,
    create its report, replace it after a change. Returns its log."""
    cluster.kubectl(
        "delete", "configmap", report_configmap(node), "-n", OPERATOR_NAMESPACE, check=False
    )
    proc_root = fake_proc(tmp_path / secrets.token_hex(4))
    log = tmp_path / f"agent-{secrets.token_hex(4)}.log"
    agent = AgentProcess(
        node, kubeconfig, log, {"BERTH_AGENT_PROC": str(proc_root), "BERTH_AGENT_RESERVE": "true"}
    ).start()
    try:

        def refused() -> bool:
            return refusal is not None and bool(refusal.search(agent.said()))

        wait_for(
            lambda: refused() or reported(cluster, node, "agentReserved") == str(POOL),
            timeout=30,
            what="the first report (the pool reserved in the fake /proc)",
        )
        if not refused():
            (proc_root / "net/tcp").write_text((proc_root / "net/tcp").read_text().split("\n")[0])
            (proc_root / "net/tcp6").write_text("")
            wait_for(
                lambda: refused() or reported(cluster, node, "tcp") == "",
                timeout=30,
                what="the report replaced after a change",
            )
    finally:
        assert agent.stop() == 0, agent.said()[-3000:]
    return agent.said()


def test_agent_rbac_is_sufficient_and_necessary(
    cluster: Any, node: str, agent_rbac: list[Body], agent_kubeconfig: str, tmp_path: Path
) -> None:
    said = run_agent_until(cluster, node, agent_kubeconfig, tmp_path, None)
    assert not RBAC_DENIAL.search(said), said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    body = report(cluster, node)
    assert body is not None
    node_uid = cluster.json("get", "node", node)["metadata"]["uid"]
    owner = body["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Node", node, node_uid)
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "berth"
    # Stopped: its reservation was taken back and the last report says so.
    assert body["data"]["agentReserved"] == ""

    perms = sorted(granted(agent_rbac))
    assert perms == [
        ("ClusterRole", "", "nodes", "get"),
        ("ClusterRole", "berth.dev", "nodeportpools", "list"),
        ("Role", "", "configmaps", "create"),
        ("Role", "", "configmaps", "get"),
        ("Role", "", "configmaps", "update"),
    ]
    try:
        for perm in perms:
            _, _, resource, verb = perm
            apply(cluster, without(agent_rbac, perm))
            refusal = re.compile(rf'cannot {verb} resource \\?"{resource}\\?"')
            said = run_agent_until(cluster, node, agent_kubeconfig, tmp_path, refusal)
            assert refusal.search(said), f"{perm} was not needed:\n{said[-2000:]}"
    finally:
        apply(cluster, [d for d in agent_rbac if d["kind"] in ("ClusterRole", "Role")])


@pytest.mark.parametrize(
    "args",
    [
        ["get", "configmaps", "-n", "kube-system"],
        ["get", "secrets", "-n", OPERATOR_NAMESPACE],
        ["get", "nodes"],
        ["get", "pods", "-A"],
        ["label", "node", "NODE", "berth.dev/agent-test=x"],
        ["delete", "configmap", "berth-node.NODE", "-n", OPERATOR_NAMESPACE],
        ["create", "configmap", "x", "-n", "default"],
        ["patch", "nodeportpool", POOL_NAME, "--type=merge", "-p", '{"spec":{"priority":1}}'],
    ],
)
def test_agent_is_refused_outside_its_job(
    cluster: Any, node: str, agent_kubeconfig: str, args: list[str]
) -> None:
    args = [a.replace("NODE", node) for a in args]
    out = cluster.kubectl("--kubeconfig", agent_kubeconfig, *args, check=False)
    assert out.returncode != 0
    assert "forbidden" in out.stderr.lower(), out.stderr


# --- listeners and the ephemeral range, with a real operator ------------------


@pytest.fixture(scope="module")
def operator(cluster: Any, node: str, tmp_path_factory: Any) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(
        cluster.kubeconfig, log, env={"BERTH_NODE_REPORT_INTERVAL": "0.3"}
    ).start()
    wait_for(lambda: "berth started" in log.read_text(), timeout=60, what="operator start-up")
    yield proc
    proc.stop()
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def operator_saw(operator: OperatorProcess, node: str, mark: int) -> bool:
    """The operator logged a change of ``node``'s report after offset ``mark``."""
    return f"node {node} report:" in operator.log.read_text()[mark:]


@pytest.fixture
def agent(cluster: Any, node: str, agent_kubeconfig: str, tmp_path: Path) -> Iterator[AgentProcess]:
    started = AgentProcess(node, agent_kubeconfig, tmp_path / "agent.log", {})
    yield started
    if started.proc is not None:
        started.stop()


def bound(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("0.0.0.0", port))
    sock.listen()
    return sock


def events_about(cluster: Any, namespace: str, name: str, reason: str) -> list[Body]:
    selector = f"involvedObject.name={name},reason={reason}"
    items: list[Body] = cluster.json(
        "get", "events", "-n", namespace, "--field-selector", selector
    )["items"]
    return items


def delivered_ports(cluster: Any, namespace: str, name: str) -> dict[str, PortRange]:
    (pod,) = pods_of(cluster, namespace, name)
    return decode_ports(pod["metadata"]["annotations"]["berth.dev/ports"])


def test_a_process_bound_to_a_pool_port_is_never_handed_out(
    cluster: Any, node: str, namespace: str, operator: OperatorProcess, agent: AgentProcess
) -> None:
    mark = len(operator.log.read_text())
    with bound(POOL.start):  # the lowest port: the first any allocation would take
        agent.start()
        wait_for(
            lambda: POOL.start in ports_in(reported(cluster, node, "tcp")),
            timeout=30,
            what=f"the agent to report the listener on {POOL.start}",
        )
        wait_for(lambda: operator_saw(operator, node, mark), timeout=30, what="operator read it")
        apply_deployment(cluster, namespace, custom_deployment("listener", replicas=1, node=node))
        wait_for(lambda: all_allocated(cluster, namespace, "listener", 1), what="ports")
        blocks = delivered_ports(cluster, namespace, "listener")
    ports = {p for span in blocks.values() for p in range(span.start, span.end + 1)}
    assert POOL.start not in ports
    assert all(span.start in POOL and span.end in POOL for span in blocks.values()), blocks


def test_a_listener_inside_a_block_of_a_pod_without_host_network_is_a_conflict(
    cluster: Any, node: str, namespace: str, operator: OperatorProcess, agent: AgentProcess
) -> None:
    manifest = custom_deployment("own-netns", replicas=1, node=node)
    manifest["spec"]["roles"][0]["template"]["spec"]["hostNetwork"] = False
    apply_deployment(cluster, namespace, manifest)
    wait_for(lambda: all_allocated(cluster, namespace, "own-netns", 1), what="ports")
    side = delivered_ports(cluster, namespace, "own-netns")["side"]
    (pod,) = pods_of(cluster, namespace, "own-netns")
    agent.start()
    with bound(side.start):

        def conflict_events() -> list[str]:
            found = events_about(cluster, namespace, pod["metadata"]["name"], "PortConflict")
            return [e["message"] for e in found]

        messages = wait_for(conflict_events, timeout=30, what="a PortConflict Event")
    assert f"ports {side.start} claimed by {namespace}/own-netns-worker-0" in messages[0]
    assert "TCP listener on the node" in messages[0]


def test_a_lowered_ephemeral_floor_is_flagged(
    cluster: Any,
    node: str,
    namespace: str,
    *,
    operator: OperatorProcess,
    agent: AgentProcess,
    tmp_path: Path,
) -> None:
    # A ledger on the node with its pool, for `berth ranges` to compare with.
    apply_deployment(cluster, namespace, custom_deployment("floor", replicas=1, node=node))
    wait_for(lambda: all_allocated(cluster, namespace, "floor", 1), what="ports")
    floor = POOL.end - 31
    agent.env["BERTH_AGENT_PROC"] = str(fake_proc(tmp_path / "proc", f"{floor} 60999"))
    agent.start()
    overlap = f"{floor}-{POOL.end}"

    expected = f"ports {overlap} of pool {POOL_NAME}"

    def node_events() -> list[str]:
        # Events outlive a test (and a kept cluster has older ones): find this one.
        found = events_about(cluster, "default", node, "EphemeralPortOverlap")
        return [
            e["message"]
            for e in found
            if e["involvedObject"]["kind"] == "Node" and expected in e["message"]
        ]

    wait_for(node_events, timeout=30, what=f"an EphemeralPortOverlap Event saying {expected}")
    wait_for(
        lambda: (
            cluster.json("get", "nodeportpool", POOL_NAME).get("status", {}).get("ephemeralOverlap")
            == [node]
        ),
        timeout=30,
        what="the pool's status to name the node",
    )
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    out = subprocess.run(
        [sys.executable, "-m", "berth.cli.main", "ranges", "--namespace", OPERATOR_NAMESPACE],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    section = out.split(f"\n{node}  ", 1)[1] if f"\n{node}  " in out else out
    assert f"ephemeral={floor}-60999" in section
    assert f"CONFLICT ephemeral range overlaps the pool at {overlap}" in section


# --- the kernel reservation, in a network namespace of its own ---------------

#: A TCP/Unix-socket forwarder: ``python -c FORWARD LISTEN CONNECT``, each
#: ``tcp:HOST:PORT`` or ``unix:PATH``. Prints "ready" once it listens.
FORWARD = r"""
import asyncio, sys

def endpoint(spec):
    kind, _, where = spec.partition(":")
    if kind == "unix":
        return {"path": where}, asyncio.start_unix_server, asyncio.open_unix_connection
    host, _, port = where.rpartition(":")
    return {"host": host, "port": int(port)}, asyncio.start_server, asyncio.open_connection

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def main(listen, connect):
    where, serve, _ = endpoint(listen)
    target, _, dial = endpoint(connect)
    async def handle(reader, writer):
        upstream_reader, upstream_writer = await dial(**target)
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )
    server = await serve(handle, **where)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

#: ``python -c STORM N PORT``: N connections to a local listener, the local
#: (ephemeral) port of each printed as JSON.
STORM = r"""
import json, socket, sys
count, port = int(sys.argv[1]), int(sys.argv[2])
server = socket.socket()
server.bind(("127.0.0.1", port))
server.listen(4096)
clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print(json.dumps([c.getsockname()[1] for c in clients]))
"""

EPHEMERAL = "27000 27999"  # the pool (27000-27063) is inside it
FOUND_RESERVED = "27010,28500"  # one inside the pool, one outside: both stay
STORM_SIZE = 600
STORM_PORT = 26500


@dataclass
class NetNS:
    name: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *args], capture_output=True, text=True, check=check
        )

    def sysctl(self, key: str, value: str | None = None) -> str:
        path = f"/proc/sys/net/ipv4/{key}"
        if value is not None:
            self.run("sh", "-c", f"echo '{value}' > {path}")
        return self.run("cat", path).stdout.strip()

    def storm(self) -> set[int]:
        out = self.run(sys.executable, "-c", STORM, str(STORM_SIZE), str(STORM_PORT)).stdout
        return set(json.loads(out))


@pytest.fixture
def netns(cluster: Any, tmp_path: Path) -> Iterator[NetNS]:
    """A network namespace with loopback up, whose 127.0.0.1:<API port> is the API server."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the kernel reservation test needs root and iproute2 (ip netns)")
    ns = NetNS(f"berth-agent-{secrets.token_hex(3)}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    bridges: list[subprocess.Popen[str]] = []
    try:
        ns.run("ip", "link", "set", "lo", "up")
        config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
        api = f"tcp:127.0.0.1:{urlparse(config['clusters'][0]['cluster']['server']).port}"
        sock = tmp_path / "api.sock"
        for prefix, listen, connect in (
            ((), f"unix:{sock}", api),
            (("ip", "netns", "exec", ns.name), api, f"unix:{sock}"),
        ):
            bridge = subprocess.Popen(
                [*prefix, sys.executable, "-c", FORWARD, listen, connect],
                stdout=subprocess.PIPE,
                stderr=(tmp_path / "bridge.log").open("a"),
                text=True,
            )
            bridges.append(bridge)
            assert bridge.stdout is not None and bridge.stdout.readline().strip() == "ready"
        yield ns
    finally:
        for bridge in bridges:
            bridge.kill()
            bridge.wait(5)
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


def test_kernel_reservation_keeps_a_connection_storm_out_of_the_pool(
    cluster: Any, node: str, agent_kubeconfig: str, netns: NetNS, tmp_path: Path
) -> None:
    netns.sysctl("ip_local_port_range", EPHEMERAL)
    netns.sysctl("ip_local_reserved_ports", FOUND_RESERVED)
    pool = set(range(POOL.start, POOL.end + 1))
    # Without the reservation the storm does take pool ports (so the test can fail).
    assert netns.storm() & pool

    agent = AgentProcess(
        node,
        agent_kubeconfig,
        tmp_path / "agent.log",
        {"BERTH_AGENT_RESERVE": "true"},
        prefix=("ip", "netns", "exec", netns.name),
    ).start()
    try:
        wait_for(
            lambda: reported(cluster, node, "kernelReserved") == f"{POOL},28500",
            timeout=30,
            what="the agent to reserve the pool",
        )
        assert netns.sysctl("ip_local_reserved_ports") == f"{POOL},28500"
        # What it found inside the pool (27010) is not its own.
        assert reported(cluster, node, "agentReserved") == f"{POOL.start}-27009,27011-{POOL.end}"
        taken = netns.storm()
        assert len(taken) == STORM_SIZE
        assert not taken & pool, sorted(taken & pool)[:10]
    finally:
        code = agent.stop()
    assert code == 0, agent.said()[-3000:]
    # Uninstall (SIGTERM): only what the agent added is gone.
    assert netns.sysctl("ip_local_reserved_ports") == FOUND_RESERVED
    assert reported(cluster, node, "agentReserved") == ""
    assert netns.storm() & pool  # and outgoing connections may use the pool again
