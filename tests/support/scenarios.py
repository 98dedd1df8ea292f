"""Reusable end-to-end scenarios: the example deployment, served by a real operator."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from tests.support.invariants import (
    InvariantViolation,
    StableTracker,
    berth_pods,
    check_cluster,
)
from tests.support.operator_process import OperatorProcess, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vllm-disagg.yaml"
OPERATOR_NAMESPACE = "berth-system"


def install_crds(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("inferencedeployments.berth.dev", "nodeportpools.berth.dev"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")


def ensure_namespace(cluster: Any, name: str) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    cluster.kubectl("apply", "-f", "-", input=manifest)


def pods_of(cluster: Any, namespace: str, deployment: str) -> list[dict[str, Any]]:
    return [
        p
        for p in berth_pods(cluster)
        if p["metadata"]["namespace"] == namespace
        and p["metadata"]["labels"].get("berth.dev/deployment") == deployment
    ]


def all_allocated(cluster: Any, namespace: str, deployment: str, expected: int) -> bool:
    pods = pods_of(cluster, namespace, deployment)
    done = [p for p in pods if "berth.dev/ports" in p["metadata"].get("annotations", {})]
    return len(pods) == expected and len(done) == expected


def expected_pods(manifest: dict[str, Any]) -> int:
    return sum(int(role.get("replicas", 1)) for role in manifest["spec"]["roles"])


def load_example() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    deployment: dict[str, Any] = next(d for d in docs if d["kind"] == "InferenceDeployment")
    return deployment


def apply_deployment(cluster: Any, namespace: str, manifest: dict[str, Any]) -> None:
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def custom_deployment(
    name: str,
    replicas: int = 2,
    blocks: list[dict[str, Any]] | None = None,
    node: str | None = None,
    image: str = "engine:1",
) -> dict[str, Any]:
    """A custom-preset deployment with explicit blocks: predictable sizes."""
    spec: dict[str, Any] = {"containers": [{"name": "engine", "image": image}]}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {
            "engine": {"preset": "custom"},
            "roles": [
                {
                    "name": "worker",
                    "replicas": replicas,
                    "ports": blocks
                    or [
                        {"name": "http", "size": 1, "env": [{"name": "HTTP_PORT"}]},
                        {"name": "side", "size": 4, "env": [{"name": "SIDE_PORT"}]},
                    ],
                    "template": {"spec": spec},
                }
            ],
        },
    }


def run_example_scenario(
    cluster: Any, kubeconfig: str, namespace: str, tmp_path: Path, timeout: float = 90
) -> OperatorProcess:
    """Apply the example with an operator using ``kubeconfig``; wait until every pod
    has ports; check I1-I3 and the ledgers. Returns the (still running) operator."""
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log").start()
    try:
        manifest = load_example()
        apply_deployment(cluster, namespace, manifest)
        name = manifest["metadata"]["name"]
        wait_for(
            lambda: all_allocated(cluster, namespace, name, expected_pods(manifest)),
            timeout=timeout,
            what=f"every pod of {name} to get ports",
        )
        tracker = StableTracker()
        check_cluster(cluster, quiet=False, tracker=tracker)  # I1, I3 so far
        wait_consistent(cluster, tracker, timeout=30)
    except BaseException:
        operator.stop()  # a failed scenario must not leave an operator serving the next test
        raise
    return operator


def wait_consistent(
    cluster: Any, tracker: StableTracker | None = None, timeout: float = 60
) -> None:
    """Wait until I1, I2 and the ledgers hold on a quiet cluster (and I3, with ``tracker``).

    Raises the last violations on timeout; an I3 break at once, since a port
    that changed never changes back.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_cluster(cluster, quiet=True, tracker=tracker)
            return
        except InvariantViolation:
            if time.monotonic() > deadline or (tracker is not None and tracker.violations):
                raise
        time.sleep(0.5)
