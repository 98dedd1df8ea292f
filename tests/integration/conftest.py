"""A real Kubernetes API server for the integration tests.

``cluster`` (session) is, in order of precedence:

* ``BERTH_KUBECONFIG=/path/kubeconfig``: that cluster (kind or any real one);
  nothing is started or stopped, and tests must not assume kwok nodes.
* ``BERTH_CLUSTER_DIR=/path``: the local test bed in that directory (the
  ``testbed`` package). Reused if it is running; otherwise started there
  and left running after the session, so the next run starts instantly.
  Stop it with ``python -m testbed down --dir /path``.
* neither: a fresh local test bed in a temp dir, stopped at session end
  (its components also die with the pytest process if that is killed).
  ``BERTH_NODES`` sets the number of fake GPU nodes (default 4),
  ``BERTH_REAL_NODES`` the number of real nodes (default 1).

``real_node`` is the first real node (the test fails without one).
``namespace`` gives each test a fresh namespace (its default ServiceAccount
already there), deleted afterwards without waiting. ``core_api`` /
``api_client`` are sync ``kubernetes`` clients on the same kubeconfig.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from testbed import ClusterError, LocalCluster, Toolchain
from tests.support.scenarios import OPERATOR_NAMESPACE, ensure_namespace, install_crds

ROOT = Path(__file__).resolve().parents[2]


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; unlike its base class, str() shows stderr."""

    def __str__(self) -> str:
        cmd = " ".join(self.cmd[1:]) if isinstance(self.cmd, list) else str(self.cmd)
        return f"kubectl {cmd} exited {self.returncode}:\n{self.stderr}{self.output}"


@dataclass
class Cluster:
    """What a test gets from the ``cluster`` fixture."""

    kubeconfig: str  # admin kubeconfig (path)
    dir: Path  # state dir of the local control plane; a scratch dir for an external cluster
    kubectl_path: str
    nodes: list[str] = field(default_factory=list)  # schedulable fake (or worker) nodes
    # Real nodes (kubelet + containerd), tainted so only pods that tolerate
    # testbed.realnode.REAL_NODE_TAINT land there.
    real_nodes: list[str] = field(default_factory=list)
    external: bool = False  # True with BERTH_KUBECONFIG: not our kwok control plane
    # Image for test pods: kwok never pulls it; on a real cluster set
    # BERTH_TEST_IMAGE to something its nodes can run.
    image: str = field(default_factory=lambda: os.environ.get("BERTH_TEST_IMAGE", "berth-test:1"))
    versions: dict[str, str] = field(default_factory=dict)  # pinned tool versions (local only)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (a later ``--kubeconfig`` in args wins)."""
        cmd = [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)


def schedulable_nodes(cluster: Cluster) -> list[str]:
    """Ready nodes that accept ordinary pods (no NoSchedule/NoExecute taint)."""
    names = []
    for node in cluster.json("get", "nodes")["items"]:
        spec, status = node.get("spec", {}), node.get("status", {})
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )
        blocked = spec.get("unschedulable") or any(
            t.get("effect") in ("NoSchedule", "NoExecute") for t in spec.get("taints") or []
        )
        if ready and not blocked:
            names.append(node["metadata"]["name"])
    return sorted(names)


def _external(kubeconfig: str, scratch: Path, tools: Toolchain) -> Cluster:
    path = Path(kubeconfig).expanduser().resolve()
    kubectl = str(tools.kubectl) if tools.kubectl.exists() else shutil.which("kubectl")
    if not kubectl:
        pytest.fail("BERTH_KUBECONFIG is set but no kubectl found (hack/setup.sh builds one)")
    handle = Cluster(str(path), scratch, kubectl, external=True)
    probe = handle.kubectl("version", "--request-timeout=10s", check=False)
    if probe.returncode != 0:
        pytest.fail(f"BERTH_KUBECONFIG={kubeconfig}: cluster unreachable:\n{probe.stderr}")
    handle.nodes = schedulable_nodes(handle)
    return handle


def _local(local: LocalCluster) -> Cluster:
    state = local.state()
    return Cluster(
        str(local.kubeconfig),
        local.dir,
        str(local.tools.kubectl),
        nodes=list(state.get("nodes", [])),
        real_nodes=list(state.get("real_nodes", {})),
        versions=dict(state.get("versions", {})),
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tools = Toolchain.from_env()
    kubeconfig = os.environ.get("BERTH_KUBECONFIG")
    if kubeconfig:
        yield _external(kubeconfig, tmp_path_factory.mktemp("external-cluster"), tools)
        return

    nodes = int(os.environ.get("BERTH_NODES", "4"))
    real_nodes = int(os.environ.get("BERTH_REAL_NODES", "1"))
    kept_dir = os.environ.get("BERTH_CLUSTER_DIR")
    try:
        if kept_dir:
            local = LocalCluster(kept_dir)
            if not local.is_running() or len(local.real_nodes()) != real_nodes:
                local.down()  # whatever is left of an earlier run
                local.up(nodes, real_nodes=real_nodes)
            owned = False
        else:
            local = LocalCluster(tmp_path_factory.mktemp("cluster"))
            local.up(nodes, real_nodes=real_nodes, die_with_parent=True)
            owned = True
    except ClusterError as e:
        pytest.fail(f"local test bed did not start: {e}", pytrace=False)
    handle = _local(local)
    # Fail fast (and readably) if the handle does not reach the server.
    handle.kubectl("get", "--raw=/readyz")
    try:
        yield handle
    finally:
        if owned:
            local.down()


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> str:
    """The first real node (kubelet + containerd); fails where there is none."""
    if not cluster.real_nodes:
        pytest.fail(
            "no real node in this cluster: the local test bed starts one "
            "(BERTH_REAL_NODES >= 1); an external cluster (BERTH_KUBECONFIG) has none",
            pytrace=False,
        )
    return cluster.real_nodes[0]


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[k8s.ApiClient]:
    api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=cluster.kubeconfig
    )
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def core_api(api_client: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api_client)


def namespace_name(test_name: str) -> str:
    """A unique, valid namespace name that still tells which test made it."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
    slug = slug.removeprefix("test-")[:48].strip("-") or "t"
    return f"t-{slug}-{secrets.token_hex(3)}"


def wait_for_default_service_account(core_api: k8s.CoreV1Api, namespace: str) -> None:
    """Pods are refused until the namespace's default ServiceAccount exists."""
    deadline = time.monotonic() + 30
    while True:
        try:
            core_api.read_namespaced_service_account("default", namespace)
            return
        except ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


@pytest.fixture
def namespace(core_api: k8s.CoreV1Api, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_name(request.node.name)
    core_api.create_namespace(
        k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels={"berth.dev/test": "true"}))
    )
    wait_for_default_service_account(core_api, name)
    try:
        yield name
    finally:
        try:
            core_api.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def crds(cluster: Cluster) -> None:
    """Berth's CRDs installed and the operator's namespace there (for tests that
    run an operator)."""
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
