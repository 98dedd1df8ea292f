"""The Helm chart without a cluster: lint, schema, rendered objects, RBAC, drift.

`helm` comes from the cache hack/build-tools.sh fills (hack/env.sh puts it on
PATH); tests/integration/test_helm_chart.py takes the rendered output to a
real API server and tests/integration/test_rbac.py proves the RBAC rules.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.tools import find_helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
DOCS = ROOT / "docs" / "install.md"
NAMESPACE = "berth-system"

Body = dict[str, Any]

# What the operator calls, proven verb by verb by tests/integration/test_rbac.py.
CLUSTER_RULES = {
    ("", "pods"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "configmaps"): {"get", "create", "update", "patch", "delete"},
    ("", "nodes"): {"list", "watch"},
    ("", "nodes/status"): {"patch"},
    ("", "events"): {"create"},
    ("berth.dev", "inferencedeployments"): {"get", "list", "watch", "patch"},
    ("berth.dev", "inferencedeployments/status"): {"patch"},
    ("berth.dev", "nodeportpools"): {"list", "watch"},
    ("berth.dev", "nodeportpools/status"): {"patch"},
}
# The release namespace: ledgers listed, the leader-election Lease.
LEDGER_RULES = {
    ("", "configmaps"): {"list"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}
# Asked for at design time, never called (docs/install.md says why): kept out.
UNUSED = [
    ("", "nodes", "get"),
    ("", "nodes/status", "get"),
    ("", "nodes/status", "update"),
    ("", "events", "patch"),
    ("berth.dev", "inferencedeployments/status", "get"),
    ("berth.dev", "inferencedeployments/status", "update"),
    ("berth.dev", "nodeportpools", "get"),
    ("berth.dev", "nodeportpools/status", "get"),
    ("berth.dev", "nodeportpools/status", "update"),
]


def helm_binary() -> str:
    found = find_helm()
    if found is None:
        pytest.fail("helm is missing: hack/setup.sh builds it")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def render(*sets: str, values: Body | None = None, release: str = "berth") -> list[Body]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--skip-crds"]
    for item in sets:
        args += ["--set", item]
    with tempfile.TemporaryDirectory() as tmp:
        if values is not None:
            path = Path(tmp) / "values.json"
            path.write_text(json.dumps(values))
            args += ["--values", str(path)]
        out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@cache
def default_objects() -> tuple[Body, ...]:
    return tuple(render())


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-view"
AGGREGATE_EDIT = "rbac.authorization.k8s.io/aggregate-to-edit"


def for_users(obj: Body) -> bool:
    """The berth-view/berth-edit roles for people, not the operator's."""
    labels = obj["metadata"].get("labels", {})
    return AGGREGATE in labels or AGGREGATE_EDIT in labels


def one(objects: Any, kind: str) -> Body:
    found = [o for o in objects if o["kind"] == kind and not for_users(o)]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: Any) -> Body:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    c: Body = pod["containers"][0]
    return c


def env_of(objects: Any) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


def rules_of(role: Body) -> Iterator[tuple[str, str, set[str]]]:
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                yield group, resource, set(rule["verbs"])


def as_table(role: Body) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for group, resource, verbs in rules_of(role):
        table.setdefault((group, resource), set()).update(verbs)
    return table


# --- lint, metadata, drift ----------------------------------------------------


def test_helm_lint_strict_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_chart_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"] == "0.1.0"
    # ValidatingAdmissionPolicy is GA (admissionregistration.k8s.io/v1) from 1.30.
    assert chart["kubeVersion"].startswith(">=1.30")
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


def test_chart_crds_are_the_generated_crds() -> None:
    """charts/berth/crds/ must be byte-identical to crds/ (both written by crdgen)."""
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert top and top == chart, f"crds/ {top} != charts/berth/crds/ {chart}"
    _, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", top, shallow=False)
    assert not mismatch and not errors, (
        f"drift: {mismatch + errors}: run python -m berth.api.crdgen"
    )


def test_deploy_manifest_is_rendered_from_the_chart(tmp_path: Path) -> None:
    helm_binary()
    fresh = tmp_path / "berth.yaml"
    subprocess.run(
        [str(ROOT / "hack" / "render-manifests.sh"), str(fresh)],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{Path(helm_binary()).parent}:{os.environ['PATH']}"},
    )
    committed = ROOT / "deploy" / "berth.yaml"
    assert committed.read_text() == fresh.read_text(), (
        "deploy/berth.yaml is stale: run hack/render-manifests.sh"
    )
    docs = [d for d in yaml.safe_load_all(committed.read_text()) if d]
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == NAMESPACE
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"], "CRDs live in crds/"


# --- RBAC -----------------------------------------------------------------------


def test_rbac_has_no_wildcards_secrets_or_escalation() -> None:
    roles = [o for o in default_objects() if o["kind"] in ("ClusterRole", "Role")]
    roles = [o for o in roles if not for_users(o)]
    assert len(roles) == 2
    for role in roles:
        for group, resource, verbs in rules_of(role):
            assert "*" not in (group, resource) and "*" not in verbs, role["metadata"]["name"]
            assert resource not in ("secrets", "customresourcedefinitions")
            assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def test_rbac_is_exactly_the_proven_rules() -> None:
    objects = default_objects()
    cluster_role = one(objects, "ClusterRole")
    role = one(objects, "Role")
    assert as_table(cluster_role) == CLUSTER_RULES
    assert as_table(role) == LEDGER_RULES
    assert role["metadata"]["namespace"] == NAMESPACE  # ledgers live in the release namespace
    granted = {(g, r, v) for g, r, verbs in rules_of(cluster_role) for v in verbs}
    granted |= {(g, r, v) for g, r, verbs in rules_of(role) for v in verbs}
    assert not granted & set(UNUSED)


def test_bindings_tie_both_roles_to_the_service_account() -> None:
    objects = default_objects()
    account = one(objects, "ServiceAccount")["metadata"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(objects, kind)
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["roleRef"]["name"] == one(objects, role_kind)["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
        ]


def test_rbac_and_service_account_can_be_brought_by_the_user() -> None:
    objects = render("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "ClusterRoleBinding",
        "RoleBinding",
    }
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def docs_rbac_table() -> dict[tuple[str, str, str], set[str]]:
    """Rows of docs/install.md's RBAC table: (scope, group, resource) -> verbs."""
    rows: dict[tuple[str, str, str], set[str]] = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0].split()[0] not in ("ClusterRole", "Role"):
            continue
        group = cells[1].strip("`")
        group = "" if group in ("core", '""') else group
        verbs = {v.strip("` ") for v in cells[3].split(",")}
        rows.setdefault((cells[0].split()[0], group, cells[2].strip("`")), set()).update(verbs)
    return rows


def test_docs_rbac_table_is_the_chart_rbac() -> None:
    want = {("ClusterRole", g, r): v for (g, r), v in CLUSTER_RULES.items()}
    want |= {("Role", g, r): v for (g, r), v in LEDGER_RULES.items()}
    assert docs_rbac_table() == want


# --- the operator's Deployment ------------------------------------------------


def test_two_replicas_elect_one_and_roll_without_a_gap() -> None:
    objects = default_objects()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # A new standby is up before an old pod goes; a leaving leader releases the Lease.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = env_of(objects)
    assert env["BERTH_LEADER_ELECTION"] == "true"
    assert env["BERTH_LEASE_NAME"] == "berth"
    assert env["BERTH_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    timings = [env[f"BERTH_LEASE_{k}"] for k in ("DURATION", "RENEW_DEADLINE", "RENEW_PERIOD")]
    assert timings == ["8", "5", "2"] and env["BERTH_LEASE_RETRY_PERIOD"] == "1"
    args = container(objects)["args"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in args
    assert not [a for a in args if a.startswith(("--peering", "--priority"))]


def test_replicas_prefer_different_nodes_unless_affinity_is_given() -> None:
    pod = one(default_objects(), "Deployment")["spec"]["template"]["spec"]
    selector = one(default_objects(), "Deployment")["spec"]["selector"]["matchLabels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100
    assert term["podAffinityTerm"] == {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": selector},
    }
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    pod = one(render(values={"affinity": mine}), "Deployment")["spec"]["template"]["spec"]
    assert pod["affinity"] == mine


def test_without_leader_election_no_lease_rule_and_no_lease_settings() -> None:
    objects = render("leaderElection.enabled=false")
    assert env_of(objects)["BERTH_LEADER_ELECTION"] == "false"
    assert not [k for k in env_of(objects) if k.startswith("BERTH_LEASE") or k == "BERTH_POD_NAME"]
    assert as_table(one(objects, "Role")) == {("", "configmaps"): {"list"}}


def test_one_replica_keeps_a_drainable_pdb() -> None:
    pdb = one(render("replicaCount=1"), "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    pdb = one(render("replicaCount=3", "podDisruptionBudget.minAvailable=2"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["leaderElection.renewDeadlineSeconds=8"],
            "need renewPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds, got 2 < 8 < 8",
        ),
        (
            ["leaderElection.renewPeriodSeconds=5"],
            "need renewPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds, got 5 < 5 < 8",
        ),
        (
            ["podDisruptionBudget.minAvailable=2"],
            "podDisruptionBudget.minAvailable (2) must be below replicaCount (2)",
        ),
    ],
)
def test_settings_that_cannot_work_fail_the_render(sets: list[str], message: str) -> None:
    args = [a for item in sets for a in ("--set", item)]
    result = helm("template", "berth", str(CHART), *args, check=False)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_restricted_security_context() -> None:
    pod = one(default_objects(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(default_objects())["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod


def test_writable_tmp_home_for_a_read_only_root() -> None:
    objects = default_objects()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    env = env_of(objects)
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]


def test_probes_ports_and_resources() -> None:
    c = container(default_objects())
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind


def test_default_settings_reach_the_operator() -> None:
    env = env_of(default_objects())
    assert env["BERTH_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["BERTH_DEFAULT_POOL"] == "20000-29999"
    assert env["BERTH_DEFAULT_RESERVED"] == ""
    assert env["BERTH_SWEEP_INTERVAL"] == "60"
    assert env["BERTH_METRICS_PORT"] == "8080"
    assert env["BERTH_WATCH_NAMESPACES"] == ""


def test_values_reach_the_operator() -> None:
    objects = render(
        values={
            "defaultPool": ["20000-24999", "26000-27999"],
            "reservedPorts": ["22222", "20400-20409"],
            "watchNamespaces": ["ml", "serving"],
            "sweepIntervalSeconds": 15,
            "logLevel": "debug",
            "logFormat": "text",
            "metrics": {"port": 9090},
            "health": {"port": 9091},
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "image": {
                "repository": "registry.example/berth",
                "tag": "0.1.1",
                "pullPolicy": "Always",
            },
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
        }
    )
    env = env_of(objects)
    assert env["BERTH_DEFAULT_POOL"] == "20000-24999,26000-27999"
    assert env["BERTH_DEFAULT_RESERVED"] == "22222,20400-20409"
    assert env["BERTH_WATCH_NAMESPACES"] == "ml,serving"
    assert env["BERTH_SWEEP_INTERVAL"] == "15"
    assert env["BERTH_METRICS_PORT"] == "9090"
    assert env["BERTH_LOG_FORMAT"] == "text"
    assert env["BERTH_LOG_LEVEL"] == "debug"
    assert env["EXTRA"] == "1"
    c = container(objects)
    assert c["image"] == "registry.example/berth:0.1.1"
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == ["--liveness=http://0.0.0.0:9091/healthz"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090, "health": 9091}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert pod["tolerations"][0]["key"] == "dedicated"
    service = one(objects, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "metrics": 9090,
        "health": 9091,
    }


def test_service_and_pdb_select_the_operator_pod() -> None:
    objects = default_objects()
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    service = one(objects, "Service")["spec"]["selector"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert service == selector == pdb["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    # Two replicas: a drain evicts one at a time; a standby takes over.
    assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb
    # Never the label Berth puts on its worker pods.
    assert labels.get("app.kubernetes.io/managed-by") != "berth"


CLUSTER_SCOPED = (
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


def test_every_object_has_the_standard_labels() -> None:
    for obj in default_objects():
        labels = obj["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, f"{obj['kind']} lacks {key}"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


# --- values.schema.json and template checks ----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=0"], "at '/replicaCount': minimum"),
        (
            ["--set", "leaderElection.leaseDurationSeconds=1"],
            "at '/leaderElection/leaseDurationSeconds'",
        ),
        (["--set", "leaderElection.enabled=yes"], "at '/leaderElection/enabled'"),
        (["--set", "defaultPool={20000-}"], "at '/defaultPool/0': '20000-' does not match pattern"),
        (["--set-json", "defaultPool=[]"], "at '/defaultPool': minItems"),
        (["--set", "reservedPorts={http}"], "at '/reservedPorts/0': 'http' does not match"),
        (["--set", "logFormat=xml"], "at '/logFormat': value must be one of 'text', 'json'"),
        (
            ["--set", "logLevel=trace"],
            "at '/logLevel': value must be one of 'debug', 'info', 'warning'",
        ),
        (["--set", "sweepIntervalSeconds=0"], "at '/sweepIntervalSeconds': minimum"),
        (["--set", "watchNamespaces={Bad_NS}"], "at '/watchNamespaces/0'"),
        (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
        (["--set", "metrics.port=70000"], "at '/metrics/port': maximum"),
        (["--set", "podDisruptionBudget.minAvailable=0"], "at '/podDisruptionBudget/minAvailable'"),
        (
            ["--set", "podDisruptionBudget.maxUnavailable=1"],
            "additional properties 'maxUnavailable' not allowed",
        ),
        (
            ["--set", "securityContext.readOnlyRootFilesystem=false"],
            "at '/securityContext/readOnlyRootFilesystem': value must be true",
        ),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "value must be true"),
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(args: list[str], message: str) -> None:
    result = helm("template", "berth", str(CHART), *args, check=False)
    assert result.returncode == 1, result.stdout[:500]
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("29999-20000", 'defaultPool: "29999-20000" starts after it ends'),
        ("20000-99999", 'defaultPool: "20000-99999" is outside 1-65535'),
        ("0-10", 'defaultPool: "0-10" is outside 1-65535'),
    ],
)
def test_ranges_the_pattern_cannot_judge_fail_the_render(value: str, message: str) -> None:
    result = helm("template", "berth", str(CHART), "--set", f"defaultPool={{{value}}}", check=False)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


# --- docs -----------------------------------------------------------------------


def value_paths(values: Body, prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and key
            not in (
                "resources",
                "podSecurityContext",
                "securityContext",
            )
        ):
            yield from value_paths(value, f"{path}.")
        else:
            yield path


def test_every_value_is_in_the_docs_values_table() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = DOCS.read_text()
    missing = [p for p in value_paths(values) if f"| `{p}` |" not in text]
    assert not missing, f"docs/install.md's values table lacks {missing}"


# --- admission policies and user roles (tests/integration/test_admission.py) ---


def kinds(objects: Any, kind: str) -> dict[str, Body]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def variable(policy: Body, name: str) -> str:
    found = [v["expression"] for v in policy["spec"]["variables"] if v["name"] == name]
    assert len(found) == 1, name
    return str(found[0])


def test_pool_guard_on_by_default_and_off_by_value() -> None:
    policies = kinds(default_objects(), "ValidatingAdmissionPolicy")
    bindings = kinds(default_objects(), "ValidatingAdmissionPolicyBinding")
    guards = {"berth-pool-guard", "berth-default-pool-guard"}
    assert guards <= set(policies) and guards <= set(bindings)
    pools = bindings["berth-pool-guard"]["spec"]
    # One binding, every NodePortPool a parameter; no pool, nothing to refuse.
    assert pools["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    assert policies["berth-pool-guard"]["spec"]["paramKind"]["kind"] == "NodePortPool"
    assert "paramRef" not in bindings["berth-default-pool-guard"]["spec"]
    for name in guards:
        assert bindings[name]["spec"]["validationActions"] == ["Deny"]
        assert policies[name]["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == [
            "CREATE"
        ]
    off = render("poolGuard.enabled=false")
    assert not guards & set(kinds(off, "ValidatingAdmissionPolicy"))
    assert not guards & set(kinds(off, "ValidatingAdmissionPolicyBinding"))
    warn = kinds(render("poolGuard.action=Warn"), "ValidatingAdmissionPolicyBinding")
    assert all(warn[name]["spec"]["validationActions"] == ["Warn"] for name in guards)


def test_default_pool_guard_takes_its_ranges_from_the_values() -> None:
    objects = render(
        values={"defaultPool": ["20000-24999", "26000"], "reservedPorts": ["22222", "20400-20409"]}
    )
    policy = kinds(objects, "ValidatingAdmissionPolicy")["berth-default-pool-guard"]
    assert variable(policy, "ranges") == "[[20000, 24999], [26000, 26000]]"
    assert variable(policy, "reserved") == "[[22222, 22222], [20400, 20409]]"
    assert (
        variable(
            kinds(render(), "ValidatingAdmissionPolicy")[policy["metadata"]["name"]], "reserved"
        )
        == "[]"
    )


def test_pool_guard_exemptions() -> None:
    objects = render(values={"poolGuard": {"exemptNamespaces": ["kube-system", "agents"]}})
    spec = kinds(objects, "ValidatingAdmissionPolicy")["berth-pool-guard"]["spec"]
    exempt = {"key": "berth.dev/pool-guard", "operator": "NotIn", "values": ["exempt"]}
    constraints = spec["matchConstraints"]
    assert constraints["objectSelector"]["matchExpressions"] == [exempt]
    assert constraints["namespaceSelector"]["matchExpressions"] == [
        exempt,
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "agents"],
        },
    ]
    conditions = {c["name"]: c["expression"] for c in spec["matchConditions"]}
    # Berth's pods are recognised by who creates them, not by a label.
    assert "system:serviceaccount:berth-system:berth" in conditions["not-created-by-berth"]


def test_guards_follow_the_service_account_name() -> None:
    objects = render("serviceAccount.name=ops")
    policies = kinds(objects, "ValidatingAdmissionPolicy")
    write = policies["berth-write-guard"]["spec"]["matchConditions"][0]["expression"]
    assert write == 'request.userInfo.username == "system:serviceaccount:berth-system:ops"'
    pool = policies["berth-pool-guard"]["spec"]["matchConditions"][0]["expression"]
    assert '"system:serviceaccount:berth-system:ops"' in pool


def test_write_guard_limits_configmaps_and_pods() -> None:
    policy = kinds(default_objects(), "ValidatingAdmissionPolicy")["berth-write-guard"]
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["configmaps", "pods"],
        }
    ]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert '"berth-system"' in variable(policy, "ledger")  # its own namespace only
    off = render("writeGuard.enabled=false")
    assert "berth-write-guard" not in kinds(off, "ValidatingAdmissionPolicy")
    assert "berth-write-guard" not in kinds(off, "ValidatingAdmissionPolicyBinding")


def test_aggregated_roles_for_people() -> None:
    roles = kinds(default_objects(), "ClusterRole")
    view, edit = roles["berth-view"], roles["berth-edit"]
    for role, targets in ((view, ("view", "edit", "admin")), (edit, ("edit", "admin"))):
        labels = role["metadata"]["labels"]
        assert {
            t
            for t in ("view", "edit", "admin")
            if labels.get(f"rbac.authorization.k8s.io/aggregate-to-{t}") == "true"
        } == set(targets)
    assert as_table(view) == {
        ("berth.dev", r): {"get", "list", "watch"}
        for r in (
            "inferencedeployments",
            "inferencedeployments/status",
            "nodeportpools",
            "nodeportpools/status",
        )
    }
    # Status is the operator's, pools the cluster admin's.
    assert as_table(edit) == {
        ("berth.dev", "inferencedeployments"): {
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        }
    }
    assert not {"berth-view", "berth-edit"} & set(
        kinds(render("rbac.aggregate=false"), "ClusterRole")
    )
