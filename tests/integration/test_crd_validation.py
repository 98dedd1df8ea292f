"""The CRDs on a real API server: they apply, reject bad specs with messages that
name the field, explain themselves, and round-trip the examples.

The invalid manifests are also run through the pydantic models by
tests/unit/test_api_models.py (which loads ``INVALID`` from this file), so the
schema and the models refuse the same things.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth.api import InferenceDeployment, NodePortPool

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES = REPO / "examples"

Doc = dict[str, Any]


def deployment(name: str = "bad") -> Doc:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {
            "engine": {"preset": "vllm"},
            "roles": [
                {
                    "name": "decode",
                    "replicas": 2,
                    "tensorParallelSize": 2,
                    "template": {
                        "spec": {
                            "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.1"}]
                        }
                    },
                }
            ],
        },
    }


def pool(name: str = "bad-pool") -> Doc:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        "spec": {"ranges": [{"start": 20000, "end": 29999}]},
    }


@dataclass
class Case:
    """An invalid manifest and what the API server must say about it."""

    id: str
    manifest: Doc
    #: Substrings the API server's error must contain: the field path at least.
    expect: tuple[str, ...]
    #: Substring the pydantic error must contain ("" = any validation error).
    model_message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _d(change: Callable[[Doc], None]) -> Doc:
    doc = deployment()
    change(doc)
    return doc


def _p(change: Callable[[Doc], None]) -> Doc:
    doc = pool()
    change(doc)
    return doc


def _role(doc: Doc) -> Doc:
    role: Doc = doc["spec"]["roles"][0]
    return role


def _block(name: str, env: str) -> Doc:
    return {"name": name, "size": 1, "env": [{"name": env}]}


def _container(doc: Doc) -> Doc:
    container: Doc = _role(doc)["template"]["spec"]["containers"][0]
    return container


INVALID: list[Case] = [
    # ---------------------------------------------------------- deployments
    Case(
        "no-roles",
        _d(lambda d: d["spec"].update(roles=[])),
        ("spec.roles",),
    ),
    Case(
        "duplicate-roles",
        _d(lambda d: d["spec"]["roles"].append(copy.deepcopy(_role(d)))),
        ("spec.roles", "role names must be unique"),
        "role names must be unique",
    ),
    Case(
        "role-name-uppercase",
        _d(lambda d: _role(d).update(name="Decode")),
        ("spec.roles[0].name",),
    ),
    Case(
        "role-name-too-long",
        _d(lambda d: _role(d).update(name="a" * 17)),
        ("spec.roles[0].name",),
    ),
    Case(
        "replicas-negative",
        _d(lambda d: _role(d).update(replicas=-1)),
        ("spec.roles[0].replicas",),
    ),
    Case(
        "tp-zero",
        _d(lambda d: _role(d).update(tensorParallelSize=0)),
        ("spec.roles[0].tensorParallelSize",),
    ),
    Case(
        "dp-zero",
        _d(lambda d: _role(d).update(dataParallelSize=0)),
        ("spec.roles[0].dataParallelSize",),
    ),
    Case(
        "dp-local-does-not-divide",
        _d(lambda d: _role(d).update(dataParallelSize=6, dataParallelSizeLocal=4)),
        ("spec.roles[0].dataParallelSizeLocal", "must divide dataParallelSize"),
        "dataParallelSizeLocal must divide dataParallelSize",
    ),
    Case(
        "replicas-not-whole-groups",
        _d(lambda d: _role(d).update(replicas=3, dataParallelSize=4, dataParallelSizeLocal=2)),
        ("spec.roles[0].replicas", "multiple of dataParallelSize / dataParallelSizeLocal"),
        "replicas must be a multiple",
    ),
    Case(
        "unknown-engine",
        _d(lambda d: d["spec"]["engine"].update(preset="tgi")),
        ("spec.engine.preset", "Unsupported value"),
    ),
    Case(
        "engine-missing",
        _d(lambda d: d["spec"].pop("engine")),
        ("spec.engine", "Required value"),
    ),
    Case(
        "engine-version-garbage",
        _d(lambda d: d["spec"]["engine"].update(version="latest!")),
        ("spec.engine.version",),
    ),
    Case(
        "custom-with-version",
        _d(lambda d: d["spec"].update(engine={"preset": "custom", "version": "1.0"})),
        ("spec.engine.version", "does not apply to preset custom"),
        "does not apply to preset custom",
    ),
    Case(
        "bind-env-bad-name",
        _d(lambda d: d["spec"]["engine"].update(bindAddressEnv=["1HOST"])),
        ("spec.engine.bindAddressEnv[0]",),
    ),
    Case(
        "duplicate-blocks",
        _d(lambda d: d["spec"].update(ports=[{"name": "http", "size": 1}] * 2)),
        ("spec.ports", "port block names must be unique"),
        "port block names must be unique",
    ),
    Case(
        "duplicate-role-blocks",
        _d(lambda d: _role(d).update(ports=[{"name": "x", "size": 1}, {"name": "x", "size": 2}])),
        ("spec.roles[0].ports", "port block names must be unique"),
        "port block names must be unique",
    ),
    Case(
        "negative-size",
        _d(lambda d: d["spec"].update(ports=[{"name": "extra", "size": -4}])),
        ("spec.ports[0].size",),
    ),
    Case(
        "size-too-large",
        _d(lambda d: d["spec"].update(ports=[{"name": "extra", "size": 100000}])),
        ("spec.ports[0].size",),
    ),
    Case(
        "size-and-rule",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "size": 2, "sizeRule": {"basis": "perRank"}}]
            )
        ),
        ("spec.ports[0].sizeRule", "either size or sizeRule"),
        "set either size or sizeRule, not both",
    ),
    Case(
        "bad-size-basis",
        _d(lambda d: d["spec"].update(ports=[{"name": "x", "sizeRule": {"basis": "perGPU"}}])),
        ("spec.ports[0].sizeRule.basis", "Unsupported value"),
    ),
    Case(
        "zero-multiplier",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "sizeRule": {"basis": "perRank", "multiplier": 0}}]
            )
        ),
        ("spec.ports[0].sizeRule.multiplier",),
    ),
    Case(
        "block-name-invalid",
        _d(lambda d: _role(d).update(ports=[{"name": "NIXL_port", "size": 1}])),
        ("spec.roles[0].ports[0].name",),
    ),
    Case(
        "block-name-too-long",
        _d(lambda d: _role(d).update(ports=[{"name": "a-very-long-block", "size": 1}])),
        ("spec.roles[0].ports[0].name",),
    ),
    Case(
        "bad-env-name",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "size": 1, "env": [{"name": "MY-PORT"}]}]
            )
        ),
        ("spec.ports[0].env[0].name",),
    ),
    Case(
        "env-name-starts-with-digit",
        _d(lambda d: d["spec"].update(ports=[{"name": "x", "size": 1, "env": [{"name": "9P"}]}])),
        ("spec.ports[0].env[0].name",),
    ),
    Case(
        "duplicate-env",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "size": 1, "env": [{"name": "P"}, {"name": "P"}]}]
            )
        ),
        ("spec.ports[0].env", "env names must be unique"),
        "env names within a port block must be unique",
    ),
    Case(
        "unknown-env-value",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "size": 1, "env": [{"name": "P", "value": "end"}]}]
            )
        ),
        ("spec.ports[0].env[0].value", "Unsupported value"),
    ),
    Case(
        "ports-per-rank-on-start",
        _d(
            lambda d: d["spec"].update(
                ports=[{"name": "x", "size": 4, "env": [{"name": "P", "portsPerRank": 2}]}]
            )
        ),
        ("spec.ports[0].env[0].portsPerRank", "applies only to value rankBase"),
        "portsPerRank applies only to value rankBase",
    ),
    Case(
        "service-links-on",
        _d(lambda d: _role(d)["template"]["spec"].update(enableServiceLinks=True)),
        ("spec.roles[0].template.spec.enableServiceLinks", "VLLM_PORT"),
        "enableServiceLinks must be false or unset",
    ),
    Case(
        "no-containers",
        _d(lambda d: _role(d)["template"]["spec"].update(containers=[])),
        ("spec.roles[0].template.spec.containers",),
    ),
    Case(
        "duplicate-containers",
        _d(lambda d: _role(d)["template"]["spec"]["containers"].append(dict(_container(d)))),
        ("spec.roles[0].template.spec.containers", "container names must be unique"),
        "container names must be unique",
    ),
    Case(
        "container-without-image",
        _d(lambda d: _container(d).pop("image")),
        ("spec.roles[0].template.spec.containers[0].image", "Required value"),
    ),
    Case(
        "container-env-bad-name",
        _d(lambda d: _container(d).update(env=[{"name": "A=B", "value": "1"}])),
        ("spec.roles[0].template.spec.containers[0].env[0].name",),
    ),
    Case(
        "name-too-long",
        _d(lambda d: d["metadata"].update(name="l" * 41)),
        ("metadata.name must be at most 40 characters",),
        "metadata.name must be at most 40 characters",
    ),
    # ------------------------- rules across spec.ports, role ports and engine
    Case(
        "env-twice-across-blocks",
        _d(lambda d: d["spec"].update(ports=[_block("a", "P"), _block("b", "P")])),
        ("spec.ports", "an env var is set twice in a role"),
        "an env var is set twice in a role",
    ),
    Case(
        "env-twice-spec-and-role",
        _d(
            lambda d: (
                d["spec"].update(ports=[_block("a", "P")]),
                _role(d).update(ports=[_block("b", "P")]),
            )
        ),
        ("spec.roles", "an env var is set twice in a role"),
        "an env var is set twice in a role",
    ),
    Case(
        "env-is-a-bind-address",
        _d(
            lambda d: (
                d["spec"]["engine"].update(bindAddressEnv=["MY_HOST"]),
                _role(d).update(ports=[_block("a", "MY_HOST")]),
            )
        ),
        ("spec.roles", "an env var is set twice in a role"),
        "an env var is set twice in a role",
    ),
    Case(
        "env-is-the-role-engines-bind-address",
        _d(
            lambda d: (
                _role(d).update(engine={"preset": "vllm", "bindAddressEnv": ["MY_HOST"]}),
                d["spec"].update(ports=[_block("a", "MY_HOST")]),
            )
        ),
        ("spec.roles", "an env var is set twice in a role"),
        "an env var is set twice in a role",
    ),
    Case(
        "custom-block-without-size",
        _d(
            lambda d: (
                d["spec"].update(engine={"preset": "custom"}),
                _role(d).update(ports=[{"name": "http", "env": [{"name": "P"}]}]),
            )
        ),
        ("spec.roles", "with preset custom every enabled port block needs size or sizeRule"),
        "with preset custom every enabled port block needs size or sizeRule",
    ),
    Case(
        "size-rule-too-large",
        _d(
            lambda d: (
                _role(d).update(dataParallelSize=1024, replicas=1),
                d["spec"].update(
                    ports=[{"name": "x", "sizeRule": {"basis": "perRank", "multiplier": 9}}]
                ),
            )
        ),
        ("spec.roles", "sizeRule gives more than 8192 ports"),
        "sizeRule gives more than 8192 ports",
    ),
    # ---------------------------------------------------------------- pools
    Case(
        "range-reversed",
        _p(lambda p: p["spec"].update(ranges=[{"start": 25000, "end": 24000}])),
        ("spec.ranges[0].end", "start must be less than or equal to end"),
        "start must be less than or equal to end",
    ),
    Case(
        "range-beyond-65535",
        _p(lambda p: p["spec"].update(ranges=[{"start": 20000, "end": 70000}])),
        ("spec.ranges[0].end",),
    ),
    Case(
        "no-ranges",
        _p(lambda p: p["spec"].update(ranges=[])),
        ("spec.ranges",),
    ),
    Case(
        "ephemeral-overlap",
        _p(lambda p: p["spec"].update(ranges=[{"start": 40000, "end": 41000}])),
        ("spec.ranges", "ephemeral port range 32768-60999"),
        "ephemeral port range",
    ),
    Case(
        "nodeport-overlap",
        _p(lambda p: p["spec"].update(ranges=[{"start": 29000, "end": 30500}])),
        ("spec.ranges", "NodePort range 30000-32767"),
        "NodePort range",
    ),
    Case(
        "privileged",
        _p(lambda p: p["spec"].update(ranges=[{"start": 80, "end": 2000}])),
        ("spec.ranges", "below 1024"),
        "below 1024",
    ),
    Case(
        "ranges-overlap",
        _p(
            lambda p: p["spec"].update(
                ranges=[{"start": 20000, "end": 21000}, {"start": 20500, "end": 22000}]
            )
        ),
        ("spec.ranges", "must not overlap each other"),
        "ranges must not overlap each other",
    ),
    Case(
        "reserved-outside",
        _p(lambda p: p["spec"].update(reserved=[{"start": 8000}])),
        ("spec.reserved", "inside one of the ranges"),
        "inside one of the ranges",
    ),
    Case(
        "reserved-reversed",
        _p(lambda p: p["spec"].update(reserved=[{"start": 21000, "end": 20000}])),
        ("spec.reserved[0].end", "start must be less than or equal to end"),
        "start must be less than or equal to end",
    ),
    Case(
        "selector-in-without-values",
        _p(
            lambda p: p["spec"].update(
                nodeSelector={"matchExpressions": [{"key": "gpu", "operator": "In"}]}
            )
        ),
        ("spec.nodeSelector.matchExpressions[0].values", "non-empty for operators In"),
        "values must be non-empty for operators In and NotIn",
    ),
    Case(
        "selector-bad-operator",
        _p(
            lambda p: p["spec"].update(
                nodeSelector={"matchExpressions": [{"key": "gpu", "operator": "Gt"}]}
            )
        ),
        ("spec.nodeSelector.matchExpressions[0].operator", "Unsupported value"),
    ),
    Case(
        "priority-out-of-range",
        _p(lambda p: p["spec"].update(priority=5000)),
        ("spec.priority",),
    ),
]


#: Specs the rules across blocks must accept: a role's block replaces spec.ports'
#: block of its name, blocks that say enabled: false do not count, custom blocks
#: may take their size from spec.ports.
VALID: list[tuple[str, Doc]] = [
    (
        "role-overrides-env",
        _d(
            lambda d: (
                d["spec"].update(ports=[_block("a", "P"), _block("b", "Q")]),
                _role(d).update(ports=[_block("a", "Q"), _block("b", "P")]),
            )
        ),
    ),
    (
        "disabled-block-env-does-not-count",
        _d(
            lambda d: (
                d["spec"].update(ports=[_block("a", "P"), {**_block("b", "P"), "enabled": False}]),
                _role(d).update(ports=[_block("c", "Q"), {**_block("d", "Q"), "enabled": False}]),
            )
        ),
    ),
    (
        "overridden-spec-block-env-does-not-count",
        _d(
            lambda d: (
                d["spec"].update(ports=[_block("a", "P")]),
                _role(d).update(ports=[{"name": "a", "enabled": False}, _block("b", "P")]),
            )
        ),
    ),
    (
        "custom-size-from-spec-ports",
        _d(
            lambda d: (
                d["spec"].update(engine={"preset": "custom"}, ports=[_block("http", "P")]),
                _role(d).update(ports=[{"name": "http", "align": 2}]),
            )
        ),
    ),
    (
        "size-rule-fits-this-role",
        # tensorParallelSize 2 x 1024 ranks x 4 = 8192: exactly the limit.
        _d(
            lambda d: (
                _role(d).update(dataParallelSize=1024, replicas=1),
                d["spec"].update(
                    ports=[{"name": "x", "sizeRule": {"basis": "perRank", "multiplier": 4}}]
                ),
            )
        ),
    ),
]


# ------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def crds(cluster: Any) -> Iterator[Any]:
    """The CRDs, applied and established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/inferencedeployments.berth.dev",
        "crd/nodeportpools.berth.dev",
    )
    # The discovery cache may lag a moment behind Established.
    for _ in range(30):
        if cluster.kubectl("get", "nodeportpools", check=False).returncode == 0:
            break
    yield cluster


def _apply(cluster: Any, namespace: str, doc: Doc, check: bool = False) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=check)


@pytest.mark.integration
def test_crds_apply(crds: Any) -> None:
    out = crds.kubectl("get", "crd", "-o", "name").stdout
    assert "customresourcedefinition.apiextensions.k8s.io/inferencedeployments.berth.dev" in out
    assert "customresourcedefinition.apiextensions.k8s.io/nodeportpools.berth.dev" in out
    # Applying the same files again (plain client-side apply) is a no-op, not an error.
    again = crds.kubectl("apply", "-f", str(CRD_DIR))
    assert again.returncode == 0


@pytest.mark.integration
@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_manifest_rejected(crds: Any, namespace: str, case: Case) -> None:
    doc = copy.deepcopy(case.manifest)
    if doc["kind"] == "NodePortPool":
        doc["metadata"]["name"] = f"{namespace}-{case.id}"[:60]
    result = _apply(crds, namespace, doc)
    try:
        assert result.returncode != 0, f"{case.id} was accepted:\n{result.stdout}"
        for expected in case.expect:
            assert expected in result.stderr, f"{case.id}: {expected!r} not in:\n{result.stderr}"
    finally:
        if result.returncode == 0:  # clean up what should not have been created
            crds.kubectl("delete", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)


@pytest.mark.integration
@pytest.mark.parametrize(("name", "manifest"), VALID, ids=[v[0] for v in VALID])
def test_valid_overrides_accepted(crds: Any, namespace: str, name: str, manifest: Doc) -> None:
    doc = copy.deepcopy(manifest)
    doc["metadata"]["name"] = name
    result = _apply(crds, namespace, doc)
    assert result.returncode == 0, f"{name} was refused:\n{result.stderr}"


@pytest.mark.integration
def test_unsafe_pool_accepted_when_allowed(crds: Any, namespace: str) -> None:
    doc = pool(f"{namespace}-unsafe")
    doc["spec"].update(ranges=[{"start": 9000, "end": 40000}], allowUnsafeRanges=True)
    try:
        _apply(crds, namespace, doc, check=True)
    finally:
        crds.kubectl("delete", "nodeportpool", doc["metadata"]["name"], check=False)


@pytest.mark.integration
def test_explain_prints_descriptions(crds: Any) -> None:
    out = crds.kubectl("explain", "inferencedeployment.spec.roles").stdout
    assert "A group of identical worker pods" in out
    assert "dataParallelSizeLocal" in out
    assert "DP ranks per pod" in out
    deep = crds.kubectl("explain", "inferencedeployment.spec.ports.env.value").stdout
    assert "rankBase" in deep
    pools = crds.kubectl("explain", "nodeportpool.spec.allowUnsafeRanges").stdout
    assert "ephemeral" in pools


def _example_docs() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


@pytest.mark.integration
@pytest.mark.parametrize("path", sorted(p.name for p in EXAMPLES.glob("*.yaml")), ids=str)
def test_example_applies_and_round_trips(crds: Any, namespace: str, path: str) -> None:
    docs = [doc for name, doc in _example_docs() if name == path]
    pools = [d for d in docs if d["kind"] == "NodePortPool"]
    # Cluster-scoped pools: unique names per test run.
    for doc in pools:
        doc["metadata"]["name"] = f"{namespace}-{doc['metadata']['name']}"
    try:
        for doc in docs:
            _apply(crds, namespace, doc, check=True)
        for doc in docs:
            kind = doc["kind"].lower()
            name = doc["metadata"]["name"]
            args = ["get", kind, name, "-o", "json"]
            if doc["kind"] == "InferenceDeployment":
                args += ["-n", namespace]
            stored = json.loads(crds.kubectl(*args).stdout)
            model = (
                InferenceDeployment if doc["kind"] == "InferenceDeployment" else NodePortPool
            ).model_validate(stored)
            sent = type(model).model_validate(doc)
            # What we wrote is what we read back (the server only adds defaults,
            # which the models apply too).
            assert model.spec == sent.spec
            assert stored["metadata"]["name"] == name
    finally:
        for doc in pools:
            crds.kubectl("delete", "nodeportpool", doc["metadata"]["name"], check=False)


@pytest.mark.integration
def test_defaults_applied_by_the_server(crds: Any, namespace: str) -> None:
    doc = deployment("defaults")
    _apply(crds, namespace, doc, check=True)
    stored = json.loads(
        crds.kubectl("get", "inferencedeployment", "defaults", "-n", namespace, "-o", "json").stdout
    )
    role = stored["spec"]["roles"][0]
    assert role["dataParallelSize"] == 1
    assert role["template"]["spec"]["hostNetwork"] is True
    assert "dataParallelSizeLocal" not in role


@pytest.mark.integration
def test_status_subresource_and_printer_columns(crds: Any, namespace: str) -> None:
    doc = deployment("columns")
    _apply(crds, namespace, doc, check=True)
    status = {
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "AllReady",
                    "message": "2/2 pods ready",
                    "lastTransitionTime": "2025-11-20T10:00:00Z",
                }
            ],
            "roles": [{"name": "decode", "desired": 2, "ready": 2, "allocated": 2}],
            "summary": "node-a: 20000-20100",
            "decode": "2/2",
        }
    }
    crds.kubectl(
        "patch",
        "inferencedeployment",
        "columns",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = crds.kubectl("get", "infd", "columns", "-n", namespace, "-o", "wide").stdout
    header, row = table.strip().splitlines()[:2]
    for column in ("READY", "PREFILL", "DECODE", "PRESET", "PORTS", "AGE"):
        assert column in header
    assert "True" in row and "2/2" in row and "vllm" in row and "node-a: 20000-20100" in row
    # The spec did not move: status went through its own subresource.
    stored = json.loads(
        crds.kubectl("get", "infd", "columns", "-n", namespace, "-o", "json").stdout
    )
    assert stored["metadata"]["generation"] == 1
    assert stored["status"]["roles"][0]["allocated"] == 2
