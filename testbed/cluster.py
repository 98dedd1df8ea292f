"""A real, local Kubernetes control plane for Berth's tests and demo.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as
plain processes on 127.0.0.1, from the binaries that ``hack/build-tools.sh``
builds from Go modules and caches by version. kwok plays the kubelet of N
fake GPU nodes: it marks them Ready, renews their leases, and moves scheduled
pods to Running with an IP. Beside them, M real nodes (testbed.realnode) run
a real kubelet and containerd, whose containers really bind ports.

DIR holds ``kubeconfig`` (admin), ``state.json`` (pids, ports, nodes),
``logs/<component>.log``, ``pki/``, the etcd data and ``nodes/<real node>/``.
Ports are picked free at start-up, so several clusters can run on one machine.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import json
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from testbed import images
from testbed.pki import Pki, kubeconfig_text, make_pki
from testbed.procs import (
    Api,
    ClusterError,
    Proc,
    Supervisor,
    healthz,
    http_json,
    proc_start_ticks,
    say_nothing,
    say_stderr,
)
from testbed.realnode import RealNode, check_host, delete_pods_on, is_ready
from testbed.toolchain import Toolchain

# Start order; ``down`` stops them in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

# Fake nodes: every node gets these labels and resources (see docs/local-cluster.md).
NODE_PREFIX = "kwok-gpu-"
NODE_LABELS = {
    "type": "kwok",
    "kubernetes.io/os": "linux",
    "kubernetes.io/arch": "amd64",
    "node.kubernetes.io/instance-type": "kwok-gpu-8x",
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.product": "KWOK-FAKE-GPU",
    "berth.dev/node-group": "gpu",
}
GPUS_PER_NODE = 8
NODE_CPU = "128"
NODE_MEMORY = "1Ti"
NODE_EPHEMERAL_STORAGE = "2Ti"
# Node i gets InternalIP NODE_IP_BASE + i (what hostNetwork pods see as
# podIP/hostIP) and pod CIDR number i of POD_CIDR_POOL cut into /20s (4094
# pod IPs per node, up to 2048 nodes). kwok's --cidr is the fallback for
# nodes without spec.podCIDR (ones a test creates itself).
NODE_IP_BASE = ipaddress.IPv4Address("172.18.0.10")
POD_CIDR_POOL = ipaddress.IPv4Network("10.128.0.0/9")
POD_CIDR_PREFIX = 20
KWOK_FALLBACK_CIDR = "10.0.0.0/16"
# kwok manages only the nodes with this annotation (the fake ones).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_POD_WORKERS = 16
KWOK_NODE_WORKERS = 8
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


def node_name(i: int) -> str:
    return f"{NODE_PREFIX}{i}"


def node_ip(i: int) -> str:
    return str(NODE_IP_BASE + i)


def node_pod_cidr(i: int) -> str:
    size = 1 << (POD_CIDR_PREFIX - POD_CIDR_POOL.prefixlen)
    if i >= size:
        raise ClusterError(f"at most {size} nodes")
    block = 1 << (32 - POD_CIDR_PREFIX)
    base = POD_CIDR_POOL.network_address + i * block
    return str(ipaddress.IPv4Network((base, POD_CIDR_PREFIX)))


def node_manifest(i: int, max_pods: int) -> dict[str, Any]:
    """A fake GPU node. Status is accepted on create (as from a kubelet);
    kwok's node-initialize stage keeps the addresses and resources given here.
    """
    name = node_name(i)
    resources = {
        "cpu": NODE_CPU,
        "memory": NODE_MEMORY,
        "ephemeral-storage": NODE_EPHEMERAL_STORAGE,
        "pods": str(max_pods),
        "nvidia.com/gpu": str(GPUS_PER_NODE),
    }
    cidr = node_pod_cidr(i)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {**NODE_LABELS, "kubernetes.io/hostname": name},
            "annotations": {
                KWOK_NODE_ANNOTATION: "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": node_ip(i)},
                {"type": "Hostname", "address": name},
            ],
        },
    }


class LocalCluster:
    """One local control plane whose state lives in ``dir``."""

    def __init__(self, dir: str | os.PathLike[str], tools: Toolchain | None = None) -> None:
        self.dir = Path(dir).resolve()
        self.tools = tools or Toolchain.from_env()
        self.pki = Pki(self.dir / "pki")
        self._say: Callable[[str], None] = say_stderr

    # paths
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def etcd_data(self) -> Path:
        return self.dir / "etcd-data"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    # state
    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def processes(self) -> list[Proc]:
        """Recorded components, in start order."""
        return [Proc.from_json(n, p) for n, p in self.state().get("processes", {}).items()]

    def real_nodes(self) -> list[RealNode]:
        return [
            RealNode(self.dir, i, self.tools)
            for i in range(len(self.state().get("real_nodes", {})))
        ]

    def _strays(self) -> list[Proc]:
        """Our binaries still running with this DIR in their arguments: left
        behind by an ``up`` that died before it recorded them."""
        mine = {
            str(p)
            for p in (
                self.tools.etcd,
                self.tools.kube_apiserver,
                self.tools.kube_controller_manager,
                self.tools.kube_scheduler,
                self.tools.kwok,
                self.tools.kubelet,
                shutil.which("containerd") or "/usr/bin/containerd",
            )
        }
        found: list[Proc] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except OSError:
                continue
            if not argv or argv[0] not in mine:
                continue
            if not any(str(self.dir) + "/" in a for a in argv[1:]):
                continue
            pid = int(entry.name)
            ticks = proc_start_ticks(pid)
            if ticks is not None:
                found.append(Proc(Path(argv[0]).name, pid, ticks, argv))
        return found

    def api(self) -> Api:
        server = self.state().get("server")
        if not server:
            raise ClusterError(f"no cluster state in {self.dir}")
        return Api(server, self.pki)

    def is_running(self) -> bool:
        """Every recorded component alive and the API server ready."""
        procs = self.processes()
        expected = len(COMPONENTS) + 2 * len(self.state().get("real_nodes", {}))
        if len(procs) != expected or not all(p.alive() for p in procs):
            return False
        try:
            return self.api().readyz()
        except ClusterError:
            return False

    # ---------------------------------------------------------------- up
    def up(
        self,
        nodes: int = 4,
        *,
        real_nodes: int = 0,
        max_pods: int = 256,
        timeout: float = 180.0,
        die_with_parent: bool = False,
        quiet: bool = False,
    ) -> dict[str, Any]:
        """Start everything, create the nodes, wait until usable; return the state.

        ``die_with_parent``: the components are killed if this thread dies
        (for test sessions, so a killed pytest leaves nothing behind).
        On failure everything started is stopped again (logs are kept).
        """
        self.tools.check(real_nodes=real_nodes > 0)
        if real_nodes:
            check_host()
        node_images = images.node_images() if real_nodes else []
        if any(p.alive() for p in self.processes()) or self._strays():
            raise ClusterError(f"a cluster is already running in {self.dir}; run down first")
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for component in COMPONENTS:
            self.log(component).write_bytes(b"")
        shutil.rmtree(self.etcd_data, ignore_errors=True)
        make_pki(self.pki)
        state: dict[str, Any] = {
            "dir": str(self.dir),
            "versions": self.tools.versions(),
            "kubeconfig": str(self.kubeconfig),
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "ports": {},
            "processes": {},
            "nodes": [node_name(i) for i in range(nodes)],
            "real_nodes": {},
        }
        self._write_state(state)
        self._say = say_nothing if quiet else say_stderr
        sup = Supervisor(
            self.dir,
            self.logs,
            state,
            functools.partial(self._write_state, state),
            die_with_parent=die_with_parent,
            say=self._say,
        )
        try:
            api = self._up(sup, nodes, max_pods, t0 + timeout)
            for i in range(real_nodes):
                RealNode(self.dir, i, self.tools).up(sup, api, self.pki, t0 + timeout, node_images)
        except BaseException:
            with contextlib.suppress(ClusterError):
                self.down(keep_logs=True)
            raise
        state["startup_seconds"] = round(time.monotonic() - t0, 2)
        self._write_state(state)
        self._say(f"ready in {state['startup_seconds']}s: export KUBECONFIG={self.kubeconfig}")
        return state

    # Command lines ------------------------------------------------------

    def _etcd_argv(self, p: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{p['etcd_client']}"
        peer = f"http://127.0.0.1:{p['etcd_peer']}"
        return [
            str(self.tools.etcd),
            "--name=berth",
            f"--data-dir={self.etcd_data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=berth={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=8589934592",
            "--log-level=warn",
        ]

    def _apiserver_argv(self, etcd_port: int, p: dict[str, int]) -> list[str]:
        pki = self.pki
        return [
            str(self.tools.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['kube-apiserver']}",
            # Loopback only: advertise 127.0.0.1 and do not publish it as the
            # `kubernetes` Service's endpoint (loopback endpoints are invalid,
            # and nothing in-cluster could dial it anyway).
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={pki.dir}",
            f"--tls-cert-file={pki.crt('kube-apiserver')}",
            f"--tls-private-key-file={pki.key('kube-apiserver')}",
            f"--client-ca-file={pki.ca}",
            f"--requestheader-client-ca-file={pki.crt('front-proxy-ca')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.crt('front-proxy-client')}",
            f"--proxy-client-key-file={pki.key('front-proxy-client')}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true",
            # logs, exec and port-forward reach a real node's kubelet at its
            # node IP (it has no resolvable hostname).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false",
            "--event-ttl=1h",
            "--max-requests-inflight=800",
            "--max-mutating-requests-inflight=400",
        ]

    def _component_kubeconfig(self, client: str) -> Path:
        return self.dir / f"{client}.kubeconfig"

    def _kcm_argv(self, p: dict[str, int]) -> list[str]:
        kc = self._component_kubeconfig("kube-controller-manager")
        return [
            str(self.tools.kube_controller_manager),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['kube-controller-manager']}",
            f"--cert-dir={self.dir / 'kube-controller-manager-certs'}",
            "--leader-elect=false",
            # Each controller under its own service account, as kubeadm runs it.
            "--use-service-account-credentials=true",
            f"--root-ca-file={self.pki.ca}",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--cluster-signing-cert-file={self.pki.ca}",
            f"--cluster-signing-key-file={self.pki.key('ca')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
            "--profiling=false",
        ]

    def _scheduler_argv(self, p: dict[str, int]) -> list[str]:
        kc = self._component_kubeconfig("kube-scheduler")
        return [
            str(self.tools.kube_scheduler),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['kube-scheduler']}",
            f"--cert-dir={self.dir / 'kube-scheduler-certs'}",
            "--leader-elect=false",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--profiling=false",
        ]

    def _kwok_argv(self) -> list[str]:
        # More workers than kwok's default 4 moving pods through their stages:
        # thousands of pods reach Running sooner (kwok has no client rate
        # limit; as system:masters it is exempt from API priority & fairness).
        config = self.dir / "kwok.yaml"
        config.write_text(
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\n"
            "kind: KwokConfiguration\n"
            "options:\n"
            f"  podPlayStageParallelism: {KWOK_POD_WORKERS}\n"
            f"  nodePlayStageParallelism: {KWOK_NODE_WORKERS}\n"
            f"  nodeLeaseParallelism: {KWOK_NODE_WORKERS}\n"
        )
        return [
            str(self.tools.kwok),
            f"--config={config}",
            f"--kubeconfig={self._component_kubeconfig('kwok')}",
            # Only the fake nodes: on a real node kwok would report pods
            # Running before their sandboxes exist and drop deleted pods from
            # the API while their containers still run.
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--cidr={KWOK_FALLBACK_CIDR}",
            # Leases are the heartbeat the node lifecycle controller reads;
            # without them (kwok's default is none) nodes go NotReady.
            "--node-lease-duration-seconds=40",
            *[f"--config={stage}" for stage in self.tools.kwok_stages],
        ]

    # Start-up -----------------------------------------------------------

    def _up(self, sup: Supervisor, nodes: int, max_pods: int, deadline: float) -> Api:
        """The control plane and the kwok nodes; returns a client of its API server."""
        t = self.tools
        state = sup.state
        start = functools.partial(sup.start, deadline=deadline)

        def etcd_ready(p: dict[str, int]) -> bool:
            body = http_json(f"http://127.0.0.1:{p['etcd_client']}/health")
            return isinstance(body, dict) and body.get("health") == "true"

        self._say(f"starting etcd {t.etcd_version}")
        etcd = start(
            "etcd", ports=["etcd_client", "etcd_peer"], argv=self._etcd_argv, ready=etcd_ready
        )

        def apiserver_ready(p: dict[str, int]) -> bool:
            api = Api(f"https://127.0.0.1:{p['kube-apiserver']}", self.pki)
            return api.readyz()

        self._say(f"starting kube-apiserver {t.k8s_version}")
        apiserver = start(
            "kube-apiserver",
            ports=["kube-apiserver"],
            argv=functools.partial(self._apiserver_argv, state["ports"]["etcd_client"]),
            ready=apiserver_ready,
            others=[etcd],
        )
        api = Api(f"https://127.0.0.1:{state['ports']['kube-apiserver']}", self.pki)
        state["server"] = api.server
        self._write_state(state)

        # The admin kubeconfig is self-contained (copy it anywhere); the
        # components' ones point at the pki files.
        self.kubeconfig.write_text(kubeconfig_text(api.server, self.pki, "admin", embed=True))
        self.kubeconfig.chmod(0o600)
        for client in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._component_kubeconfig(client).write_text(
                kubeconfig_text(api.server, self.pki, client, embed=False)
            )

        # Nodes before kwok and the node lifecycle controller start, so they
        # find them in their first list.
        for i in range(nodes):
            status, body = api.request("POST", "/api/v1/nodes", node_manifest(i, max_pods))
            if status not in (201, 409):
                raise ClusterError(f"creating node {node_name(i)}: HTTP {status}: {body}")

        self._say("starting kube-controller-manager, kube-scheduler, kwok")
        kcm = start(
            "kube-controller-manager",
            ports=["kube-controller-manager"],
            argv=self._kcm_argv,
            ready=healthz("kube-controller-manager"),
            others=[etcd, apiserver],
        )
        sched = start(
            "kube-scheduler",
            ports=["kube-scheduler"],
            argv=self._scheduler_argv,
            ready=healthz("kube-scheduler"),
            others=[etcd, apiserver, kcm],
        )
        kwok = sup.spawn("kwok", self._kwok_argv())
        everyone = [etcd, apiserver, kcm, sched, kwok]

        def default_sa() -> bool:
            status, _ = api.get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200

        sup.wait("the default ServiceAccount", default_sa, everyone, deadline)

        want = set(state["nodes"])

        def nodes_ready() -> bool:
            status, body = api.get("/api/v1/nodes")
            if status != 200:
                return False
            ready = {n["metadata"]["name"] for n in body.get("items", []) if is_ready(n)}
            return want <= ready

        self._say(f"waiting for {nodes} kwok nodes to be Ready")
        sup.wait(f"{nodes} nodes Ready", nodes_ready, everyone, deadline)
        return api

    # ------------------------------------------------------------- chaos
    def restart(self, name: str, *, down_for: float = 0.0, die_with_parent: bool = False) -> None:
        """Stop one component and start it again with the same command line, as
        an upgrade or a crash would; returns once the API server is ready again."""
        state = self.state()
        proc = next((p for p in self.processes() if p.name == name), None)
        if proc is None:
            raise ClusterError(f"no component {name!r} in {self.dir}")
        sup = Supervisor(
            self.dir,
            self.logs,
            state,
            functools.partial(self._write_state, state),
            die_with_parent=die_with_parent,
            say=say_nothing,
        )
        sup.stop([proc], 10.0)
        time.sleep(down_for)
        sup.spawn(name, proc.argv)
        deadline = time.monotonic() + 60
        while not self.api().readyz():
            if time.monotonic() > deadline:
                raise ClusterError(f"the API server is not ready 60 s after restarting {name}")
            time.sleep(0.1)

    # ---------------------------------------------------------------- down
    def down(self, grace: float = 10.0, *, keep_logs: bool = True) -> list[str]:
        """Stop every component (recorded or stray), leave no container, mount
        or network object of a real node behind, and remove the etcd data."""
        state = self.state()
        real = self.real_nodes()
        if real:
            with contextlib.suppress(ClusterError, OSError, ssl.SSLError):
                # While the kubelets run: they stop the containers and confirm.
                delete_pods_on(self.api(), [n.name for n in real], timeout=60)
        recorded = self.processes()
        known = {p.pid for p in recorded}
        procs = [*reversed(recorded), *(p for p in self._strays() if p.pid not in known)]
        sup = Supervisor(
            self.dir, self.logs, {}, lambda: None, die_with_parent=False, say=self._say
        )
        kubelets = [p for p in procs if p.name.startswith("kubelet-")]
        stopped = sup.stop(kubelets, grace)
        for node in real:
            node.kill_containers()
        stopped += sup.stop([p for p in procs if p not in kubelets], grace)
        for node in real:
            node.cleanup(state.get("real_nodes", {}).get(node.name, {}))
        shutil.rmtree(self.etcd_data, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        for client in ("kube-controller-manager", "kube-scheduler", "kwok"):
            (self.dir / f"{client}.kubeconfig").unlink(missing_ok=True)
        self.kubeconfig.unlink(missing_ok=True)
        if not keep_logs:
            shutil.rmtree(self.logs, ignore_errors=True)
        return stopped

    # -------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        state = self.state()
        out: dict[str, Any] = {
            "dir": str(self.dir),
            "running": False,
            "components": {},
        }
        if not state:
            out["strays"] = [f"{p.name}({p.pid})" for p in self._strays()]
            return out
        for p in self.processes():
            out["components"][p.name] = {"pid": p.pid, "alive": p.alive()}
        for name, port in state.get("ports", {}).items():
            # "etcd_client" -> etcd's port_client; "kube-scheduler" -> its port
            comp, _, which = name.partition("_")
            out["components"].setdefault(comp, {})[f"port_{which}" if which else "port"] = port
        out.update(
            server=state.get("server"),
            kubeconfig=state.get("kubeconfig"),
            versions=state.get("versions"),
            real_nodes={n: i.get("ip") for n, i in state.get("real_nodes", {}).items()},
            startup_seconds=state.get("startup_seconds"),
        )
        try:
            api = self.api()
            readyz_status, readyz = api.get("/readyz")
            out["readyz"] = str(readyz).strip() if readyz_status == 200 else readyz_status
            _, version = api.get("/version")
            out["server_version"] = version.get("gitVersion") if isinstance(version, dict) else None
            _, body = api.get("/api/v1/nodes")
            nodes = body.get("items", []) if isinstance(body, dict) else []
            out["nodes"] = {n["metadata"]["name"]: is_ready(n) for n in nodes}
        except (OSError, ClusterError, ssl.SSLError) as e:
            out["readyz"] = f"unreachable: {e}"
        out["running"] = (
            bool(out["components"])
            and all(c.get("alive") for c in out["components"].values())
            and out.get("readyz") == "ok"
        )
        return out


@contextlib.contextmanager
def running(dir: str | os.PathLike[str], nodes: int = 4, **kw: Any) -> Iterator[LocalCluster]:
    """``with running(tmpdir) as c:`` — up on enter, down on exit."""
    cluster = LocalCluster(dir)
    cluster.up(nodes, **kw)
    try:
        yield cluster
    finally:
        cluster.down()
