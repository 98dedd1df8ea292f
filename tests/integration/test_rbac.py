"""The chart's RBAC, proven rather than guessed.

The chart's ServiceAccount, ClusterRole, Role and bindings are applied to the
API server (release ``berth-rbac`` in the operator namespace) and the
operator runs out of the cluster with a token of that ServiceAccount:

* sufficiency: the example scenario, and a drive through every behaviour
  that needs a permission (pool status, allocation, scale-down, a spec error
  posting an Event, a restart that reclaims a pod deleted meanwhile), pass
  with no request refused;
* necessity: for each verb of each rule in turn, the rule loses that verb
  and the same drive runs until the operator is refused exactly that call
  (``cannot <verb> resource "<resource>"`` in its log, in the deployment's
  status or in an Event). RBAC is additive, so removing a whole rule breaks
  at least as much as removing one of its verbs.

Rules the operator never uses are not in the chart (docs/install.md lists
them); tests/unit/test_chart.py pins the rendered rules to the same table.
Like the other operator suites, this one assumes that no other operator
serves the cluster while it runs (one would do the refused work instead).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support import scenarios
from tests.support.invariants import berth_pods, ledger_holders
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import (
    OPERATOR_NAMESPACE,
    custom_deployment,
    ensure_namespace,
    install_crds,
    wait_consistent,
)
from tests.support.tools import find_helm
from tests.support.watcher import ClusterWatcher

from berth.capacity import status_patch

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
RELEASE = "berth-rbac"
ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
RBAC_TEMPLATES = (
    "templates/serviceaccount.yaml",
    "templates/clusterrole.yaml",
    "templates/role.yaml",
)
DEPLOYMENT = "rbac-drive"
BROKEN = "rbac-broken-spec"

Body = dict[str, Any]
Perm = tuple[str, str, str, str]  # role kind, api group, resource, verb

# The step of the drive (below) after which each granted verb has surely been
# used; the refusal may show up earlier.
START, POOL, ALLOCATE, SCALE_DOWN, SPEC_ERROR, RESTART = range(6)
TRIGGERS: dict[Perm, int] = {
    ("ClusterRole", "", "pods", "list"): START,
    ("ClusterRole", "", "pods", "watch"): START,
    ("ClusterRole", "", "pods", "create"): ALLOCATE,
    ("ClusterRole", "", "pods", "patch"): ALLOCATE,
    ("ClusterRole", "", "pods", "delete"): SCALE_DOWN,
    ("ClusterRole", "", "pods", "get"): RESTART,
    ("ClusterRole", "", "configmaps", "get"): ALLOCATE,
    ("ClusterRole", "", "configmaps", "create"): ALLOCATE,
    ("ClusterRole", "", "configmaps", "patch"): ALLOCATE,
    ("ClusterRole", "", "configmaps", "update"): SCALE_DOWN,
    ("ClusterRole", "", "configmaps", "delete"): RESTART,
    ("ClusterRole", "", "nodes", "list"): START,
    ("ClusterRole", "", "nodes", "watch"): START,
    ("ClusterRole", "", "nodes/status", "patch"): START,
    ("ClusterRole", "", "events", "create"): SPEC_ERROR,
    ("ClusterRole", "berth.dev", "inferencedeployments", "list"): START,
    ("ClusterRole", "berth.dev", "inferencedeployments", "watch"): START,
    ("ClusterRole", "berth.dev", "inferencedeployments", "get"): ALLOCATE,
    ("ClusterRole", "berth.dev", "inferencedeployments", "patch"): ALLOCATE,
    ("ClusterRole", "berth.dev", "inferencedeployments/status", "patch"): ALLOCATE,
    ("ClusterRole", "berth.dev", "nodeportpools", "list"): START,
    ("ClusterRole", "berth.dev", "nodeportpools", "watch"): START,
    ("ClusterRole", "berth.dev", "nodeportpools/status", "patch"): POOL,
    ("Role", "", "configmaps", "list"): START,
    ("Role", "coordination.k8s.io", "leases", "get"): START,
    ("Role", "coordination.k8s.io", "leases", "create"): START,
    ("Role", "coordination.k8s.io", "leases", "update"): START,
}


# --- the chart's RBAC objects and an identity bound to them -------------------


def helm_binary() -> str:
    found = find_helm()
    assert found, "helm is missing: hack/build-tools.sh builds it"
    return found


def render_rbac() -> list[Body]:
    args = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE]
    for template in RBAC_TEMPLATES:
        args += ["--show-only", template]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def granted(docs: list[Body]) -> set[Perm]:
    return {
        (doc["kind"], group, resource, verb)
        for doc in docs
        if doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def without(docs: list[Body], perm: Perm) -> list[Body]:
    """The roles with one verb taken away from the one rule that grants it."""
    kind, group, resource, verb = perm
    roles = [copy.deepcopy(d) for d in docs if d["kind"] in ("ClusterRole", "Role")]
    for role in roles:
        if role["kind"] != kind:
            continue
        rules = []
        for rule in role["rules"]:
            if group in rule["apiGroups"] and resource in rule["resources"]:
                assert rule["apiGroups"] == [group] and rule["resources"] == [resource], rule
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
            if rule["verbs"]:
                rules.append(rule)
        role["rules"] = rules
    return roles


def apply(cluster: Any, docs: list[Body]) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )


@contextlib.contextmanager
def applied(cluster: Any, docs: list[Body]) -> Iterator[list[Body]]:
    """``docs`` applied (with Berth's CRDs and namespace) until the block ends."""
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    apply(cluster, docs)
    yield docs
    for doc in docs:
        meta = doc["metadata"]
        scope = ["-n", meta["namespace"]] if "namespace" in meta else []
        cluster.kubectl("delete", doc["kind"], meta["name"], *scope, "--wait=false", check=False)


def can(cluster: Any, perm: Perm) -> bool:
    kind, group, resource, verb = perm
    name, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, f"{name}.{group}" if group else name, f"--as={ACCOUNT}"]
    if sub:
        args.append(f"--subresource={sub}")
    args += ["-n", OPERATOR_NAMESPACE] if kind == "Role" else ["--all-namespaces"]
    answer: str = cluster.kubectl(*args, check=False).stdout
    return answer.strip() == "yes"


def write_kubeconfig(cluster: Any, token: str, path: Path) -> str:
    """Same server and CA as the cluster's kubeconfig, the ServiceAccount's token."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    entry = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    server = dict(entry["cluster"])
    ca = server.get("certificate-authority")
    if ca and not Path(ca).is_absolute():
        server["certificate-authority"] = str(Path(cluster.kubeconfig).parent / ca)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "berth", "cluster": server}],
        "users": [{"name": RELEASE, "user": {"token": token}}],
        "contexts": [
            {
                "name": RELEASE,
                "context": {"cluster": "berth", "user": RELEASE, "namespace": OPERATOR_NAMESPACE},
            }
        ],
        "current-context": RELEASE,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def chart_rbac(cluster: Any) -> Iterator[list[Body]]:
    with applied(cluster, render_rbac()) as docs:
        yield docs


@pytest.fixture(scope="module")
def sa_kubeconfig(cluster: Any, chart_rbac: list[Body], tmp_path_factory: Any) -> str:
    token = cluster.kubectl(
        "create", "token", RELEASE, "-n", OPERATOR_NAMESPACE, "--duration=2h"
    ).stdout.strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == ACCOUNT
    path = write_kubeconfig(cluster, token, tmp_path_factory.mktemp("rbac") / "kubeconfig")
    who = cluster.kubectl("--kubeconfig", path, "auth", "whoami", "-o", "json", check=False)
    if who.returncode == 0:
        assert json.loads(who.stdout)["status"]["userInfo"]["username"] == ACCOUNT
    return path


@dataclass
class Identity:
    docs: list[Body]  # the chart's ServiceAccount, roles and bindings
    kubeconfig: str  # a token of that ServiceAccount


@pytest.fixture
def identity(cluster: Any, chart_rbac: list[Body], sa_kubeconfig: str) -> Iterator[Identity]:
    """The chart's ServiceAccount with the chart's rules (put back after each test)."""
    yield Identity(chart_rbac, sa_kubeconfig)
    apply(cluster, [d for d in chart_rbac if d["kind"] in ("ClusterRole", "Role")])


# --- the drive: every behaviour that needs a permission -----------------------


# The authorizer's words (other 403s, e.g. a terminating namespace, are not RBAC).
RBAC_DENIAL = re.compile(r"cannot [a-z]+ resource")


class Refused(Exception):
    """The operator was refused the call under test: the proof we wait for."""


@dataclass
class Drive:
    cluster: Any
    namespace: str
    kubeconfig: str
    log: Path
    refusal: re.Pattern[str] | None = None  # None: nothing may be refused
    operator: OperatorProcess | None = None
    uids: dict[str, str] = field(default_factory=dict)
    _api_said: str = ""
    _api_read: float = 0.0

    # -- observation --

    def kube(self, *args: str) -> Body:
        out = self.cluster.kubectl(*args, "-o", "json", check=False)
        result: Body = json.loads(out.stdout) if out.returncode == 0 else {}
        return result

    def evidence(self) -> str:
        """Everything the operator said: its log, and (read at most once a second)
        its deployments' status messages and the Events in the namespace."""
        if time.monotonic() - self._api_read > 1.0:
            parts = []
            for infd in self.kube("get", "infd", "-n", self.namespace).get("items", []):
                conditions = infd.get("status", {}).get("conditions", [])
                parts += [c.get("message", "") for c in conditions]
            events = self.kube("get", "events", "-n", self.namespace).get("items", [])
            parts += [e.get("message", "") for e in events]
            self._api_said, self._api_read = "\n".join(parts), time.monotonic()
        log = self.log.read_text() if self.log.exists() else ""
        return f"{log}\n{self._api_said}"

    def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``predicate``; stop at the refusal under test; in a sufficiency
        run, fail on any refusal or time-out."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.evidence()
            if self.refusal is not None and self.refusal.search(text):
                raise Refused(self.refusal.search(text)[0])  # type: ignore[index]
            if self.refusal is None and RBAC_DENIAL.search(text):
                lines = [line for line in text.splitlines() if RBAC_DENIAL.search(line)]
                raise AssertionError(f"refused with the chart's RBAC: {lines[:3]}")
            if predicate():
                return
            if time.monotonic() > deadline:
                if self.refusal is None:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                return  # keep driving: a later step may need the permission
            time.sleep(0.3)

    def pods(self, name: str = DEPLOYMENT) -> list[Body]:
        items: list[Body] = self.kube(
            "get", "pods", "-n", self.namespace, "-l", f"berth.dev/deployment={name}"
        ).get("items", [])
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def allocated(self, count: int) -> bool:
        pods = self.pods()
        done = [p for p in pods if "berth.dev/ports" in p["metadata"].get("annotations", {})]
        return len(pods) == count == len(done)

    def status_says(self, count: int) -> bool:
        status = self.kube("get", "infd", "-n", self.namespace, DEPLOYMENT).get("status", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        allocated = sum(int(r.get("allocated", 0)) for r in status.get("roles", []))
        return conditions.get("PortsAllocated") == "True" and allocated == count

    def port_map_lists(self, count: int) -> bool:
        cm = self.kube("get", "configmap", "-n", self.namespace, f"{DEPLOYMENT}-port-map")
        return len(cm.get("data") or {}) == count

    def held(self) -> set[str]:
        return {uid for holders in ledger_holders(self.cluster).values() for uid in holders}

    # -- steps --

    def starts(self) -> int:
        return self.log.read_text().count("berth started") if self.log.exists() else 0

    def start(self) -> None:
        before = self.starts()
        # A node without berth.dev/ports: start-up must advertise it (nodes/status patch).
        unset = json.dumps(status_patch(None))
        node = self.cluster.nodes[0]
        self.cluster.kubectl("patch", "node", node, "--subresource=status", "-p", unset)
        # Elected as in the chart, on a Lease of this test's own (created at start).
        env = {
            "BERTH_SWEEP_INTERVAL": "2",
            "BERTH_LEADER_ELECTION": "true",
            "BERTH_LEASE_NAME": self.namespace,
        }
        self.operator = OperatorProcess(self.kubeconfig, self.log, env=env).start()
        self.until(lambda: self.starts() > before, 30, "operator start-up")

    def pool(self) -> None:
        """A NodePortPool that selects no node: the sweep still reports its status."""
        body = {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "NodePortPool",
            "metadata": {"name": self.namespace},
            "spec": {
                "nodeSelector": {"matchLabels": {"berth.dev/rbac-test": self.namespace}},
                "ranges": [{"start": 21000, "end": 21099}],
            },
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))

        def reported() -> bool:
            status = self.kube("get", "nodeportpool", self.namespace).get("status", {})
            return bool(status.get("nodes") == 0 and status.get("ports") == 100)

        self.until(reported, 15, "the pool's status")

    def allocate(self) -> None:
        node = self.cluster.nodes[0]
        body = custom_deployment(DEPLOYMENT, 3, node=node, image=self.cluster.image)
        body["metadata"]["namespace"] = self.namespace
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        self.until(lambda: self.allocated(3), 30, "3 pods with ports")
        self.until(lambda: self.port_map_lists(3), 15, "the port map to list 3 workers")
        self.until(lambda: self.status_says(3), 15, "status PortsAllocated 3 of 3")
        self.uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in self.pods()}

    def scale_down(self) -> None:
        self.cluster.kubectl(
            "patch",
            "infd",
            DEPLOYMENT,
            "-n",
            self.namespace,
            "--type=json",
            "-p",
            '[{"op": "replace", "path": "/spec/roles/0/replicas", "value": 2}]',
        )
        surplus = self.uids.get(f"{DEPLOYMENT}-worker-2", "?")
        self.until(lambda: len(self.pods()) == 2, 20, "the surplus pod to be deleted")
        self.until(lambda: surplus not in self.held(), 15, "its ports to be released")

    def spec_error(self) -> None:
        body = custom_deployment(BROKEN, 1, node=self.cluster.nodes[0], image=self.cluster.image)
        body["metadata"]["namespace"] = self.namespace
        body["spec"]["engine"] = {"preset": "vllm", "version": "0.5.0"}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))

        def warned() -> bool:
            events = self.kube(
                "get",
                "events",
                "-n",
                self.namespace,
                "--field-selector",
                f"involvedObject.name={BROKEN}",
            ).get("items", [])
            return any(e.get("reason") == "ReconcileError" for e in events)

        self.until(warned, 20, "a ReconcileError Event")

    def restart(self) -> None:
        """A pod deleted while the operator is down: the start-up sweep re-reads it
        (GET) before reclaiming its ports. Its ConfigMap is orphaned, so the pod
        that replaces it finds it and must delete it first."""
        assert self.operator is not None
        self.operator.stop()
        victim = f"{DEPLOYMENT}-worker-1"
        uid = self.uids.get(victim, "?")
        self.cluster.kubectl(
            "delete",
            "pod",
            victim,
            "-n",
            self.namespace,
            "--grace-period=0",
            "--force",
            "--cascade=orphan",
            check=False,
        )
        wait_for(lambda: all(p["metadata"]["uid"] != uid for p in self.pods()), 30, what="pod gone")
        self.start()
        self.until(lambda: uid not in self.held(), 20, "the start-up sweep to reclaim it")

    STEPS = ("start", "pool", "allocate", "scale_down", "spec_error", "restart")

    def run(self, last: int = RESTART) -> None:
        for name in self.STEPS[: last + 1]:
            getattr(self, name)()

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop()
        self.cluster.kubectl("delete", "nodeportpool", self.namespace, "--ignore-not-found")


def refusal_pattern(perm: Perm) -> re.Pattern[str]:
    _, group, resource, verb = perm
    quote = r'\\?"'
    return re.compile(
        rf"cannot {verb} resource {quote}{re.escape(resource)}{quote} "
        rf"in API group {quote}{re.escape(group)}{quote}"
    )


# --- the tests ----------------------------------------------------------------


def test_every_granted_verb_has_a_removal_case(chart_rbac: list[Body]) -> None:
    assert granted(chart_rbac) == set(TRIGGERS)


def pods_on_missing_nodes(cluster: Any) -> list[str]:
    nodes = {n["metadata"]["name"] for n in cluster.json("get", "nodes")["items"]}
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in berth_pods(cluster)
        if p["spec"].get("nodeName") and p["spec"]["nodeName"] not in nodes
    ]


def test_example_scenario_passes_with_the_chart_service_account(
    cluster: Any,
    identity: Identity,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scenario checks I2 cluster-wide. Pods an earlier test left bound to a
    # node it deleted hold no ledger entry; the pod garbage collector removes
    # them only after its quarantine (about a minute): do its job now.
    for pod in pods_on_missing_nodes(cluster):
        ns, name = pod.split("/")
        cluster.kubectl("delete", "pod", name, "-n", ns, "--force", "--grace-period=0", check=False)
    wait_for(lambda: not pods_on_missing_nodes(cluster), timeout=60, what="orphaned pods gone")
    # Stop the scenario's operator even when the scenario fails half-way.
    started: list[OperatorProcess] = []

    class Tracked(OperatorProcess):
        def start(self) -> Tracked:
            started.append(self)
            super().start()
            return self

    monkeypatch.setattr(scenarios, "OperatorProcess", Tracked)
    try:
        scenarios.run_example_scenario(cluster, identity.kubeconfig, namespace, tmp_path)
    finally:
        for operator in started:
            operator.stop()
    text = "".join(operator.log.read_text() for operator in started)
    assert not RBAC_DENIAL.search(text), [
        line for line in text.splitlines() if RBAC_DENIAL.search(line)
    ][:5]


def test_every_behaviour_passes_with_the_chart_rbac(
    cluster: Any, identity: Identity, namespace: str, tmp_path: Path, core_api: Any
) -> None:
    drive = Drive(cluster, namespace, identity.kubeconfig, tmp_path / "operator.log")
    try:
        with ClusterWatcher(core_api) as watcher:  # I1, I3, ledgers on every state
            drive.run()
            wait_consistent(cluster, watcher.tracker, timeout=30)
        assert watcher.gaps == 0
    finally:
        drive.stop()


@pytest.mark.parametrize(
    "perm", sorted(TRIGGERS), ids=lambda p: f"{p[0]}-{p[2].replace('/', '.')}-{p[3]}"
)
def test_removing_a_verb_breaks_the_call_that_needs_it(
    cluster: Any, identity: Identity, namespace: str, tmp_path: Path, perm: Perm
) -> None:
    apply(cluster, without(identity.docs, perm))
    wait_for(lambda: not can(cluster, perm), timeout=10, what=f"{perm} revoked")
    drive = Drive(
        cluster, namespace, identity.kubeconfig, tmp_path / "operator.log", refusal_pattern(perm)
    )
    try:
        with pytest.raises(Refused):
            drive.run(TRIGGERS[perm])
            # Driven through the step that needs it: the refusal must come now.
            drive.until(lambda: False, 15, f"a refusal of {perm}")
    finally:
        drive.stop()
        apply(cluster, [d for d in identity.docs if d["kind"] in ("ClusterRole", "Role")])
        wait_for(lambda: can(cluster, perm), timeout=10, what=f"{perm} restored")
