#!/usr/bin/env python3
"""A real, local Kubernetes control plane for Berth's tests and demo.

No containers: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok run as plain processes on 127.0.0.1, from the binaries that
``hack/build-tools.sh`` builds from Go modules and caches by version. kwok
plays the kubelet of N fake GPU nodes: it marks them Ready, renews their
leases, and moves scheduled pods to Running with an IP.

    python hack/localcluster.py up --dir DIR [--nodes N]   # prints KUBECONFIG
    python hack/localcluster.py status --dir DIR
    python hack/localcluster.py down --dir DIR

DIR holds ``kubeconfig`` (admin), ``state.json`` (pids, ports, nodes),
``logs/<component>.log``, ``pki/`` and the etcd data. Ports are picked free
at start-up, so several clusters can run on one machine. Importable too:
``LocalCluster(DIR).up(nodes=4)`` / ``.down()`` (the pytest fixtures do).

Standard library only, plus ``cryptography`` for the certificates.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HACK = Path(__file__).resolve().parent

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
KWOK_POD_WORKERS = 16
KWOK_NODE_WORKERS = 8
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The local control plane could not be started, reached or stopped."""


# --------------------------------------------------------------------------
# Tool versions and paths: hack/env.sh is the single source.


def _env_sh_defaults(path: Path = HACK / "env.sh") -> dict[str, str]:
    """``export NAME=${NAME:-value}`` lines of env.sh, $HOME expanded."""
    out: dict[str, str] = {}
    pattern = re.compile(r"^export\s+(\w+)=\$\{\1:-([^}]*)\}\s*$")
    for line in path.read_text().splitlines():
        m = pattern.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).replace("$HOME", str(Path.home()))
    return out


@dataclass(frozen=True)
class Toolchain:
    """Where the cached binaries of the pinned versions live."""

    cache: Path
    k8s_version: str
    etcd_version: str
    kwok_version: str
    helm_version: str

    @classmethod
    def from_env(cls) -> Toolchain:
        """hack/env.sh's defaults, overridden by the same environment variables."""
        defaults = _env_sh_defaults()

        def get(name: str) -> str:
            value = os.environ.get(name) or defaults.get(name)
            if not value:
                raise ClusterError(f"{name} is neither in the environment nor in hack/env.sh")
            return value

        return cls(
            cache=Path(get("BERTH_CACHE")).expanduser(),
            k8s_version=get("K8S_VERSION"),
            etcd_version=get("ETCD_VERSION"),
            kwok_version=get("KWOK_VERSION"),
            helm_version=get("HELM_VERSION"),
        )

    @property
    def bin(self) -> Path:
        return self.cache / "bin"

    def _k8s(self, name: str) -> Path:
        return self.bin / f"kubernetes-{self.k8s_version}" / name

    @property
    def etcd(self) -> Path:
        return self.bin / f"etcd-{self.etcd_version}" / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self._k8s("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self._k8s("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        return self._k8s("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        return self._k8s("kubectl")

    @property
    def kwok(self) -> Path:
        return self.bin / f"kwok-{self.kwok_version}" / "kwok"

    @property
    def kwok_stages(self) -> list[Path]:
        return sorted((self.bin / f"kwok-{self.kwok_version}" / "stage").glob("*.yaml"))

    @property
    def helm(self) -> Path:
        return self.bin / f"helm-{self.helm_version}" / "helm"

    def versions(self) -> dict[str, str]:
        return {
            "kubernetes": self.k8s_version,
            "etcd": self.etcd_version,
            "kwok": self.kwok_version,
            "helm": self.helm_version,
        }

    def check(self) -> None:
        binaries = [
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.kwok,
        ]
        missing = [str(p) for p in binaries if not os.access(p, os.X_OK)]
        if not self.kwok_stages:
            missing.append(str(self.kwok.parent / "stage/*.yaml"))
        if missing:
            raise ClusterError(
                "missing control-plane binaries (run hack/setup.sh or hack/build-tools.sh): "
                + ", ".join(missing)
            )


# --------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Pki:
    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.crt("ca")

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


_NOW_SKEW = datetime.timedelta(minutes=5)
_VALIDITY = datetime.timedelta(days=3650)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _x509_name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ensure_ca(pki: Pki, file: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load CA ``file`` or make it; a new CA invalidates what it had signed."""
    if not (pki.crt(file).exists() and pki.key(file).exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) - _NOW_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(_x509_name(f"berth-local-{file}"))
            .issuer_name(_x509_name(f"berth-local-{file}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_key(pki.key(file), key)
        pki.crt(file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        for issued in ISSUED_BY[file]:
            pki.crt(issued).unlink(missing_ok=True)
    cert = x509.load_pem_x509_certificate(pki.crt(file).read_bytes())
    loaded = serialization.load_pem_private_key(pki.key(file).read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return cert, loaded


def _ensure_cert(
    pki: Pki,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    file: str,
    cn: str,
    org: str | None,
    *,
    server: bool = False,
    sans: Sequence[x509.GeneralName] = (),
) -> None:
    if pki.crt(file).exists() and pki.key(file).exists():
        return
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - _NOW_SKEW
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_x509_name(cn, org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pki.key(file), key)
    pki.crt(file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# Client identities signed by the cluster CA: (file, CN, O). The scheduler
# uses its bootstrap RBAC identity; the controller manager authenticates as
# itself and runs each controller under its own service account
# (--use-service-account-credentials, as kubeadm does); kwok and the admin
# kubeconfig are cluster admins (system:masters).
CLIENTS = (
    ("admin", "berth-admin", "system:masters"),
    ("kube-controller-manager", "system:kube-controller-manager", None),
    ("kube-scheduler", "system:kube-scheduler", None),
    ("kwok", "kwok", "system:masters"),
)
ISSUED_BY = {
    "ca": ["kube-apiserver", *(c[0] for c in CLIENTS)],
    # The aggregation layer's request-header CA: without it every component
    # logs "missing content for CA bundle ... requestheader-client-ca-file".
    "front-proxy-ca": ["front-proxy-client"],
}


def _make_pki(pki: Pki) -> None:
    """CAs, API server serving cert, client certs, service-account key pair.

    Kept across ``down``/``up`` of one DIR (only missing files are made), so a
    copied kubeconfig's credentials stay valid; its server address changes.
    """
    pki.dir.mkdir(parents=True, exist_ok=True)
    ca = _ensure_ca(pki, "ca")
    _ensure_cert(
        pki,
        ca,
        "kube-apiserver",
        "kube-apiserver",
        None,
        server=True,
        sans=[
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            x509.IPAddress(ipaddress.IPv4Address(SERVICE_IP)),
        ],
    )
    for file, cn, org in CLIENTS:
        _ensure_cert(pki, ca, file, cn, org)
    front_proxy = _ensure_ca(pki, "front-proxy-ca")
    _ensure_cert(pki, front_proxy, "front-proxy-client", "front-proxy-client", None)

    if not (pki.sa_key.exists() and pki.sa_pub.exists()):
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(pki.sa_key, sa)
        pki.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def _kubeconfig_text(server: str, pki: Pki, client: str, *, embed: bool) -> str:
    """A kubeconfig (YAML) for one client identity of this cluster."""

    def ref(field: str, path: Path) -> str:
        if embed:
            data = base64.b64encode(path.read_bytes()).decode()
            return f"{field}-data: {data}"
        return f"{field}: {path}"

    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: berth-local\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    {ref('certificate-authority', pki.ca)}\n"
        "users:\n"
        f"- name: {client}\n"
        "  user:\n"
        f"    {ref('client-certificate', pki.crt(client))}\n"
        f"    {ref('client-key', pki.key(client))}\n"
        "contexts:\n"
        "- name: berth-local\n"
        "  context:\n"
        "    cluster: berth-local\n"
        f"    user: {client}\n"
        "current-context: berth-local\n"
    )


# --------------------------------------------------------------------------
# Processes


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while picking)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    """Collect our own exited child so it leaves no zombie (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGKILL when our parent thread dies.

    SIGKILL, not SIGTERM: terminated together, etcd and the API server wait
    for each other's streams and neither exits. The cluster is throw-away in
    that case anyway. Only a prctl(2) call through a handle loaded before the
    fork: nothing that could deadlock in the child of a threaded parent.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int
    argv: list[str]

    def alive(self) -> bool:
        _reap(self.pid)
        return _proc_start_ticks(self.pid) == self.start_ticks

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "argv": self.argv}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Proc:
        return cls(name, int(data["pid"]), int(data["start_ticks"]), list(data["argv"]))


def _stop(procs: Sequence[Proc], grace: float) -> list[str]:
    """Stop one process group at a time, in the given order: SIGTERM, up to
    ``grace`` s, then SIGKILL. (All at once, the API server would wait for
    the etcd it just lost and take the whole grace period to exit.)"""
    stopped: list[str] = []
    for p in procs:
        if not p.alive():
            continue
        stopped.append(p.name)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            deadline = time.monotonic() + wait
            while p.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not p.alive():
                break
        if p.alive():
            raise ClusterError(f"{p.name} ({p.pid}) survived SIGKILL")
    return stopped


# --------------------------------------------------------------------------
# A tiny API client (stdlib), for start-up checks and node creation.


class Api:
    def __init__(self, server: str, pki: Pki, client: str = "admin") -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(pki.ca))
        self.ctx.load_cert_chain(str(pki.crt(client)), str(pki.key(client)))

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def readyz(self) -> bool:
        try:
            status, body = self.get("/readyz")
        except (OSError, ssl.SSLError):
            return False
        return status == 200 and str(body).strip() == "ok"


def _https_ok(url: str, timeout: float = 2.0) -> bool:
    """A component's own /healthz (self-signed serving cert: not verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _healthz(port_name: str) -> Callable[[dict[str, int]], bool]:
    return lambda p: _https_ok(f"https://127.0.0.1:{p[port_name]}/healthz")


def _http_json(url: str, timeout: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


# --------------------------------------------------------------------------
# Nodes


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
                "kwok.x-k8s.io/node": "fake",
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


def _node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    # The not-ready taint added at registration must be gone too, or the
    # scheduler still skips the node.
    taints = node.get("spec", {}).get("taints") or []
    return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)


# --------------------------------------------------------------------------
# The cluster


class LocalCluster:
    """One local control plane whose state lives in ``dir``."""

    def __init__(self, dir: str | os.PathLike[str], tools: Toolchain | None = None) -> None:
        self.dir = Path(dir).resolve()
        self.tools = tools or Toolchain.from_env()
        self.pki = Pki(self.dir / "pki")
        self._say: Callable[[str], None] = _stderr

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
        procs = self.state().get("processes", {})
        return [Proc.from_json(n, procs[n]) for n in COMPONENTS if n in procs]

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
            ticks = _proc_start_ticks(pid)
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
        if len(procs) != len(COMPONENTS) or not all(p.alive() for p in procs):
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
        self.tools.check()
        if any(p.alive() for p in self.processes()) or self._strays():
            raise ClusterError(f"a cluster is already running in {self.dir}; run down first")
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for component in COMPONENTS:
            self.log(component).write_bytes(b"")
        shutil.rmtree(self.etcd_data, ignore_errors=True)
        _make_pki(self.pki)
        state: dict[str, Any] = {
            "dir": str(self.dir),
            "versions": self.tools.versions(),
            "kubeconfig": str(self.kubeconfig),
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "ports": {},
            "processes": {},
            "nodes": [node_name(i) for i in range(nodes)],
        }
        self._write_state(state)
        self._say = _quiet if quiet else _stderr
        try:
            self._up(state, nodes, max_pods, t0 + timeout, die_with_parent)
        except BaseException:
            with contextlib.suppress(ClusterError):
                self.down(keep_logs=True)
            raise
        state["startup_seconds"] = round(time.monotonic() - t0, 2)
        self._write_state(state)
        self._say(f"ready in {state['startup_seconds']}s: export KUBECONFIG={self.kubeconfig}")
        return state

    def _spawn(
        self, state: dict[str, Any], name: str, argv: list[str], die_with_parent: bool
    ) -> Proc:
        with self.log(name).open("ab") as log:
            log.write(f"# {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509
            )
        ticks = None
        for _ in range(100):  # /proc entry appears with the fork
            ticks = _proc_start_ticks(popen.pid)
            if ticks is not None or popen.poll() is not None:
                break
            time.sleep(0.01)
        proc = Proc(name, popen.pid, ticks or 0, argv)
        state["processes"][name] = proc.to_json()
        self._write_state(state)
        # Keep the Popen referenced so its exit status is collected by us.
        _CHILDREN[popen.pid] = popen
        return proc

    def _wait(
        self, what: str, probe: Callable[[], bool], procs: Sequence[Proc], deadline: float
    ) -> None:
        while True:
            for p in procs:
                if not p.alive():
                    raise ClusterError(
                        f"{p.name} exited while waiting for {what}; "
                        f"last lines of {self.log(p.name)}:\n{_tail(self.log(p.name))}"
                    )
            if probe():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}:\n{_tail(self.log(p.name), 15)}" for p in procs)
                raise ClusterError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.1)

    def _start(
        self,
        state: dict[str, Any],
        name: str,
        *,
        ports: Sequence[str],
        argv: Callable[[dict[str, int]], list[str]],
        ready: Callable[[dict[str, int]], bool],
        deadline: float,
        die_with_parent: bool,
        others: Sequence[Proc] = (),
    ) -> Proc:
        """Start a component on fresh free ports; if it lost a race for one of
        them (another process bound it first), pick new ones and retry."""
        for attempt in range(4):
            picked = dict(zip(ports, _free_ports(len(ports)), strict=True))
            state["ports"].update(picked)
            proc = self._spawn(state, name, argv(picked), die_with_parent)
            try:
                self._wait(name, functools.partial(ready, picked), [proc, *others], deadline)
                return proc
            except ClusterError:
                lost_race = "address already in use" in _tail(self.log(name), 40).lower()
                if not lost_race or attempt == 3 or proc.alive():
                    raise
                self._say(f"{name}: port taken, retrying on new ports")
        raise AssertionError("unreachable")

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
            "--manage-all-nodes=true",
            f"--cidr={KWOK_FALLBACK_CIDR}",
            # Leases are the heartbeat the node lifecycle controller reads;
            # without them (kwok's default is none) nodes go NotReady.
            "--node-lease-duration-seconds=40",
            *[f"--config={stage}" for stage in self.tools.kwok_stages],
        ]

    # Start-up -----------------------------------------------------------

    def _up(
        self,
        state: dict[str, Any],
        nodes: int,
        max_pods: int,
        deadline: float,
        die_with_parent: bool,
    ) -> None:
        t = self.tools
        start = functools.partial(
            self._start, state, deadline=deadline, die_with_parent=die_with_parent
        )

        def etcd_ready(p: dict[str, int]) -> bool:
            body = _http_json(f"http://127.0.0.1:{p['etcd_client']}/health")
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
        self.kubeconfig.write_text(_kubeconfig_text(api.server, self.pki, "admin", embed=True))
        self.kubeconfig.chmod(0o600)
        for client in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._component_kubeconfig(client).write_text(
                _kubeconfig_text(api.server, self.pki, client, embed=False)
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
            ready=_healthz("kube-controller-manager"),
            others=[etcd, apiserver],
        )
        sched = start(
            "kube-scheduler",
            ports=["kube-scheduler"],
            argv=self._scheduler_argv,
            ready=_healthz("kube-scheduler"),
            others=[etcd, apiserver, kcm],
        )
        kwok = self._spawn(state, "kwok", self._kwok_argv(), die_with_parent)
        everyone = [etcd, apiserver, kcm, sched, kwok]

        def default_sa() -> bool:
            status, _ = api.get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200

        self._wait("the default ServiceAccount", default_sa, everyone, deadline)

        want = set(state["nodes"])

        def nodes_ready() -> bool:
            status, body = api.get("/api/v1/nodes")
            if status != 200:
                return False
            ready = {n["metadata"]["name"] for n in body.get("items", []) if _node_ready(n)}
            return want <= ready

        self._say(f"waiting for {nodes} kwok nodes to be Ready")
        self._wait(f"{nodes} nodes Ready", nodes_ready, everyone, deadline)

    # ---------------------------------------------------------------- down
    def down(self, grace: float = 10.0, *, keep_logs: bool = True) -> list[str]:
        """Stop every component (recorded or stray) and remove the etcd data."""
        recorded = self.processes()
        known = {p.pid for p in recorded}
        procs = [*reversed(recorded), *(p for p in self._strays() if p.pid not in known)]
        stopped = _stop(procs, grace)
        for p in procs:
            popen = _CHILDREN.pop(p.pid, None)
            if popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=1)
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
            comp = "etcd" if name.startswith("etcd") else name
            out["components"].setdefault(comp, {})[f"port_{name}" if comp == "etcd" else "port"] = (
                port
            )
        out.update(
            server=state.get("server"),
            kubeconfig=state.get("kubeconfig"),
            versions=state.get("versions"),
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
            out["nodes"] = {n["metadata"]["name"]: _node_ready(n) for n in nodes}
        except (OSError, ClusterError, ssl.SSLError) as e:
            out["readyz"] = f"unreachable: {e}"
        out["running"] = (
            bool(out["components"])
            and all(c.get("alive") for c in out["components"].values())
            and out.get("readyz") == "ok"
        )
        return out


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _stderr(msg: str) -> None:
    print(f"[localcluster] {msg}", file=sys.stderr, flush=True)


def _quiet(_msg: str) -> None:
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running(dir: str | os.PathLike[str], nodes: int = 4, **kw: Any) -> Iterator[LocalCluster]:
    """``with running(tmpdir) as c:`` — up on enter, down on exit."""
    cluster = LocalCluster(dir)
    cluster.up(nodes, **kw)
    try:
        yield cluster
    finally:
        cluster.down()


# --------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localcluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane with N fake GPU nodes")
    up.add_argument("--dir", required=True, help="state directory (created)")
    up.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
    up.add_argument("--max-pods", type=int, default=256, help="pods per node (default 256)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    down = sub.add_parser("down", help="stop everything and remove the etcd data")
    down.add_argument("--dir", required=True)
    down.add_argument("--grace", type=float, default=10.0, help="seconds between TERM and KILL")
    status = sub.add_parser("status", help="print components, ports, readiness (JSON)")
    status.add_argument("--dir", required=True)
    args = parser.parse_args(argv)

    try:
        cluster = LocalCluster(args.dir)
        if args.cmd == "up":
            cluster.up(args.nodes, max_pods=args.max_pods, timeout=args.timeout)
            print(f"export KUBECONFIG={cluster.kubeconfig}")
            return 0
        if args.cmd == "down":
            stopped = cluster.down(args.grace)
            _stderr(f"stopped {', '.join(stopped) or 'nothing (not running)'}")
            return 0
        info = cluster.status()
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 1
    except ClusterError as e:
        _stderr(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
