"""Pod and ConfigMap builders: what the kubelet and the engines will see."""

from __future__ import annotations

import json
from typing import Any

import pytest

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeployment
from berth.engines import resolve_role
from berth.manifests import pod_ports_configmap_body, port_map_body, worker_pod
from berth.names import ANNOTATION_PORT_PLAN, ANNOTATION_PORTS, LABEL_DEPLOYMENT
from berth.plan import PlanError, PortPlan, first_global_rank


def deployment(**role_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "dep-uid", "generation": 1},
        "spec": {
            "engine": {"preset": "vllm"},
            "roles": [
                {
                    "name": "decode",
                    "replicas": 2,
                    "tensorParallelSize": 2,
                    "dataParallelSize": 8,
                    "dataParallelSizeLocal": 4,
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "engine",
                                    "image": "vllm/vllm-openai:v0.11.1",
                                    "args": ["--port", "$(BERTH_HTTP_PORT)"],
                                    "env": [{"name": "HF_HOME", "value": "/cache"}],
                                }
                            ]
                        }
                    },
                    **role_extra,
                }
            ],
        },
    }


def build(index: int, **role_extra: Any) -> tuple[dict[str, Any], PortPlan]:
    body = deployment(**role_extra)
    model = InferenceDeployment.model_validate(body)
    role = model.spec.roles[0]
    resolved = resolve_role(model.spec, role)
    plan = PortPlan(resolved, first_global_rank(role, index))
    template = role.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    pod = worker_pod(body, role.name, index, template, plan)
    return pod, plan


def test_pod_defaults_prevent_known_field_failures() -> None:
    pod, _ = build(0)
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    assert spec["enableServiceLinks"] is False
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    host = env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert host == "status.hostIP"
    assert env["HF_HOME"] == {"name": "HF_HOME", "value": "/cache"}


def test_bind_address_is_pod_ip_without_host_network() -> None:
    body = deployment()
    body["spec"]["roles"][0]["template"]["spec"]["hostNetwork"] = False
    model = InferenceDeployment.model_validate(body)
    role = model.spec.roles[0]
    resolved = resolve_role(model.spec, role)
    template = role.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    pod = worker_pod(body, "decode", 0, template, PortPlan(resolved, 0))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "status.podIP"
    )


def test_port_env_comes_from_the_per_pod_configmap_before_user_env() -> None:
    pod, plan = build(1)
    env = pod["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names.index("BERTH_HTTP_PORT") < names.index("HF_HOME")
    refs = {
        e["name"]: e["valueFrom"]["configMapKeyRef"]
        for e in env
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {*plan.env_names(), *plan.group_env_names()}
    assert {r["name"] for r in refs.values()} == {"llama-decode-1-ports"}
    assert all(r["key"] == name for name, r in refs.items())


def test_pod_identity_owner_and_plan() -> None:
    pod, plan = build(1)
    meta = pod["metadata"]
    assert meta["name"] == "llama-decode-1"
    assert meta["labels"][LABEL_DEPLOYMENT] == "llama"
    assert meta["ownerReferences"][0]["uid"] == "dep-uid"
    stored = PortPlan.of_pod(meta["annotations"])
    assert (stored.role.blocks, stored.first_rank) == (plan.role.blocks, plan.first_rank)
    # dp 8 over pods of 4 ranks: pod 1 holds global ranks 4..7
    assert plan.first_rank == 4


def test_plan_round_trips_and_rejects_garbage() -> None:
    _, plan = build(0)
    again = PortPlan.decode(plan.encode())
    assert (again.role.blocks, again.first_rank) == (plan.role.blocks, plan.first_rank)
    assert again.encode() == plan.encode()
    with pytest.raises(PlanError):
        PortPlan.of_pod({ANNOTATION_PORT_PLAN: "{not json"})
    with pytest.raises(PlanError):
        PortPlan.of_pod({})


def test_rank_base_keeps_every_rank_inside_the_block() -> None:
    """Engines bind base + global DP rank: with ranks 4..7 the base is start - 4."""
    _, plan = build(1)
    start = 21000
    blocks = {}
    for block in plan.role.blocks:
        blocks[block.name] = PortRange(start, start + block.size - 1)
        start += block.size
    env = plan.env(Assignment("uid", blocks))
    nixl = blocks["nixl"]
    base = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    bound = [base + rank for rank in range(plan.first_rank, plan.first_rank + 4)]
    assert all(port in nixl for port in bound), (bound, nixl)


def test_configmaps_for_pod_and_deployment() -> None:
    pod, _ = build(0)
    pod["metadata"]["uid"] = "pod-uid"
    assignment = Assignment("pod-uid", {"http": PortRange(20000, 20000)})
    cm = pod_ports_configmap_body(pod, {"BERTH_HTTP_PORT": "20000"}, assignment)
    assert cm["metadata"]["name"] == "llama-decode-0-ports"
    assert cm["metadata"]["ownerReferences"][0] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "llama-decode-0",
        "uid": "pod-uid",
    }
    assert cm["data"] == {"BERTH_HTTP_PORT": "20000"}
    # The ConfigMap witnesses the delivery on its own (see repair.py).
    assert cm["metadata"]["annotations"] == {ANNOTATION_PORTS: '{"http":"20000"}'}
    pod["metadata"]["annotations"][ANNOTATION_PORTS] = json.dumps({"http": "20000"})
    pod["spec"]["nodeName"] = "node-a"
    pod["status"] = {"hostIP": "10.0.0.7", "podIP": "10.0.0.7"}
    other, _ = build(1)  # no ports yet: not listed
    body = port_map_body(deployment(), [pod, other])
    entry = json.loads(body["data"]["llama-decode-0"])
    assert entry == {
        "role": "decode",
        "node": "node-a",
        "hostIP": "10.0.0.7",
        "podIP": "10.0.0.7",
        "ports": {"http": "20000"},
    }
    assert list(body["data"]) == ["llama-decode-0"]
