"""Two elected operator replicas, and the three ways the active one goes away.

Shared by tests/integration/test_failover.py (asserts the bound) and
scripts/bench_failover.py (prints the figures). Each replica is a real
``python -m berth`` process with leader election on, talking to the API
server through its own TCP relay, so the test can:

* ``kill``: SIGKILL, as when its node dies;
* ``pause``: SIGSTOP, as when its node freezes or goes NotReady: it stops
  renewing but is not dead, and ``resume`` (SIGCONT) brings it back stale;
* ``cut``: its relay drops every connection and refuses new ones, as when
  its node is partitioned from the API server while it keeps running.

A failover is timed from that moment to the first ``berth.dev/ports``
annotation on a pod created right after it: allocation has resumed.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from kubernetes import client, watch
from tests.support.operator_process import OperatorProcess, audit_lines, free_port, wait_for
from urllib3.exceptions import ProtocolError

from berth.allocator.ranges import PortRange
from berth.names import (
    ANNOTATION_PORT_PLAN,
    ANNOTATION_PORTS,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from berth.plan import EnvBinding, PlanBlock, PortPlan, RolePlan
from berth.pods import decode_ports

PLAN = PortPlan(
    RolePlan(
        blocks=(
            PlanBlock("http", 1, 1, (EnvBinding("HTTP_PORT", "start"),)),
            PlanBlock("side", 4, 1, (EnvBinding("SIDE_PORT", "start"),)),
        )
    ),
    0,
).encode()

# The operator's defaults, written out: the test's bound is derived from them.
LEASE = {
    "BERTH_LEASE_DURATION": "8",
    "BERTH_LEASE_RENEW_DEADLINE": "5",
    "BERTH_LEASE_RENEW_PERIOD": "2",
    "BERTH_LEASE_RETRY_PERIOD": "1",
}


def bound_pod(name: str, node: str) -> dict[str, Any]:
    """A Berth worker already bound to ``node``: the operator allocates it at once."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: "failover"},
            "annotations": {ANNOTATION_PORT_PLAN: PLAN},
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "enableServiceLinks": False,
            "containers": [{"name": "engine", "image": "engine:1"}],
        },
    }


class Relay:
    """A TCP relay to the API server that can be cut (a network partition)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cut_off = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if self.cut_off:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._open |= {conn, upstream}
            threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self.cut_off:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Every open connection dies and new ones are refused."""
        self.cut_off = True
        with self._lock:
            socks = list(self._open)
        self._drop(*socks)

    def heal(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()


def _cluster_entry(config: dict[str, Any]) -> dict[str, Any]:
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    entry: dict[str, Any] = next(
        c for c in config["clusters"] if c["name"] == context["context"]["cluster"]
    )
    return entry


def api_address(kubeconfig: str) -> tuple[str, int]:
    server = urlsplit(
        _cluster_entry(yaml.safe_load(Path(kubeconfig).read_text()))["cluster"]["server"]
    )
    assert server.hostname and server.port, server
    return server.hostname, server.port


def relayed_kubeconfig(kubeconfig: str, port: int, path: Path) -> str:
    """The kubeconfig with its server moved to the relay on ``port``."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    entry = _cluster_entry(config)
    host, _ = api_address(kubeconfig)
    entry["cluster"]["server"] = f"https://{host}:{port}"
    ca = entry["cluster"].get("certificate-authority")
    if ca and not Path(ca).is_absolute():
        entry["cluster"]["certificate-authority"] = str(Path(kubeconfig).parent / ca)
    for user in config.get("users", []):
        for key in ("client-certificate", "client-key"):
            value = user.get("user", {}).get(key)
            if value and not Path(value).is_absolute():
                user["user"][key] = str(Path(kubeconfig).parent / value)
    path.write_text(yaml.safe_dump(config))
    return str(path)


@dataclass
class Replica:
    """One elected operator process (restartable under a new pod-like name)."""

    name: str
    kubeconfig: str
    workdir: Path
    lease: str
    relay: Relay | None = None
    process: OperatorProcess | None = None
    generation: int = 0
    health_port: int = field(default_factory=free_port)

    @property
    def identity(self) -> str:
        return f"{self.name}-{self.generation}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.identity}.log"

    def start(self) -> Replica:
        """A fresh process, as a replacement pod would be: a new identity."""
        self.generation += 1
        if self.relay is None:
            self.relay = Relay(api_address(self.kubeconfig))
        self.relay.heal()
        config = relayed_kubeconfig(
            self.kubeconfig, self.relay.port, self.workdir / f"{self.name}.kubeconfig"
        )
        env = {
            "BERTH_LEADER_ELECTION": "true",
            "BERTH_LEASE_NAME": self.lease,
            "BERTH_POD_NAME": self.identity,
            **LEASE,
        }
        liveness = f"--liveness=http://127.0.0.1:{self.health_port}/healthz"
        self.process = OperatorProcess(config, self.log, env=env, args=(liveness,)).start()
        return self

    def health(self) -> tuple[int, str]:
        """The health endpoint's answer (the chart's probes ask it), or (0, why)."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except OSError as error:
            return 0, str(error)

    def said(self, text: str) -> bool:
        return self.log.exists() and text in self.log.read_text()

    @property
    def proc(self) -> Any:
        assert self.process is not None and self.process.proc is not None
        return self.process.proc

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def cut(self) -> None:
        assert self.relay is not None
        self.relay.cut()

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        if self.process is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.resume()
            self.process.stop()
        if self.relay is not None:
            self.relay.close()
            self.relay = None

    def allocations_since(self, epoch: float) -> list[dict[str, Any]]:
        """Audit ``allocate`` lines this process stamped at or after ``epoch``."""
        if not self.log.exists():
            return []
        return [
            line
            for line in audit_lines(self.log)
            if line["audit"] == "allocate"
            and datetime.fromisoformat(line["ts"]).timestamp() >= epoch
        ]


def holder(core: client.CoordinationV1Api, namespace: str, lease: str) -> str:
    try:
        body = core.read_namespaced_lease(lease, namespace)
    except client.ApiException as error:
        if error.status == 404:
            return ""
        raise
    return str(body.spec.holder_identity or "")


class PortsLog:
    """Every ``berth.dev/ports`` annotation the API server publishes in one
    namespace, from a watch: what each pod was delivered, and whether any
    delivery ever changed or overlapped another's on the same node."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.delivered: dict[str, tuple[str, str, float]] = {}  # uid -> (node, text, seen)
        self.changed: list[str] = []
        self._core = core
        self._namespace = namespace
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PortsLog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._watch.stop()
        self._thread.join(5)

    def _run(self) -> None:
        stream = self._watch.stream(
            self._core.list_namespaced_pod,
            self._namespace,
            label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}",
        )
        with contextlib.suppress(ProtocolError):
            for event in stream:
                pod = event["object"]
                text = (pod.metadata.annotations or {}).get(ANNOTATION_PORTS)
                if not text:
                    continue
                uid = pod.metadata.uid
                known = self.delivered.setdefault(uid, (pod.spec.node_name, text, time.time()))
                if known[1] != text:
                    self.changed.append(f"{pod.metadata.name}: {known[1]} -> {text}")

    def overlaps(self) -> list[str]:
        """Pairs of pods on one node delivered a common port (none is ever deleted here)."""
        spans: dict[str, list[tuple[PortRange, str]]] = {}
        for uid, (node, text, _) in self.delivered.items():
            for block, rng in decode_ports(text).items():
                spans.setdefault(node, []).append((rng, f"{uid}/{block}"))
        found = []
        for node, held in spans.items():
            held.sort(key=lambda item: item[0].start)
            for (a, who_a), (b, who_b) in pairwise(held):
                if b.start <= a.end:
                    found.append(f"{node}: {who_a} {a} and {who_b} {b}")
        return found


@dataclass
class Pair:
    """An active and a standby replica on one Lease, and probe pods to time them."""

    api: client.ApiClient
    kubeconfig: str
    namespace: str
    nodes: list[str]
    workdir: Path
    lease: str
    operator_namespace: str = "berth-system"
    replicas: list[Replica] = field(default_factory=list)
    probes: int = 0

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)

    def start(self) -> Pair:
        for name in ("a", "b"):
            replica = Replica(name, self.kubeconfig, self.workdir, self.lease).start()
            self.replicas.append(replica)
            if name == "a":  # a first: a is active, b the standby
                self.wait_active(replica, timeout=60)
        self.wait_standby(self.replicas[1])
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def holder(self) -> str:
        return holder(self.coordination, self.operator_namespace, self.lease)

    def active(self) -> Replica:
        current = self.holder()
        return next(r for r in self.replicas if r.identity == current)

    def standby(self) -> Replica:
        return next(r for r in self.replicas if r is not self.active())

    def wait_active(self, replica: Replica, timeout: float) -> None:
        wait_for(
            lambda: self.holder() == replica.identity and replica.said("berth started"),
            timeout=timeout,
            what=f"{replica.identity} to lead",
        )
        self.allocate_probe(timeout)  # its watches run: it allocates

    def wait_standby(self, replica: Replica) -> None:
        wait_for(lambda: replica.said("standby: lease held by"), timeout=60, what="a warm standby")

    def create_probe(self) -> str:
        self.probes += 1
        name = f"probe-{self.probes}"
        node = self.nodes[self.probes % len(self.nodes)]
        try:
            self.core.create_namespaced_pod(self.namespace, bound_pod(name, node))
        except client.ApiException as error:
            if error.status != 409:  # 409: the client's own retry of a slow create
                raise
        return name

    def delivered(self, name: str) -> bool:
        pod = self.core.read_namespaced_pod(name, self.namespace)
        return bool((pod.metadata.annotations or {}).get(ANNOTATION_PORTS))

    def wait_delivered(self, name: str, timeout: float) -> float:
        """Seconds until ``name`` has its ports annotation."""
        started = time.monotonic()
        wait_for(lambda: self.delivered(name), timeout=timeout, interval=0.05, what=name)
        return time.monotonic() - started

    def allocate_probe(self, timeout: float = 30) -> float:
        return self.wait_delivered(self.create_probe(), timeout)

    def fail_over(self, how: str, timeout: float = 60) -> tuple[Replica, float]:
        """Take the active replica away (kill, pause, cut or term); the seconds until a
        pod created at that moment has its ports. Returns the old active."""
        old = self.active()
        other = self.standby()
        self.wait_standby(other)
        started = time.monotonic()
        {"kill": old.kill, "pause": old.pause, "cut": old.cut, "term": old.terminate}[how]()
        if how == "term":  # until it is gone it may still serve (it holds the Lease)
            old.proc.wait(30)
        probe = self.create_probe()
        wait_for(lambda: self.delivered(probe), timeout=timeout, interval=0.05, what=probe)
        elapsed = time.monotonic() - started
        assert self.holder() == other.identity, (self.holder(), other.identity)
        return old, elapsed

    def replace(self, old: Replica) -> None:
        """The old replica's replacement: a new process, a new identity, a standby."""
        old.stop()
        old.start()
        self.wait_standby(old)


def exited_on_its_own(replica: Replica, timeout: float) -> int | None:
    """The exit code, if the process left within ``timeout``."""
    with contextlib.suppress(Exception):
        return int(replica.proc.wait(timeout))
    return None
