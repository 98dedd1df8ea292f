"""The API models: valid specs parse with the documented defaults, invalid ones fail
with the same messages the CRD's CEL rules carry."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from berth.api import InferenceDeployment, NodePortPool, RoleSpec

REPO = Path(__file__).resolve().parents[2]


def _cases_module() -> ModuleType:
    """The invalid manifests the integration test sends to the API server."""
    path = REPO / "tests" / "integration" / "test_crd_validation.py"
    spec = importlib.util.spec_from_file_location("berth_crd_validation_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CASES = _cases_module()


def minimal(**role: Any) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {
            "engine": {"preset": "vllm"},
            "roles": [
                {
                    "name": "decode",
                    "template": {
                        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}
                    },
                    **role,
                }
            ],
        },
    }


def load_examples() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def parse(doc: dict[str, Any]) -> InferenceDeployment | NodePortPool:
    if doc["kind"] == "InferenceDeployment":
        return InferenceDeployment.model_validate(doc)
    return NodePortPool.model_validate(doc)


def test_every_example_parses() -> None:
    docs = load_examples()
    assert {d["kind"] for d in docs} == {"InferenceDeployment", "NodePortPool"}
    for doc in docs:
        parse(doc)


def test_defaults() -> None:
    d = InferenceDeployment.model_validate(minimal())
    role = d.spec.roles[0]
    assert role.replicas == 1
    assert role.tensor_parallel_size == 1
    assert role.data_parallel_size == 1
    assert role.data_parallel_size_local is None
    assert role.dp_local == 1
    assert role.template.spec.host_network is True
    assert d.status is None
    assert d.metadata == {"name": "llama", "namespace": "ml"}
    assert d.name == "llama" and d.namespace == "ml"


def test_dp_local_defaults_to_dp() -> None:
    role = InferenceDeployment.model_validate(minimal(dataParallelSize=4)).spec.roles[0]
    assert role.dp_local == 4
    assert role.pods_per_group == 1


def test_snake_case_names_are_accepted_too() -> None:
    role = RoleSpec.model_validate(
        {
            "name": "prefill",
            "tensor_parallel_size": 4,
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        }
    )
    assert role.tensor_parallel_size == 4


def test_raw_kopf_body_with_status_and_server_fields() -> None:
    body = minimal()
    body["metadata"].update(
        uid="u-1",
        generation=3,
        resourceVersion="42",
        managedFields=[{"manager": "kubectl"}],
        annotations={"kopf.zalando.org/last-handled-configuration": "{}"},
    )
    body["status"] = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "NotReady",
                "message": "0/1 pods ready",
                "lastTransitionTime": "2025-11-20T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "roles": [{"name": "decode", "desired": 1, "ready": 0, "allocated": 1}],
        "summary": "node-a: 20000-20052",
        "decode": "0/1",
        "kopf": {"progress": {}},  # written by kopf, not ours: ignored
    }
    d = InferenceDeployment.model_validate(body)
    assert d.metadata["uid"] == "u-1"
    assert d.status is not None
    ready = d.status.condition("Ready")
    assert ready is not None and ready.status == "False"
    assert d.status.condition("Degraded") is None
    assert d.status.roles is not None and d.status.roles[0].allocated == 1
    assert d.status.decode == "0/1"


def test_template_passes_unknown_pod_fields_through() -> None:
    doc = minimal()
    spec = doc["spec"]["roles"][0]["template"]["spec"]
    spec["priorityClassName"] = "inference"
    spec["initContainers"] = [{"name": "fetch", "image": "busybox"}]
    spec["securityContext"] = {"runAsUser": 1000}
    container = spec["containers"][0]
    container["ports"] = [{"containerPort": 9999, "name": "debug"}]
    container["env"] = [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    container["resources"] = {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi", "cpu": 0.5}}
    d = InferenceDeployment.model_validate(doc)
    dumped = d.spec.roles[0].template.model_dump(mode="json", by_alias=True, exclude_none=True)
    out = dumped["spec"]
    assert out["priorityClassName"] == "inference"
    assert out["initContainers"] == [{"name": "fetch", "image": "busybox"}]
    assert out["securityContext"] == {"runAsUser": 1000}
    assert out["hostNetwork"] is True
    c = out["containers"][0]
    assert c["ports"] == [{"containerPort": 9999, "name": "debug"}]
    assert c["env"] == [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    assert c["readinessProbe"] == {"httpGet": {"path": "/health", "port": 8000}}
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi", "cpu": 0.5}}
    assert "command" not in c  # unset optional fields do not become empty lists


def test_host_network_can_be_turned_off() -> None:
    doc = minimal()
    doc["spec"]["roles"][0]["template"]["spec"]["hostNetwork"] = False
    d = InferenceDeployment.model_validate(doc)
    assert d.spec.roles[0].template.spec.host_network is False


def test_unknown_spec_field_is_a_typo() -> None:
    doc = minimal()
    doc["spec"]["roles"][0]["tensorParalelSize"] = 2
    with pytest.raises(ValidationError, match="tensorParalelSize"):
        InferenceDeployment.model_validate(doc)


def test_long_name_rejected() -> None:
    doc = minimal()
    doc["metadata"]["name"] = "x" * 41
    with pytest.raises(ValidationError, match="at most 40 characters"):
        InferenceDeployment.model_validate(doc)


def test_valid_variants() -> None:
    for role in (
        {"dataParallelSize": 8, "dataParallelSizeLocal": 2, "replicas": 8},
        {"dataParallelSize": 8, "dataParallelSizeLocal": 8, "replicas": 3},
        {"replicas": 0},
        {"ports": [{"name": "extra", "size": 2, "align": 2, "env": [{"name": "X_PORT"}]}]},
        {"ports": [{"name": "nixl", "enabled": False}]},
        {"engine": {"preset": "custom"}},
        {"engine": {"preset": "sglang", "version": "v0.5.4.post1"}},
    ):
        InferenceDeployment.model_validate(minimal(**role))


@pytest.mark.parametrize(("name", "manifest"), CASES.VALID, ids=[v[0] for v in CASES.VALID])
def test_models_accept_what_the_api_server_accepts(name: str, manifest: Any) -> None:
    InferenceDeployment.model_validate(copy.deepcopy(manifest))


def test_pool_with_unsafe_ranges_allowed() -> None:
    pool = NodePortPool.model_validate(
        {
            "metadata": {"name": "low"},
            "spec": {
                "ranges": [{"start": 1000, "end": 1100}, {"start": 31000, "end": 33000}],
                "allowUnsafeRanges": True,
            },
        }
    )
    assert pool.spec.allow_unsafe_ranges
    assert pool.spec.priority == 0


def test_at_least_twenty_invalid_manifests() -> None:
    assert len(CASES.INVALID) >= 20
    assert len({c.id for c in CASES.INVALID}) == len(CASES.INVALID)


@pytest.mark.parametrize("case", CASES.INVALID, ids=[c.id for c in CASES.INVALID])
def test_models_reject_what_the_api_server_rejects(case: Any) -> None:
    """Every invalid manifest of the integration suite fails model validation too,
    with the CEL rule's message where the rule is a CEL rule."""
    doc = copy.deepcopy(case.manifest)
    with pytest.raises(ValidationError) as error:
        parse(doc)
    if case.model_message:
        assert case.model_message in str(error.value)
