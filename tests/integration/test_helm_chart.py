"""The Helm chart and the plain-kubectl manifests on a real API server.

Lint, schema and drift are checked without a cluster in tests/unit/test_chart.py;
here the API server judges the rendered objects, and `helm install` runs
against the local control plane. Its nodes are simulated by kwok, which fakes
the kubelet there. The last test installs the chart onto the test bed's real
node instead: there the operator image (built from Debian packages by
testbed.images) really runs, in cluster.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from testbed import RealNode, Toolchain, images
from testbed.procs import free_ports
from testbed.realnode import REAL_NODE_TOLERATION
from tests.support.operator_process import wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    all_allocated,
    apply_deployment,
    ensure_namespace,
    expected_pods,
    install_crds,
    load_example,
)
from tests.support.tools import find_helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
RELEASE = "berth-helm"

Body = dict[str, Any]


def helm_binary() -> str:
    found = find_helm()
    assert found, "helm is missing: hack/build-tools.sh builds it"
    return found


def helm(cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    home = Path(cluster.dir) / "helm"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, check=False, env=env, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}")
    return result


def release(
    cluster: Any, verb: str, namespace: str, *values: str, wait: bool = True, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``helm install|upgrade`` of the chart as RELEASE; ``wait``: until Ready (120 s)."""
    waiting = ("--wait", "--timeout", "120s") if wait else ()
    return helm(
        cluster, verb, RELEASE, str(CHART), "--namespace", namespace, *values, *waiting, check=check
    )


def uninstall(cluster: Any, namespace: str) -> None:
    helm(cluster, "uninstall", RELEASE, "--namespace", namespace, "--wait", check=False)


def kube_json(cluster: Any, *args: str) -> Body:
    out: Body = json.loads(cluster.kubectl(*args, "-o", "json").stdout)
    return out


def dry_run(cluster: Any, manifest: str) -> str:
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def restricted_namespace(cluster: Any, name: str) -> None:
    """The operator pod must pass the API server's restricted Pod Security check."""
    body = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def deployment_available(cluster: Any, namespace: str, name: str) -> bool:
    status = kube_json(cluster, "get", "deployment", "-n", namespace, name).get("status", {})
    return (
        any(
            c["type"] == "Available" and c["status"] == "True" for c in status.get("conditions", [])
        )
        and status.get("availableReplicas") == 2
    )


def operator_pods(cluster: Any, namespace: str) -> list[Body]:
    pods: list[Body] = kube_json(
        cluster, "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}"
    )["items"]
    return pods


def test_helm_template_passes_server_side_validation(cluster: Any, namespace: str) -> None:
    install_crds(cluster)
    ensure_namespace(cluster, namespace)
    manifest = helm(
        cluster, "template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds"
    ).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(manifest) if d}
    assert kinds == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    out = dry_run(cluster, manifest)
    assert "(server dry run)" in out


def test_deploy_manifest_applies_after_the_crds(cluster: Any) -> None:
    """The documented kubectl path: crds/ first, then deploy/berth.yaml."""
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)  # dry-run creates no namespace
    out = dry_run(cluster, (ROOT / "deploy" / "berth.yaml").read_text())
    assert re.search(r"^deployment\.apps/berth \w+ \(server dry run\)$", out, re.M), out


def image_values(cluster: Any) -> list[str]:
    """kwok never runs the image; a real cluster needs one it can run (BERTH_IMAGE)."""
    image = os.environ.get("BERTH_IMAGE", "")
    if not cluster.external:
        return []
    if not image:
        pytest.skip("set BERTH_IMAGE=repo:tag to an operator image this cluster can run")
    repository, _, tag = image.rpartition(":")
    return ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}"]


def test_helm_install_upgrade_uninstall(cluster: Any, namespace: str) -> None:
    image = image_values(cluster)
    restricted_namespace(cluster, namespace)
    try:
        release(cluster, "install", namespace, *image)
        wait_for(
            lambda: deployment_available(cluster, namespace, RELEASE),
            timeout=60,
            what="the operator Deployment to be Available",
        )
        deployment = kube_json(cluster, "get", "deployment", "-n", namespace, RELEASE)
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        pods = operator_pods(cluster, namespace)
        assert len(pods) == 2
        for pod in pods:
            assert pod["spec"]["serviceAccountName"] == RELEASE
            assert pod["status"]["phase"] == "Running"
        # Preferred anti-affinity: on different nodes while there are nodes to spare.
        assert len({p["spec"]["nodeName"] for p in pods}) == 2
        # The CRDs came with the chart (or were there already): both established.
        for crd in ("inferencedeployments.berth.dev", "nodeportpools.berth.dev"):
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
        status = json.loads(helm(cluster, "status", RELEASE, "-n", namespace, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
        assert "rollout status deployment/berth-helm" in status["info"]["notes"]

        # An upgrade replaces both pods, one at a time, and stays available.
        old = {p["metadata"]["uid"] for p in pods}
        release(cluster, "upgrade", namespace, "--reuse-values", "--set", "sweepIntervalSeconds=30")
        wait_for(
            lambda: (
                len(
                    live := {
                        p["metadata"]["uid"]
                        for p in operator_pods(cluster, namespace)
                        if not p["metadata"].get("deletionTimestamp")
                    }
                )
                == 2
                and not live & old
            ),
            timeout=60,
            what="the upgrade to replace both operator pods",
        )
        wait_for(
            lambda: deployment_available(cluster, namespace, RELEASE),
            timeout=60,
            what="Available after the upgrade",
        )
        env = {
            e["name"]: e.get("value")
            for e in kube_json(cluster, "get", "deployment", "-n", namespace, RELEASE)["spec"][
                "template"
            ]["spec"]["containers"][0]["env"]
        }
        assert env["BERTH_SWEEP_INTERVAL"] == "30"

        # A bad value is refused before anything reaches the cluster.
        bad = release(
            cluster, "upgrade", namespace, "--set", "replicaCount=0", wait=False, check=False
        )
        assert bad.returncode != 0 and "at '/replicaCount': minimum" in bad.stderr
    finally:
        uninstall(cluster, namespace)
    # Helm leaves the CRDs alone on uninstall (docs/install.md, "Uninstall").
    for crd in ("inferencedeployments.berth.dev", "nodeportpools.berth.dev"):
        cluster.kubectl("get", "crd", crd)
    gone = cluster.kubectl("get", "clusterrole", RELEASE, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_schema_rejects_a_bad_value_before_install(cluster: Any, namespace: str) -> None:
    result = release(
        cluster, "install", namespace, "--set", "defaultPool={20000-}", wait=False, check=False
    )
    assert result.returncode == 1
    assert "values don't meet the specifications of the schema" in result.stderr
    assert "at '/defaultPool/0': '20000-' does not match pattern" in result.stderr
    listed = helm(cluster, "list", "--namespace", namespace, "-q").stdout.split()
    assert RELEASE not in listed


def operator_image_on(cluster: Any, node: str) -> str:
    """The operator image built from Debian packages (testbed.images), imported
    into the real node's containerd; its name."""
    tar = images.operator_image()
    RealNode(Path(cluster.dir), cluster.real_nodes.index(node), Toolchain.from_env()).ctr(
        "images", "import", str(tar)
    )
    return images.operator_image_name()


def real_node_sets(cluster: Any, node: str, **extra: str) -> list[str]:
    """helm --set arguments that run the chart's pods on the test bed's real node
    with the image built here."""
    repository, _, tag = operator_image_on(cluster, node).rpartition(":")
    server_port = urllib.parse.urlsplit(
        yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    ).port
    metrics, health = free_ports(2)
    overrides = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "hostNetwork": "true",
        # One real node and host ports: a second replica could not be scheduled.
        "replicaCount": "1",
        "metrics.port": str(metrics),
        "health.port": str(health),
        "nodeSelector.kubernetes\\.io/hostname": node,
        "tolerations[0].key": REAL_NODE_TOLERATION["key"],
        "tolerations[0].operator": REAL_NODE_TOLERATION["operator"],
        # The API server listens on the host's loopback: in-cluster config
        # (these two variables plus the ServiceAccount token) must point there.
        "extraEnv[0].name": "KUBERNETES_SERVICE_HOST",
        "extraEnv[0].value": "127.0.0.1",
        "extraEnv[1].name": "KUBERNETES_SERVICE_PORT",
        "extraEnv[1].value": str(server_port),
        **extra,
    }
    return [
        arg
        for k, v in overrides.items()
        for arg in ("--set-string" if k.startswith("extraEnv") else "--set", f"{k}={v}")
    ]


def test_helm_install_runs_the_operator_on_the_real_node(cluster: Any, namespace: str) -> None:
    """The chart's pod runs the operator image for real: in-cluster config from
    its ServiceAccount, probes answered, read-only root, uid 65532; the
    example deployment (on the kwok GPU nodes) gets its ports from it."""
    if not cluster.real_nodes:
        pytest.fail("needs the local test bed's real node (BERTH_REAL_NODES >= 1)", pytrace=False)
    node = cluster.real_nodes[0]
    install_crds(cluster)
    sets = real_node_sets(cluster, node)
    try:
        release(cluster, "install", namespace, *sets)
        (pod,) = operator_pods(cluster, namespace)
        assert pod["spec"]["nodeName"] == node
        assert pod["spec"]["serviceAccountName"] == RELEASE
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and status["restartCount"] == 0
        assert status["imageID"], "a real container, not kwok's word"
        name = pod["metadata"]["name"]
        exec_ = ("exec", "-n", namespace, name, "--")
        assert cluster.kubectl(
            *exec_, "python", "-c", "import os; print(os.getuid(), os.getgid())"
        ).stdout.split() == ["65532", "65532"]
        probe = cluster.kubectl(*exec_, "python", "-c", "open('/opt/berth/x', 'w')", check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr

        manifest = load_example()
        ensure_namespace(cluster, f"{namespace}-ex")
        try:
            apply_deployment(cluster, f"{namespace}-ex", manifest)
            wait_for(
                lambda: all_allocated(
                    cluster,
                    f"{namespace}-ex",
                    manifest["metadata"]["name"],
                    expected_pods(manifest),
                ),
                timeout=90,
                what="the example's pods to get ports from the in-cluster operator",
            )
        finally:
            cluster.kubectl("delete", "namespace", f"{namespace}-ex", "--wait=false", check=False)
        # The allocations were this pod's: its audit trail (stdout) has them.
        log = cluster.kubectl("logs", "-n", namespace, name).stdout
        assert '"audit"' in log, log[-2000:]
    finally:
        uninstall(cluster, namespace)


def test_helm_install_runs_the_node_agent_on_the_real_node(cluster: Any, namespace: str) -> None:
    """The chart's agent DaemonSet, as a container on a real kubelet, reports
    what is bound in the node's network namespace (docs/node-agent.md)."""
    if not cluster.real_nodes:
        pytest.fail("needs the local test bed's real node (BERTH_REAL_NODES >= 1)", pytrace=False)
    node = cluster.real_nodes[0]
    install_crds(cluster)
    agent = {
        "agent.enabled": "true",
        "agent.intervalSeconds": "1",
        "agent.nodeSelector.kubernetes\\.io/hostname": node,
    }
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))  # the real node's pods share this network namespace
        listener.listen()
        port = listener.getsockname()[1]
        try:
            release(cluster, "install", namespace, *real_node_sets(cluster, node, **agent))

            def reported() -> bool:
                found = cluster.kubectl(
                    "get",
                    "configmap",
                    f"berth-node.{node}",
                    "-n",
                    namespace,
                    "-o",
                    "json",
                    check=False,
                )
                if found.returncode != 0:
                    return False
                tcp = json.loads(found.stdout)["data"].get("tcp", "")
                return any(
                    int(a) <= port <= int(b or a)
                    for a, _, b in (part.partition("-") for part in tcp.split(",") if part)
                )

            wait_for(reported, timeout=60, what=f"the agent on {node} to report port {port}")
            pods = cluster.json(
                "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=node-agent"
            )["items"]
            (agent_pod,) = [p for p in pods if p["spec"]["nodeName"] == node]
            (status,) = agent_pod["status"]["containerStatuses"]
            assert status["ready"] and status["imageID"], "a real container, not kwok's word"
        finally:
            uninstall(cluster, namespace)
