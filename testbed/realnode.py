"""A real node: a private containerd and a kubelet, beside the kwok nodes.

Everything a real node owns is private to its cluster, so two clusters run
side by side: containerd's root, state, socket and CNI dirs live under
``DIR/nodes/<name>/``; the node's IP sits on a veth pair (the kubelet refuses
a loopback node IP, and this kernel has no dummy interfaces) whose peer is in
a network namespace the test bed creates; the names of both, the CNI bridge
and the private /24 they use all derive from the cluster directory.

Teardown order matters (docs/local-cluster.md, "Real nodes"): pods are deleted
while the kubelet still runs, so it stops their containers; then the kubelet
stops, containerd's leftover tasks are killed through ``ctr``, containerd
stops, whatever the kubelet and containerd left mounted is unmounted, and the
veth pair and netns are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import images
from testbed.pki import Pki, client_cert, kubeconfig_text
from testbed.procs import Api, ClusterError, Supervisor
from testbed.toolchain import Toolchain

# Each real node gets one /24 of this range: the veth /30 at .0, pods on the
# CNI bridge in .128/25. The range is private and unused by the kwok nodes.
NODE_NET_POOL = ipaddress.IPv4Network("10.200.0.0/16")
CNI_BIN_DIR = "/usr/lib/cni"
REAL_NODE_PREFIX = "real-"
# What a real node is, for selectors: no GPUs, so no GPU labels.
REAL_NODE_LABELS = {"type": "real", "berth.dev/node-group": "real"}
# Only pods that ask for a real node land there: the others' images could
# not run on it (there is no registry).
REAL_NODE_TAINT = {"key": "berth.dev/real-node", "value": "true", "effect": "NoSchedule"}
REAL_NODE_TOLERATION = {"key": REAL_NODE_TAINT["key"], "operator": "Exists"}
# Debian packages a real node runs on (hack/setup.sh installs them).
HOST_COMMANDS = {
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "ip": "iproute2",
    "mount": "mount",
}


def real_node_name(i: int) -> str:
    return f"{REAL_NODE_PREFIX}{i}"


def cluster_id(cluster_dir: Path) -> str:
    """Six hex digits naming this cluster's network objects (interface names
    are at most 15 characters)."""
    return hashlib.sha256(str(cluster_dir).encode()).hexdigest()[:6]


# The kubelet and containerd create unix sockets below a node's dir, and a
# socket's path has at most 107 bytes: a node whose dir under the cluster's
# would be longer than this lives under SHORT_ROOT instead.
MAX_NODE_DIR = 48
SHORT_ROOT = Path("/var/tmp/berth-nodes")


def node_dir(cluster_dir: Path, cid: str, name: str) -> Path:
    path = cluster_dir / "nodes" / name
    return path if len(str(path)) <= MAX_NODE_DIR else SHORT_ROOT / f"{cid}-{name}"


def check_host() -> None:
    """Fail with the reason if this machine cannot run a real node."""
    missing = sorted({pkg for cmd, pkg in HOST_COMMANDS.items() if shutil.which(cmd) is None})
    if not (Path(CNI_BIN_DIR) / "bridge").exists():
        missing.append("containernetworking-plugins")
    if missing:
        raise ClusterError(
            "a real node needs the Debian packages " + ", ".join(missing) + " (hack/setup.sh)"
        )
    if not Path("/proc/self/ns/net").exists() or _run(["ip", "netns", "list"], check=False)[0]:
        raise ClusterError("a real node needs network namespaces (ip netns) and root")


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> tuple[int, str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    out = (result.stdout + result.stderr).strip()
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {result.returncode}: {out}")
    return result.returncode, out


def _addresses_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network configured on an interface of this host."""
    _, out = _run(["ip", "-o", "-4", "addr", "show"], check=False)
    nets = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            nets.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    return nets


@dataclass(frozen=True)
class NodeNet:
    """The network objects and addresses of one real node."""

    netns: str
    host_if: str
    peer_if: str
    bridge: str
    subnet: ipaddress.IPv4Network  # the node's /24

    @property
    def node_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def peer_ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def pod_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((self.subnet.network_address + 128, 25))

    def to_json(self) -> dict[str, str]:
        return {
            "netns": self.netns,
            "host_if": self.host_if,
            "peer_if": self.peer_if,
            "bridge": self.bridge,
            "subnet": str(self.subnet),
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> NodeNet:
        return cls(
            data["netns"],
            data["host_if"],
            data["peer_if"],
            data["bridge"],
            ipaddress.IPv4Network(data["subnet"]),
        )


def pick_node_net(cid: str, index: int) -> NodeNet:
    """Names from the cluster id; the first /24 of the pool (from a
    cluster-specific offset) that no interface of this host uses."""
    used = _addresses_in_use()
    slots = 1 << (24 - NODE_NET_POOL.prefixlen)
    start = (int(cid, 16) + index * 7) % slots
    for step in range(slots):
        base = NODE_NET_POOL.network_address + ((start + step) % slots) * 256
        subnet = ipaddress.IPv4Network((base, 24))
        if not any(subnet.overlaps(n) for n in used):
            return NodeNet(
                netns=f"berth-{cid}-{index}",
                host_if=f"bh{cid}{index}",
                peer_if=f"bp{cid}{index}",
                bridge=f"bb{cid}{index}",
                subnet=subnet,
            )
    raise ClusterError(f"no free /24 left in {NODE_NET_POOL} for a real node")


def create_net(net: NodeNet) -> None:
    """The veth pair: the node's IP on our end, the peer in our netns."""
    remove_net(net)  # whatever an earlier run left behind
    _run(["ip", "netns", "add", net.netns])
    _run(["ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.peer_if])
    _run(["ip", "link", "set", net.peer_if, "netns", net.netns])
    _run(["ip", "addr", "add", f"{net.node_ip}/30", "dev", net.host_if])
    _run(["ip", "link", "set", net.host_if, "up"])
    in_ns = ["ip", "netns", "exec", net.netns, "ip"]
    _run([*in_ns, "addr", "add", f"{net.peer_ip}/30", "dev", net.peer_if])
    _run([*in_ns, "link", "set", net.peer_if, "up"])
    _run([*in_ns, "link", "set", "lo", "up"])


def remove_net(net: NodeNet) -> None:
    for link in (net.host_if, net.bridge):
        _run(["ip", "link", "del", link], check=False)
    _run(["ip", "netns", "del", net.netns], check=False)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(str(root) + "/"):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def unmount_all(root: Path) -> None:
    for _ in range(3):  # stacked mounts need more than one pass
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            _run(["umount", "--lazy", point], check=False)
    if mounts_under(root):
        raise ClusterError(f"still mounted under {root}: {mounts_under(root)}")


class RealNode:
    """One real node of the cluster in ``cluster_dir``."""

    def __init__(self, cluster_dir: Path, index: int, tools: Toolchain) -> None:
        self.index = index
        self.name = real_node_name(index)
        self.tools = tools
        self.cid = cluster_id(cluster_dir)
        self.dir = node_dir(cluster_dir, self.cid, self.name)

    # paths
    @property
    def sock(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        return self.dir / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.dir / "containerd-state"

    @property
    def kubelet_root(self) -> Path:
        return self.dir / "kubelet"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubelet.kubeconfig"

    @property
    def cni_conf_dir(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def containerd_proc(self) -> str:
        return f"containerd-{self.name}"

    @property
    def kubelet_proc(self) -> str:
        return f"kubelet-{self.name}"

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """``ctr`` on this node's containerd, in the CRI's namespace."""
        return _run(
            ["ctr", f"--address={self.sock}", "--namespace=k8s.io", *args],
            check=check,
            timeout=timeout,
        )[1]

    # config files -------------------------------------------------------

    def _write_containerd_config(self) -> Path:
        config = self.dir / "containerd.toml"
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        config.write_text(
            "version = 2\n"
            f'root = "{self.containerd_root}"\n'
            f'state = "{self.containerd_state}"\n'
            # Only the CRI matters here: skip the plugins that would use the
            # host's default paths.
            'disabled_plugins = ["io.containerd.internal.v1.opt", '
            '"io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", '
            '"io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]\n'
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            '  address = ""\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
            f"{cri}\n"
            f'  sandbox_image = "{images.PAUSE_IMAGE}"\n'
            # Without it sandbox creation fails here: runc cannot write the
            # sandbox's oom_score_adj ("can't get final child's PID from pipe").
            "  restrict_oom_score_adj = true\n"
            f"{cri[:-1]}.containerd]\n"
            '  snapshotter = "overlayfs"\n'
            '  default_runtime_name = "runc"\n'
            f"{cri[:-1]}.containerd.runtimes.runc]\n"
            '  runtime_type = "io.containerd.runc.v2"\n'
            f"{cri[:-1]}.containerd.runtimes.runc.options]\n"
            "  SystemdCgroup = false\n"
            f"{cri[:-1]}.cni]\n"
            f'  bin_dir = "{CNI_BIN_DIR}"\n'
            f'  conf_dir = "{self.cni_conf_dir}"\n'
        )
        return config

    def _write_cni_conf(self, net: NodeNet) -> None:
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": f"berth-{self.cid}-{self.index}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": net.bridge,
                    "isGateway": True,
                    # No masquerade: pods reach this host only, and no
                    # iptables rule outlives the node.
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.dir / "cni" / "ipam"),
                        "ranges": [[{"subnet": str(net.pod_subnet)}]],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.cni_conf_dir / "10-berth.conflist").write_text(json.dumps(conflist, indent=2))

    def _write_kubelet_config(self, net: NodeNet, port: int, healthz: int) -> Path:
        config = self.dir / "kubelet.yaml"
        body = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": net.node_ip,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            # The API server reaches the kubelet for logs and exec; the node IP
            # is on a veth only this host can reach.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "imageServiceEndpoint": f"unix://{self.sock}",
            "podLogsDir": str(self.dir / "pod-logs"),
            "serializeImagePulls": False,
            "maxPods": 110,
        }
        config.write_text(json.dumps(body, indent=2))
        return config

    # up -------------------------------------------------------------------

    def up(
        self, sup: Supervisor, api: Api, pki: Pki, deadline: float, image_tars: Sequence[Path]
    ) -> dict[str, Any]:
        """Network, containerd (with the images), kubelet; returns this node's state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        net = pick_node_net(self.cid, self.index)
        info: dict[str, Any] = {"name": self.name, "dir": str(self.dir), "net": net.to_json()}
        sup.state.setdefault("real_nodes", {})[self.name] = info
        sup.save()
        create_net(net)
        self._write_cni_conf(net)

        sup.say(f"starting containerd for real node {self.name} ({net.node_ip})")
        containerd = sup.spawn(
            self.containerd_proc,
            ["containerd", f"--config={self._write_containerd_config()}", "--log-level=warn"],
        )

        def containerd_ready() -> bool:
            return (
                self.sock.exists()
                and _run(["ctr", f"--address={self.sock}", "version"], check=False, timeout=5)[0]
                == 0
            )

        sup.wait(f"containerd of {self.name}", containerd_ready, [containerd], deadline)
        for tar in image_tars:
            self.ctr("images", "import", str(tar))

        pki_name = f"kubelet-{self.name}"
        # Issued afresh each time: the CA may be new.
        client_cert(pki, pki_name, f"system:node:{self.name}", "system:nodes")
        self.kubeconfig.write_text(kubeconfig_text(api.server, pki, pki_name, embed=False))
        labels = {**REAL_NODE_LABELS, "kubernetes.io/hostname": self.name}

        def kubelet_argv(p: dict[str, int]) -> list[str]:
            config = self._write_kubelet_config(
                net, p[self.kubelet_proc], p[f"{self.kubelet_proc}_healthz"]
            )
            return [
                str(self.tools.kubelet),
                f"--config={config}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={net.node_ip}",
                "--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
                "--register-with-taints={key}={value}:{effect}".format(**REAL_NODE_TAINT),
                "--v=1",
            ]

        def kubelet_ready(_p: dict[str, int]) -> bool:
            return node_ready(api, self.name)

        sup.say(f"starting kubelet for real node {self.name}")
        sup.start(
            self.kubelet_proc,
            ports=[self.kubelet_proc, f"{self.kubelet_proc}_healthz"],
            argv=kubelet_argv,
            ready=kubelet_ready,
            deadline=deadline,
            others=[containerd],
        )
        info["ip"] = net.node_ip
        sup.save()
        return info

    # down -----------------------------------------------------------------

    def kill_containers(self) -> None:
        """Every task containerd still runs (containers and sandboxes): SIGKILL,
        then delete; ``ctr`` talks to containerd, so it must still run."""
        if not self.sock.exists():
            return
        code, out = _run(
            ["ctr", f"--address={self.sock}", "--namespace=k8s.io", "tasks", "ls", "-q"],
            check=False,
            timeout=15,
        )
        if code != 0:
            return
        for task in out.split():
            self.ctr("tasks", "kill", "--signal=SIGKILL", task, check=False, timeout=15)
        for task in out.split():
            self.ctr("tasks", "delete", "--force", task, check=False, timeout=30)
        for container in self.ctr("containers", "ls", "-q", check=False, timeout=15).split():
            self.ctr("containers", "delete", container, check=False, timeout=15)

    def cleanup(self, info: dict[str, Any]) -> None:
        """After containerd and the kubelet stopped: mounts, network, files."""
        unmount_all(self.dir)
        if "net" in info:
            remove_net(NodeNet.from_json(info["net"]))
        for _ in range(3):
            shutil.rmtree(self.dir, ignore_errors=True)
            if not self.dir.exists():
                return
            time.sleep(0.2)
        raise ClusterError(f"could not remove {self.dir}")


def node_ready(api: Api, name: str) -> bool:
    with contextlib.suppress(OSError):
        status, node = api.get(f"/api/v1/nodes/{name}")
        if status == 200:
            return is_ready(node)
    return False


def is_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    # The not-ready taint added at registration must be gone too, or the
    # scheduler still skips the node.
    taints = node.get("spec", {}).get("taints") or []
    return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)


def delete_pods_on(api: Api, nodes: Sequence[str], timeout: float) -> list[str]:
    """Delete every pod bound to ``nodes`` and wait until their kubelets
    confirmed it (the pods are gone from the API). Returns the ones left."""

    def listed() -> list[tuple[str, str]]:
        out = []
        for node in nodes:
            status, body = api.get(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{node}")
            if status == 200:
                out += [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in body["items"]]
        return out

    for ns, name in listed():
        api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", {"gracePeriodSeconds": 1})
    deadline = time.monotonic() + timeout
    left = listed()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = listed()
    return [f"{ns}/{name}" for ns, name in left]
