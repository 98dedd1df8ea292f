"""The test bed itself: a real API server, scheduler, controllers and kubelets
(kwok's) behave like Kubernetes, so the operator's tests mean something.

Run against BERTH_KUBECONFIG's cluster too; checks that only hold for the
local kwok control plane (pinned version, fake GPU nodes, node IPs) skip
there.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import testbed
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")
Body = dict[str, Any]
Cluster = Any  # tests/integration/conftest.py's Cluster


def wait_until(probe: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def local_only(cluster: Cluster) -> None:
    if cluster.external:
        pytest.skip("needs the local kwok control plane (BERTH_KUBECONFIG is set)")


def pod_body(name: str, image: str, **spec: Any) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "main", "image": image, "resources": {"requests": {"cpu": "10m"}}}
            ],
            **spec,
        },
    }


def apply(cluster: Cluster, namespace: str, *bodies: Body) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": list(bodies)}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(items))


def condition(obj: Body, type_: str) -> Body | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return None


def running_pods(cluster: Cluster, namespace: str, selector: str, want: int) -> list[Body] | None:
    pods = cluster.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return running if len(running) == want else None


def node_ips(cluster: Cluster) -> dict[str, str]:
    out = {}
    for node in cluster.json("get", "nodes")["items"]:
        for addr in node["status"].get("addresses") or []:
            if addr["type"] == "InternalIP":
                out[node["metadata"]["name"]] = addr["address"]
    return out


# --------------------------------------------------------------------------


def test_fake_gpu_nodes_are_ready_with_labels_and_allocatable(cluster: Cluster) -> None:
    local_only(cluster)
    assert len(cluster.nodes) >= 1
    nodes = {n["metadata"]["name"]: n for n in cluster.json("get", "nodes")["items"]}
    for name in cluster.nodes:
        node = nodes[name]
        labels = node["metadata"]["labels"]
        assert labels["type"] == "kwok"
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["berth.dev/node-group"] == "gpu"
        assert labels["kubernetes.io/hostname"] == name
        allocatable = node["status"]["allocatable"]
        assert allocatable["nvidia.com/gpu"] == "8"
        assert int(allocatable["pods"]) >= 100
        assert (condition(node, "Ready") or {}).get("status") == "True"
        assert not node["spec"].get("taints"), "fake nodes carry no taints"
        # kwok renews each node's Lease: the heartbeat the node lifecycle
        # controller reads, so nodes stay Ready for the whole session.
        lease = cluster.json("get", "lease", "-n", "kube-node-lease", name)
        assert lease["spec"]["leaseDurationSeconds"] == 40
        assert lease["spec"]["renewTime"]


def test_deployment_pods_are_scheduled_onto_fake_nodes_and_run(
    cluster: Cluster, namespace: str
) -> None:
    replicas = max(4, 2 * len(cluster.nodes))
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": pod_body("web", cluster.image)["spec"],
            },
        },
    }
    apply(cluster, namespace, deployment)
    pods = wait_until(
        lambda: running_pods(cluster, namespace, "app=web", replicas),
        timeout=120,
        what=f"{replicas} Running pods",
    )
    used_nodes = set()
    for pod in pods:
        node = pod["spec"].get("nodeName")
        assert node in cluster.nodes, f"{pod['metadata']['name']} on {node}"
        used_nodes.add(node)
        scheduled = condition(pod, "PodScheduled")
        assert scheduled and scheduled["status"] == "True"
        assert (condition(pod, "Ready") or {}).get("status") == "True"
        assert pod["status"]["containerStatuses"][0]["state"].get("running")
        assert pod["status"].get("podIP")
    # kube-scheduler placed them (nothing set nodeName by hand), spreading
    # the replicas over the nodes.
    if len(cluster.nodes) > 1:
        assert len(used_nodes) > 1
    events = cluster.json("get", "events", "-n", namespace, "--field-selector=reason=Scheduled")
    assert {e["involvedObject"]["name"] for e in events["items"]} >= {
        p["metadata"]["name"] for p in pods
    }
    # The deployment and replicaset controllers see them as available.
    wait_until(
        lambda: (
            cluster.json("get", "deployment", "-n", namespace, "web")["status"].get(
                "availableReplicas"
            )
            == replicas
        ),
        what="the Deployment to count its replicas available",
    )


def test_pod_ips_come_from_the_node_and_host_network_gets_the_node_ip(
    cluster: Cluster, namespace: str
) -> None:
    """hostNetwork pods report the node's IP as podIP and hostIP (Berth hands
    it to engines as the bind address); other pods get their own IPs."""
    ips = node_ips(cluster)
    node = cluster.nodes[0]
    pin = {"nodeSelector": {"kubernetes.io/hostname": node}}
    apply(
        cluster,
        namespace,
        pod_body("host", cluster.image, hostNetwork=True, **pin),
        pod_body("pod-a", cluster.image, **pin),
        pod_body("pod-b", cluster.image, **pin),
    )
    pods = {
        p["metadata"]["name"]: p
        for p in wait_until(
            lambda: running_pods(cluster, namespace, "app in (host,pod-a,pod-b)", 3),
            what="3 Running pods",
        )
    }
    host = pods["host"]["status"]
    assert host["podIP"] == host["hostIP"] == ips[node]
    assert [i["ip"] for i in host["podIPs"]] == [ips[node]]
    a, b = pods["pod-a"]["status"], pods["pod-b"]["status"]
    assert a["hostIP"] == b["hostIP"] == ips[node]
    assert a["podIP"] != b["podIP"]
    assert ips[node] not in (a["podIP"], b["podIP"])
    if not cluster.external:
        # kwok hands out pod IPs from the node's own podCIDR.
        cidr = ipaddress.ip_network(cluster.json("get", "node", node)["spec"]["podCIDR"])
        assert ipaddress.ip_address(a["podIP"]) in cidr
        assert ipaddress.ip_address(b["podIP"]) in cidr
        # Every fake node has a distinct InternalIP.
        assert len({ips[n] for n in cluster.nodes}) == len(cluster.nodes)


def test_deleting_a_pod_garbage_collects_the_configmap_it_owns(
    cluster: Cluster, namespace: str
) -> None:
    apply(cluster, namespace, pod_body("owner", cluster.image))
    pod = wait_until(
        lambda: running_pods(cluster, namespace, "app=owner", 1), what="owner Running"
    )[0]
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": "owner",
                    "uid": pod["metadata"]["uid"],
                }
            ],
        },
        "data": {"port": "20000"},
    }
    bystander = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bystander"}}
    apply(cluster, namespace, owned, bystander)
    cluster.kubectl("delete", "pod", "-n", namespace, "owner", "--wait=false")

    def configmap_gone() -> bool:
        got = cluster.kubectl("get", "configmap", "-n", namespace, "owned", check=False)
        return got.returncode != 0 and "NotFound" in got.stderr

    wait_until(configmap_gone, timeout=90, what="the garbage collector to delete 'owned'")
    # The pod is really gone (kwok's pod-delete stage), and only its
    # dependent was collected.
    assert cluster.kubectl("get", "pod", "-n", namespace, "owner", check=False).returncode != 0
    cluster.kubectl("get", "configmap", "-n", namespace, "bystander")


def _client_with_token(cluster: Cluster, token: str) -> k8s.ApiClient:
    """The cluster's server and CA, a bearer token instead of the admin's cert."""
    conf = k8s.Configuration()
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=cluster.kubeconfig, client_configuration=conf
    )
    conf.cert_file = conf.key_file = None
    conf.api_key = {"authorization": f"Bearer {token}"}
    conf.refresh_api_key_hook = None
    return k8s.ApiClient(conf)


def test_service_account_without_rbac_is_forbidden(
    cluster: Cluster, namespace: str, core_api: k8s.CoreV1Api
) -> None:
    core_api.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    # A token from the TokenRequest API, signed with the cluster's SA key.
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    issued = core_api.create_namespaced_service_account_token("nobody", namespace, request)
    assert issued.status is not None and issued.status.token
    token: str = issued.status.token
    user = f"system:serviceaccount:{namespace}:nobody"

    with _client_with_token(cluster, token) as api:
        # Authenticated (not 401) as the ServiceAccount ...
        review = k8s.AuthenticationV1Api(api).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status is not None and review.status.user_info is not None
        assert review.status.user_info.username == user
        # ... and refused (403) everything RBAC does not grant it.
        with pytest.raises(ApiException) as refused:
            k8s.CoreV1Api(api).list_namespaced_pod(namespace)
        assert refused.value.status == 403
        message = json.loads(refused.value.body or "{}")["message"]
        assert f'User "{user}" cannot list resource "pods"' in message
        with pytest.raises(ApiException) as refused:
            k8s.CoreV1Api(api).create_namespaced_config_map(
                namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="x"))
            )
        assert refused.value.status == 403

    # Impersonation reaches the same authorizer.
    denied = cluster.kubectl("get", "pods", "-n", namespace, f"--as={user}", check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr
    # The admin kubeconfig itself is allowed.
    cluster.kubectl("get", "pods", "-n", namespace)


def test_api_server_reports_the_pinned_version(cluster: Cluster, api_client: k8s.ApiClient) -> None:
    local_only(cluster)
    pinned = testbed.Toolchain.from_env().k8s_version
    assert pinned == cluster.versions["kubernetes"]
    info = k8s.VersionApi(api_client).get_code()
    assert info.git_version == pinned
    assert (info.major, info.minor) == ("1", pinned.split(".")[1])
    client_version = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)
    assert client_version["clientVersion"]["gitVersion"] == pinned


@pytest.fixture
def scratch_node(cluster: Cluster, namespace: str) -> Iterator[str]:
    """An extra kwok node only this test's pods tolerate (so the rest of the
    session cannot take its GPUs)."""
    local_only(cluster)
    body = testbed.node_manifest(0, max_pods=16)
    name = f"scratch-{namespace}"[:63]
    body["metadata"]["name"] = name
    body["metadata"]["labels"]["kubernetes.io/hostname"] = name
    body["spec"] = {
        "taints": [{"key": "berth.dev/test", "value": namespace, "effect": "NoSchedule"}]
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        yield name
    finally:
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def test_scheduler_enforces_gpu_allocatable(
    cluster: Cluster, namespace: str, scratch_node: str
) -> None:
    local_only(cluster)

    def gpu_pod(name: str, gpus: int) -> Body:
        body = pod_body(
            name,
            cluster.image,
            nodeSelector={"kubernetes.io/hostname": scratch_node},
            tolerations=[{"key": "berth.dev/test", "operator": "Exists"}],
        )
        body["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        return body

    apply(cluster, namespace, gpu_pod("six", 6))
    wait_until(lambda: running_pods(cluster, namespace, "app=six", 1), what="6-GPU pod Running")
    apply(cluster, namespace, gpu_pod("four", 4))

    def unschedulable() -> Body | None:
        pod = cluster.json("get", "pod", "-n", namespace, "four")
        cond = condition(pod, "PodScheduled")
        return cond if cond and cond.get("reason") == "Unschedulable" else None

    cond = wait_until(unschedulable, what="the 4-GPU pod to be refused")
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    # Freeing the GPUs lets it in.
    cluster.kubectl("delete", "pod", "-n", namespace, "six", "--wait=false")
    wait_until(
        lambda: running_pods(cluster, namespace, "app=four", 1),
        timeout=120,
        what="4-GPU pod Running once the 6 GPUs are free",
    )


def test_second_cluster_gets_its_own_ports_and_down_leaves_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    local_only(cluster)
    other = testbed.LocalCluster(tmp_path / "second")
    state = other.up(1, real_nodes=0, die_with_parent=True, quiet=True)
    try:
        ours = json.loads((cluster.dir / "state.json").read_text())["ports"]
        assert not set(state["ports"].values()) & set(ours.values())
        assert state["startup_seconds"] < 60
        got = cluster.kubectl("--kubeconfig", str(other.kubeconfig), "get", "nodes", "-o", "json")
        assert [n["metadata"]["name"] for n in json.loads(got.stdout)["items"]] == ["kwok-gpu-0"]
        with pytest.raises(testbed.ClusterError, match="already running"):
            other.up(1)
        procs = other.processes()
        assert sorted(p.name for p in procs) == sorted(testbed.COMPONENTS)
        assert all(p.alive() for p in procs)
    finally:
        other.down()
    assert not [p.name for p in procs if p.alive()]
    assert not other._strays()  # nothing left with that dir in its arguments
    assert not other.etcd_data.exists()
    assert other.status()["running"] is False
    assert (tmp_path / "second" / "logs" / "kube-apiserver.log").stat().st_size > 0


def test_nodes_stay_ready_past_the_node_monitor_grace_period(cluster: Cluster) -> None:
    """Leases keep the fake nodes Ready well beyond the 50 s grace period."""
    local_only(cluster)
    time.sleep(70)
    nodes = {n["metadata"]["name"]: n for n in cluster.json("get", "nodes")["items"]}
    for name in cluster.nodes:
        assert (condition(nodes[name], "Ready") or {}).get("status") == "True"
        assert not nodes[name]["spec"].get("taints")
