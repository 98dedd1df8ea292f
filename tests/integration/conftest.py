"""A real Kubernetes API server for the integration tests.

``cluster`` (session) is, in order of precedence:

* ``BERTH_KUBECONFIG=/path/kubeconfig``: that cluster (kind or any real one);
  nothing is started or stopped, and tests must not assume kwok nodes.
* ``BERTH_CLUSTER_DIR=/path``: the local control plane in that directory
  (hack/localcluster.py). Reused if it is running; otherwise started there
  and left running after the session, so the next run starts instantly.
  Stop it with ``python hack/localcluster.py down --dir /path``.
* neither: a fresh local control plane in a temp dir, stopped at session end
  (its components also die with the pytest process if that is killed).
  ``BERTH_NODES`` sets the number of fake GPU nodes (default 4).

``namespace`` gives each test a fresh namespace (its default ServiceAccount
already there), deleted afterwards without waiting. ``core_api`` /
``api_client`` are sync ``kubernetes`` clients on the same kubeconfig.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parents[2]


def load_localcluster() -> ModuleType:
    """hack/localcluster.py as a module (hack/ is not a package)."""
    name = "berth_hack_localcluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / "localcluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


def _external(kubeconfig: str, scratch: Path, tools: Any) -> Cluster:
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


def _local(local: Any) -> Cluster:
    state = local.state()
    return Cluster(
        str(local.kubeconfig),
        local.dir,
        str(local.tools.kubectl),
        nodes=list(state.get("nodes", [])),
        versions=dict(state.get("versions", {})),
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    lc = load_localcluster()
    tools = lc.Toolchain.from_env()
    kubeconfig = os.environ.get("BERTH_KUBECONFIG")
    if kubeconfig:
        yield _external(kubeconfig, tmp_path_factory.mktemp("external-cluster"), tools)
        return

    nodes = int(os.environ.get("BERTH_NODES", "4"))
    kept_dir = os.environ.get("BERTH_CLUSTER_DIR")
    try:
        if kept_dir:
            local = lc.LocalCluster(kept_dir)
            if not local.is_running():
                local.down()  # whatever is left of an earlier run
                local.up(nodes)
            owned = False
        else:
            local = lc.LocalCluster(tmp_path_factory.mktemp("cluster"))
            local.up(nodes, die_with_parent=True)
            owned = True
    except lc.ClusterError as e:
        pytest.fail(f"local control plane did not start: {e}", pytrace=False)
    handle = _local(local)
    # Fail fast (and readably) if the handle does not reach the server.
    handle.kubectl("get", "--raw=/readyz")
    try:
        yield handle
    finally:
        if owned:
            local.down()


@pytest.fixture(scope="session")
def localcluster() -> ModuleType:
    """hack/localcluster.py (versions, node manifests, LocalCluster)."""
    return load_localcluster()


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
