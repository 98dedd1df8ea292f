"""What the API server itself enforces for Berth, on the real kube-apiserver.

The chart's admission policies and user roles are rendered for the release
test_rbac.py builds an identity for (``berth-rbac``), so the ServiceAccount the
write guard limits and the pool guard trusts is the one whose token we hold:

* the pool guard refuses a pod Berth did not create that declares a host port
  inside a NodePortPool or the default pool, outside its reserved ports, and
  admits the rest (outside, reserved, exempted, created by Berth);
* the write guard refuses each write Berth's token must not make (a user's
  ConfigMap or pod touched, adopted or created in Berth's name) and allows
  Berth's own;
* the aggregated roles let a namespace's ``edit`` users manage
  InferenceDeployments and its ``view`` users read them.

The policies apply cluster-wide while this module runs; they are deleted at its end.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from tests.integration.test_rbac import (  # the chart's identity, reused
    ACCOUNT,
    CHART,
    RELEASE,
    Drive,
    apply,
    chart_rbac,
    helm_binary,
    sa_kubeconfig,
)
from tests.support.operator_process import wait_for
from tests.support.scenarios import OPERATOR_NAMESPACE, custom_deployment

__all__ = ["chart_rbac", "sa_kubeconfig"]  # fixtures, used by name

Body = dict[str, Any]

TEMPLATES = (
    "templates/admission-pool-guard.yaml",
    "templates/admission-write-guard.yaml",
    "templates/aggregate-roles.yaml",
)
# The default pool and a NodePortPool, apart from each other and from any pool
# another suite may leave behind.
DEFAULT_POOL = "24000-24099"
DEFAULT_RESERVED = "24050"
POOL = "admission-guarded"
POOL_SPEC = {
    "ranges": [{"start": 23000, "end": 23099}],
    "reserved": [{"start": 23050}, {"start": 23060, "end": 23069}],
}
OUTSIDE = 25000
EXEMPT = {"berth.dev/pool-guard": "exempt"}


def render(*sets: str) -> list[Body]:
    args = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE]
    for template in TEMPLATES:
        args += ["--show-only", template]
    for item in sets:
        args += ["--set-string", item]  # a lone port stays the string the schema wants
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pool(name: str, spec: Body) -> Body:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        # Selects no node: the guard does not care which nodes a pool covers.
        "spec": {"nodeSelector": {"matchLabels": {"berth.dev/admission-test": name}}, **spec},
    }


def pod(
    name: str,
    *ports: Body,
    host_network: bool = False,
    labels: dict[str, str] | None = None,
    init: bool = False,
) -> Body:
    container = {"name": "c", "image": "engine:1", "ports": list(ports)}
    spec: Body = {"hostNetwork": host_network, "containers": [container]}
    if init:
        spec["initContainers"] = [{**container, "name": "init"}]
        spec["containers"] = [{"name": "c", "image": "engine:1"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def host(port: int) -> Body:
    return {"containerPort": port, "hostPort": port}


def container_port(port: int) -> Body:
    return {"containerPort": port}


@dataclass
class Api:
    """kubectl as the admin, or with a given kubeconfig (Berth's token)."""

    cluster: Any
    namespace: str
    kubeconfig: str | None = None

    def run(self, *args: str, body: Body | None = None) -> subprocess.CompletedProcess[str]:
        auth = ["--kubeconfig", self.kubeconfig] if self.kubeconfig else []
        result: subprocess.CompletedProcess[str] = self.cluster.kubectl(
            *auth,
            "-n",
            self.namespace,
            *args,
            input=json.dumps(body) if body is not None else None,
            check=False,
        )
        return result

    def create(self, body: Body) -> subprocess.CompletedProcess[str]:
        return self.run("create", "-f", "-", body=body)

    def refused(self, body: Body) -> str:
        """The API server's message; fails if the object was admitted."""
        result = self.create(body)
        assert result.returncode != 0, f"{body['metadata']['name']} was admitted"
        assert "denied request" in result.stderr, result.stderr
        return str(result.stderr)

    def admitted(self, body: Body) -> None:
        result = self.create(body)
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def policies(cluster: Any, chart_rbac: list[Body]) -> Iterator[list[Body]]:
    """The chart's policies, bindings and user roles, with a test default pool."""
    docs = render(f"defaultPool={{{DEFAULT_POOL}}}", f"reservedPorts={{{DEFAULT_RESERVED}}}")
    apply(cluster, [pool(POOL, POOL_SPEC), *docs])
    yield docs
    for doc in [*docs, pool(POOL, POOL_SPEC)]:
        cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--wait=false", check=False)


@pytest.fixture
def admin(cluster: Any, policies: list[Body], namespace: str) -> Api:
    api = Api(cluster, namespace)
    # Policies and parameters reach the API server's admission through informers.
    probe = pod("probe", host(23001))
    wait_for(lambda: api.create(probe).returncode != 0, 30, what="the pool guard to be active")
    return api


@pytest.fixture
def berth(admin: Api, sa_kubeconfig: str) -> Api:
    """Berth's ServiceAccount token (the chart's RBAC), in the test namespace."""
    return Api(admin.cluster, admin.namespace, sa_kubeconfig)


# --- the policies are well-formed -----------------------------------------------


def test_policies_type_check_without_warnings(cluster: Any, admin: Api) -> None:
    for doc in render():
        if doc["kind"] != "ValidatingAdmissionPolicy":
            continue
        name = doc["metadata"]["name"]

        def checked(name: str = name) -> Body | None:
            got: Body = cluster.json("get", "validatingadmissionpolicy", name)
            status = got.get("status", {})
            done = status.get("observedGeneration") == got["metadata"]["generation"]
            return status if done else None

        status = wait_for(checked, 30, what=f"{name} type-checked")
        assert not status.get("typeChecking", {}).get("expressionWarnings"), status


# --- the pool guard -------------------------------------------------------------


def test_pool_guard_refuses_host_ports_inside_a_pool(admin: Api) -> None:
    message = admin.refused(pod("in-pool", host(23010)))
    assert f"host port 23010 is inside NodePortPool {POOL} (23000-23099)" in message
    assert "berth.dev/pool-guard=exempt" in message
    # With hostNetwork every containerPort is a host port.
    message = admin.refused(pod("host-net", container_port(23011), host_network=True))
    assert f"host port 23011 is inside NodePortPool {POOL}" in message
    message = admin.refused(pod("default-pool", host(24010), host(OUTSIDE)))
    assert "host port 24010 is inside the default pool (24000-24099)" in message
    message = admin.refused(pod("init", host(23012), init=True))
    assert "host port 23012" in message
    # Every refused port is named, the admitted one is not.
    message = admin.refused(pod("several", host(23013), host(23014), host(23050)))
    assert "host port 23013, 23014 is inside" in message


def test_pool_guard_admits_ports_outside_reserved_or_not_on_the_host(admin: Api) -> None:
    admin.admitted(pod("outside", host(OUTSIDE)))
    admin.admitted(pod("reserved", host(23050), host(23065), host(24050)))
    admin.admitted(pod("host-net-reserved", container_port(23060), host_network=True))
    # A containerPort without hostNetwork or hostPort takes no host port.
    admin.admitted(pod("pod-network", container_port(23020)))
    admin.admitted(pod("no-ports"))


def test_pool_guard_exemptions(admin: Api, berth: Api) -> None:
    admin.admitted(pod("exempt-pod", host(23021), labels=EXEMPT))
    # Berth's label alone does not exempt: anyone can write a label.
    labels = {"app.kubernetes.io/managed-by": "berth", "berth.dev/deployment": "x"}
    admin.refused(pod("looks-like-berth", host(23022), labels=labels))
    # A pod Berth's ServiceAccount creates (the write guard checks it is Berth's).
    owner = owned_by_deployment(admin)
    berth.admitted(berth_pod("berths-own", owner, host(23023)))
    # A namespace labelled exempt.
    admin.run("label", "namespace", admin.namespace, "berth.dev/pool-guard=exempt")
    wait_for(
        lambda: admin.create(pod("exempt-ns", host(23024))).returncode == 0,
        30,
        what="the namespace exemption",
    )


def test_pool_guard_sees_every_pool(cluster: Any, admin: Api) -> None:
    extra = pool("admission-extra", {"ranges": [{"start": 23200, "end": 23299}]})
    body = pod("new-pool", host(23210))
    try:
        apply(cluster, [extra])
        wait_for(lambda: admin.create(body).returncode != 0, 30, what="the new pool guarded")
        assert "inside NodePortPool admission-extra" in admin.refused(body)
    finally:
        cluster.kubectl("delete", "nodeportpool", "admission-extra", check=False)
    wait_for(lambda: admin.create(body).returncode == 0, 30, what="the deleted pool unguarded")


def test_pool_guard_can_warn_instead(cluster: Any, admin: Api) -> None:
    warn = [
        d
        for d in render("poolGuard.action=Warn")
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
    ]
    try:
        apply(cluster, warn)

        names = (f"warned-{i}" for i in itertools.count())

        def warned() -> str:
            result = admin.create(pod(next(names), host(23030)))
            return str(result.stderr) if result.returncode == 0 else ""

        message = wait_for(warned, 30, what="the Warn action")
        assert "Warning:" in message and "host port 23030 is inside" in message
    finally:
        apply(cluster, [d for d in render() if d["kind"] == "ValidatingAdmissionPolicyBinding"])


# --- the write guard: Berth's own identity --------------------------------------


def owned_by_deployment(admin: Api, name: str = "web") -> Body:
    """An InferenceDeployment (no operator runs here) and a controller reference to it."""
    body = custom_deployment(name, 1)
    body["metadata"]["namespace"] = admin.namespace
    admin.run("apply", "-f", "-", body=body)
    got = json.loads(admin.run("get", "infd", name, "-o", "json").stdout)
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "name": name,
        "uid": got["metadata"]["uid"],
        "controller": True,
    }


def berth_pod(name: str, owner: Body | None, *ports: Body) -> Body:
    body = pod(
        name,
        *ports,
        labels={
            "app.kubernetes.io/managed-by": "berth",
            "berth.dev/deployment": owner["name"] if owner else "web",
        },
    )
    if owner:
        body["metadata"]["ownerReferences"] = [owner]
    return body


def configmap(name: str, labels: dict[str, str], namespace: str | None = None) -> Body:
    meta: Body = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


BERTHS = {"app.kubernetes.io/managed-by": "berth"}
WRITE_GUARD = "berth-rbac-write-guard"


def denied_by_write_guard(result: subprocess.CompletedProcess[str], verb: str) -> None:
    assert result.returncode != 0, f"{verb} was allowed"
    assert WRITE_GUARD in result.stderr, result.stderr
    assert "Berth's ServiceAccount may" in result.stderr, result.stderr


@pytest.fixture
def may_delete_configmaps(cluster: Any, berth: Api) -> Iterator[None]:
    """The chart never grants ConfigMap delete: grant it here, so that what refuses
    the deletes below is the write guard, not RBAC."""
    name = "berth-admission-test-delete-configmaps"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["delete"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": RELEASE, "namespace": OPERATOR_NAMESPACE}],
    }
    apply(cluster, [role, binding])
    wait_for(
        lambda: (
            "yes"
            in cluster.kubectl(
                "auth", "can-i", "delete", "configmaps", f"--as={ACCOUNT}", "-A", check=False
            ).stdout
        ),
        10,
        what="delete granted",
    )
    yield
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", name, check=False)


def test_berth_cannot_touch_a_users_configmaps(
    admin: Api, berth: Api, may_delete_configmaps: None
) -> None:
    admin.admitted(configmap("web-port-map", {"important": "user-data"}))
    mine = configmap("web-worker-0-ports", {"mine": "keep-me"})
    admin.admitted(mine)
    replaced = {**mine, "data": {"HTTP_PORT": "20000"}}
    denied_by_write_guard(berth.run("replace", "-f", "-", body=replaced), "update")
    denied_by_write_guard(
        berth.run("patch", "configmap", "web-port-map", "--type=merge", "-p", '{"data":{}}'),
        "patch",
    )
    # Adopting it by adding Berth's label is a write to an object not yet Berth's.
    denied_by_write_guard(
        berth.run("label", "configmap", "web-port-map", "app.kubernetes.io/managed-by=berth"),
        "adopt",
    )
    denied_by_write_guard(berth.run("delete", "configmap", "web-port-map"), "delete")
    # Untouched; and the admin, whom the guard does not match, may still write.
    data = json.loads(admin.run("get", "configmap", "web-worker-0-ports", "-o", "json").stdout)
    assert data["data"] == {"k": "v"} and data["metadata"]["labels"] == {"mine": "keep-me"}
    assert admin.run("delete", "configmap", "web-port-map").returncode == 0


def test_berth_writes_only_labelled_configmaps(
    admin: Api, berth: Api, may_delete_configmaps: None
) -> None:
    denied_by_write_guard(berth.create(configmap("unlabelled", {})), "create")
    berth.admitted(configmap("ours", BERTHS))
    patch = '{"data":{"HTTP_PORT":"20000"}}'
    assert berth.run("patch", "configmap", "ours", "--type=merge", "-p", patch).returncode == 0
    # It cannot give its own ConfigMap away either.
    denied_by_write_guard(
        berth.run("label", "configmap", "ours", "app.kubernetes.io/managed-by-"), "unlabel"
    )
    assert berth.run("delete", "configmap", "ours").returncode == 0


def test_berth_may_repair_a_ledger_in_its_own_namespace(cluster: Any, berth: Api) -> None:
    """A hand-made ``berth-ledger.*`` in the release namespace is Berth's to rewrite
    (the repair path); the same name elsewhere is not."""
    ledger = Api(cluster, OPERATOR_NAMESPACE, berth.kubeconfig)
    admin_ledger = Api(cluster, OPERATOR_NAMESPACE)
    name = "berth-ledger.admission-test-node"
    admin_ledger.run("delete", "configmap", name, "--ignore-not-found")
    admin_ledger.admitted(configmap(name, {}))
    try:
        patch = '{"data":{"k":"repaired"}}'
        result = ledger.run("patch", "configmap", name, "--type=merge", "-p", patch)
        assert result.returncode == 0, result.stderr
    finally:
        admin_ledger.run("delete", "configmap", name)
    elsewhere = Api(cluster, berth.namespace)
    elsewhere.admitted(configmap(name, {}))
    denied_by_write_guard(
        berth.run("patch", "configmap", name, "--type=merge", "-p", '{"data":{}}'), "patch"
    )


def test_berth_creates_only_its_own_pods(admin: Api, berth: Api) -> None:
    owner = owned_by_deployment(admin)
    outside = host(OUTSIDE)
    denied_by_write_guard(berth.create(pod("plain", outside)), "create")
    denied_by_write_guard(berth.create(berth_pod("no-owner", None, outside)), "create")
    not_ours = {**owner, "apiVersion": "apps/v1", "kind": "Deployment"}
    denied_by_write_guard(berth.create(berth_pod("wrong-kind", not_ours, outside)), "create")
    other = {**owner, "name": "someone-else"}
    body = berth_pod("wrong-name", other, outside)
    body["metadata"]["labels"]["berth.dev/deployment"] = "web"
    denied_by_write_guard(berth.create(body), "create")
    berth.admitted(berth_pod("web-worker-0", owner, outside))


def test_berth_patches_and_deletes_only_its_own_pods(admin: Api, berth: Api) -> None:
    owner = owned_by_deployment(admin)
    admin.admitted(pod("web-worker-1", labels={"app": "user"}))
    berth.admitted(berth_pod("web-worker-0", owner))
    annotate = ("annotate", "pod", "--overwrite")
    denied_by_write_guard(berth.run(*annotate, "web-worker-1", "berth.dev/ports={}"), "patch")
    denied_by_write_guard(berth.run("delete", "pod", "web-worker-1", "--wait=false"), "delete")
    assert berth.run(*annotate, "web-worker-0", "berth.dev/ports={}").returncode == 0
    assert berth.run("delete", "pod", "web-worker-0", "--wait=false").returncode == 0


def test_the_operator_works_under_the_guards(admin: Api, sa_kubeconfig: str, tmp_path: Any) -> None:
    """test_rbac.py's drive (allocation, scale-down, a spec error, a restart), run
    with Berth's token while the guards are on: nothing Berth does is refused."""
    drive = Drive(admin.cluster, admin.namespace, sa_kubeconfig, tmp_path / "operator.log")
    try:
        drive.run()
    finally:
        drive.stop()
    assert "denied request" not in drive.evidence()


# --- roles for the people using Berth -------------------------------------------


def bind(admin: Api, kind: str, user: str, role: str) -> None:
    binding: Body = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": f"{user}-{role}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    if kind == "RoleBinding":
        binding["metadata"]["namespace"] = admin.namespace
    apply(admin.cluster, [binding])


def can(admin: Api, user: str, verb: str, resource: str, everywhere: bool = False) -> bool:
    resource, _, sub = resource.partition("/")
    scope = ["-A"] if everywhere else []
    scope += [f"--subresource={sub}"] if sub else []
    out = admin.run("auth", "can-i", verb, resource, f"--as={user}", *scope).stdout
    return out.strip() == "yes"


def test_namespace_edit_users_manage_inference_deployments(admin: Api) -> None:
    user = f"alice-{admin.namespace}"
    bind(admin, "RoleBinding", user, "edit")
    wait_for(
        lambda: can(admin, user, "create", "inferencedeployments.berth.dev"),
        30,
        what="edit to aggregate berth-edit",
    )
    body = custom_deployment("by-alice", 1)
    created = admin.run(f"--as={user}", "create", "-f", "-", body=body)
    assert created.returncode == 0, created.stderr
    patch = '{"spec":{"roles":[{"name":"worker","replicas":0,"template":{"spec":{"containers":[{"name":"engine","image":"engine:1"}]}}}]}}'  # noqa: E501
    patched = admin.run(f"--as={user}", "patch", "infd", "by-alice", "--type=merge", "-p", patch)
    assert patched.returncode == 0, patched.stderr
    # Status is the operator's; pools are the cluster admin's.
    assert not can(admin, user, "patch", "inferencedeployments.berth.dev/status")
    assert not can(admin, user, "create", "nodeportpools.berth.dev", everywhere=True)
    deleted = admin.run(f"--as={user}", "delete", "infd", "by-alice")
    assert deleted.returncode == 0, deleted.stderr


def test_namespace_view_users_read_but_cannot_create(admin: Api) -> None:
    user = f"bob-{admin.namespace}"
    admin.run("apply", "-f", "-", body=custom_deployment("for-bob", 1))
    bind(admin, "RoleBinding", user, "view")
    wait_for(
        lambda: can(admin, user, "get", "inferencedeployments.berth.dev"),
        30,
        what="view to aggregate berth-view",
    )
    got = admin.run(f"--as={user}", "get", "infd", "for-bob", "-o", "name")
    assert got.returncode == 0 and "for-bob" in got.stdout, got.stderr
    refused = admin.run(f"--as={user}", "create", "-f", "-", body=custom_deployment("by-bob", 1))
    assert refused.returncode != 0
    assert 'cannot create resource "inferencedeployments"' in refused.stderr, refused.stderr
    # NodePortPools are cluster-scoped: a namespace's RoleBinding does not show them...
    assert not can(admin, user, "list", "nodeportpools.berth.dev", everywhere=True)
    # ...a ClusterRoleBinding to view does.
    reader = f"carol-{admin.namespace}"
    bind(admin, "ClusterRoleBinding", reader, "view")
    try:
        wait_for(
            lambda: can(admin, reader, "list", "nodeportpools.berth.dev", everywhere=True),
            30,
            what="cluster-wide view to read pools",
        )
        pools = admin.run(f"--as={reader}", "get", "nodeportpools", POOL, "-o", "name")
        assert pools.returncode == 0, pools.stderr
    finally:
        admin.cluster.kubectl("delete", "clusterrolebinding", f"{reader}-view", check=False)
