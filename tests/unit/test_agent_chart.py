"""The chart's node agent values without a cluster: off by default, least
privilege unless the kernel reservation is asked for, RBAC exactly what
tests/integration/test_node_agent.py proves, and the schema's refusals."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.test_chart import CHART, NAMESPACE, as_table, default_objects, env_of, helm, render

Body = dict[str, Any]
ON = "agent.enabled=true"
AGENT_CLUSTER_RULES = {("", "nodes"): {"get"}}
AGENT_POOL_RULES = {("berth.dev", "nodeportpools"): {"list"}}
AGENT_RULES = {("", "configmaps"): {"get", "create", "update"}}


def agent_objects(objects: Any) -> dict[str, Body]:
    """The agent's objects by kind (one of each)."""
    found: dict[str, Body] = {}
    for obj in objects:
        if obj["metadata"]["name"] == "berth-agent":
            assert obj["kind"] not in found, obj["kind"]
            found[obj["kind"]] = obj
    return found


def agent_pod(objects: Any) -> Body:
    pod: Body = agent_objects(objects)["DaemonSet"]["spec"]["template"]["spec"]
    return pod


def test_off_by_default_and_the_operator_then_reads_reports_only_in_its_sweep() -> None:
    assert agent_objects(default_objects()) == {}
    assert env_of(default_objects())["BERTH_NODE_REPORT_INTERVAL"] == "0"


def test_lint_is_clean_with_the_agent() -> None:
    for sets in ([ON], [ON, "agent.reserveKernelPorts=true"]):
        args = [a for s in sets for a in ("--set", s)]
        result = helm("lint", "--strict", str(CHART), *args, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout, result.stdout


def test_agent_reads_the_host_network_with_no_privilege() -> None:
    objects = render(ON)
    pod = agent_pod(objects)
    assert pod["hostNetwork"] is True
    assert pod["serviceAccountName"] == "berth-agent"
    assert "hostPID" not in pod and "volumes" not in pod
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "berth.agent"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["BERTH_AGENT_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["BERTH_AGENT_RESERVE"] == "false"
    assert env["BERTH_DEFAULT_POOL"] == "20000-29999"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # The operator follows the reports as often as the agents write them.
    assert env_of(objects)["BERTH_NODE_REPORT_INTERVAL"] == "5"


def test_agent_pods_are_not_selected_as_the_operator() -> None:
    objects = render(ON)
    labels = agent_objects(objects)["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    service = next(o for o in objects if o["kind"] == "Service")["spec"]["selector"]
    assert not service.items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "node-agent"


def test_agent_rbac_is_exactly_the_proven_rules() -> None:
    found = agent_objects(render(ON))
    assert as_table(found["ClusterRole"]) == AGENT_CLUSTER_RULES
    assert as_table(found["Role"]) == AGENT_RULES
    assert found["Role"]["metadata"]["namespace"] == NAMESPACE
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        (subject,) = found[kind]["subjects"]
        assert subject == {"kind": "ServiceAccount", "name": "berth-agent", "namespace": NAMESPACE}
    reserving = agent_objects(render(ON, "agent.reserveKernelPorts=true"))
    assert as_table(reserving["ClusterRole"]) == {**AGENT_CLUSTER_RULES, **AGENT_POOL_RULES}


def test_kernel_reservation_runs_privileged_as_root() -> None:
    pod = agent_pod(render(ON, "agent.reserveKernelPorts=true"))
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is True and sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["BERTH_AGENT_RESERVE"] == "true"


def test_agent_values_reach_the_agent() -> None:
    values = {
        "agent": {
            "enabled": True,
            "intervalSeconds": 2,
            "poolIntervalSeconds": 30,
            "nodeSelector": {"gpu": "true"},
            "tolerations": [],
            "priorityClassName": "system-node-critical",
        },
        "defaultPool": ["21000-21999"],
    }
    objects = render(values=values)
    pod = agent_pod(objects)
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert (env["BERTH_AGENT_INTERVAL"], env["BERTH_AGENT_POOL_INTERVAL"]) == ("2", "30")
    assert env["BERTH_DEFAULT_POOL"] == "21000-21999"
    assert pod["nodeSelector"] == {"gpu": "true"} and "tolerations" not in pod
    assert pod["priorityClassName"] == "system-node-critical"
    assert env_of(objects)["BERTH_NODE_REPORT_INTERVAL"] == "2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "agent.intervalSeconds=0"], "at '/agent/intervalSeconds'"),
        (["--set", "agent.enabled=maybe"], "at '/agent/enabled'"),
        (["--set", "agent.hostPID=true"], "additional properties 'hostPID' not allowed"),
    ],
)
def test_schema_rejects_bad_agent_values(args: list[str], message: str) -> None:
    result = helm("template", "berth", str(CHART), *args, check=False)
    assert result.returncode == 1, result.stdout[:500]
    assert message in result.stderr, result.stderr
