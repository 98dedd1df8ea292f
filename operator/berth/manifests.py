"""Pure builders of the objects Berth writes: worker pods, per-pod and port-map ConfigMaps."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from berth.allocator import Assignment
from berth.capacity import request_ports
from berth.names import (
    ANNOTATION_GROUP_LEADER,
    ANNOTATION_PORT_PLAN,
    ANNOTATION_PORTS,
    API_VERSION,
    LABEL_DEPLOYMENT,
    LABEL_INDEX,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    MANAGED_BY,
    pod_name,
    pod_ports_configmap,
    port_map_configmap,
)
from berth.plan import PortPlan
from berth.pods import delivered_ports, encode_ports

Body = dict[str, Any]


def owner_reference(body: Mapping[str, Any]) -> Body:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", "InferenceDeployment"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def worker_pod(
    deployment: Mapping[str, Any],
    role: str,
    index: int,
    template: Mapping[str, Any],
    plan: PortPlan,
    *,
    leader: str | None = None,
) -> Body:
    """The pod for worker ``index`` of ``role``.

    Port env vars (and, in a DP group that spans pods, the group env that
    names its ``leader``) point into the per-pod ConfigMap, written once the
    scheduler has picked a node: the kubelet holds the container until it
    exists, so the engine never starts without its ports. The first
    container requests the plan's ports as ``berth.dev/ports`` (capacity.py).
    """
    meta = deployment["metadata"]
    name = pod_name(meta["name"], role, index)
    spec: Body = copy.deepcopy(dict(template.get("spec", {})))
    spec.setdefault("hostNetwork", True)
    # A Service named vllm* would inject VLLM_PORT=tcp://... and abort vLLM.
    spec["enableServiceLinks"] = False
    if spec["hostNetwork"]:
        spec.setdefault("dnsPolicy", "ClusterFirstWithHostNet")
    ip_field = "status.hostIP" if spec["hostNetwork"] else "status.podIP"
    injected: list[Body] = [
        {"name": env, "valueFrom": {"fieldRef": {"fieldPath": ip_field}}}
        for env in plan.role.bind_address_env
    ]
    injected += [{"name": k, "value": v} for k, v in plan.role.static_env.items()]
    injected += [
        {
            "name": env,
            "valueFrom": {"configMapKeyRef": {"name": pod_ports_configmap(name), "key": env}},
        }
        for env in [*plan.env_names(), *plan.group_env_names()]
    ]
    ours = {e["name"] for e in injected}
    for container in spec.get("containers", []):
        # Ours first: `$(VAR)` in user env and args may refer to them.
        user_env = [e for e in container.get("env", []) if e.get("name") not in ours]
        container["env"] = injected + user_env
    if spec.get("containers"):
        # The scheduler binds the pod only where this many ports are left.
        request_ports(spec["containers"][0], sum(b.size for b in plan.role.blocks))
    tmeta = template.get("metadata", {})
    labels = {
        **tmeta.get("labels", {}),
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_DEPLOYMENT: meta["name"],
        LABEL_ROLE: role,
        LABEL_INDEX: str(index),
    }
    annotations = {
        **tmeta.get("annotations", {}),
        ANNOTATION_PORT_PLAN: plan.encode(),
        **({ANNOTATION_GROUP_LEADER: leader} if leader and plan.role.group_env else {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(deployment)],
        },
        "spec": spec,
    }


def pod_ports_configmap_body(
    pod: Mapping[str, Any], env: Mapping[str, str], assignment: Assignment
) -> Body:
    """The ConfigMap the pod's port env vars resolve from.

    It also carries the assignment itself (annotation ``berth.dev/ports``):
    the kubelet starts the containers as soon as this object exists, so it is
    the first witness of a delivery, before the pod's own annotation.
    """
    meta = pod["metadata"]
    body = _configmap(
        pod,
        pod_ports_configmap(meta["name"]),
        meta.get("labels", {}).get(LABEL_DEPLOYMENT, ""),
        # Owned by the pod: the garbage collector removes it with the pod.
        {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        dict(env),
    )
    body["metadata"]["annotations"] = {ANNOTATION_PORTS: encode_ports(assignment)}
    return body


def worker_entry(pod: Mapping[str, Any]) -> Body | None:
    """One worker's line in the deployment's port map, once it has ports."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    ports = delivered_ports(pod)
    if ports is None:
        return None
    return {
        "role": meta.get("labels", {}).get(LABEL_ROLE, ""),
        "node": spec.get("nodeName", ""),
        "hostIP": status.get("hostIP", ""),
        "podIP": status.get("podIP", ""),
        "ports": {name: str(span) for name, span in ports.items()},
    }


def port_map_body(deployment: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> Body:
    """The per-deployment discovery map: one key per worker pod."""
    meta = deployment["metadata"]
    data = {}
    for pod in pods:
        entry = worker_entry(pod)
        if entry is not None:
            data[pod["metadata"]["name"]] = json.dumps(entry, sort_keys=True)
    name = port_map_configmap(meta["name"])
    return _configmap(deployment, name, meta["name"], owner_reference(deployment), data)


def _configmap(
    owner: Mapping[str, Any], name: str, deployment: str, reference: Body, data: dict[str, str]
) -> Body:
    """A ConfigMap of Berth's beside ``owner``, labelled and owned so Berth knows it is its."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": owner["metadata"]["namespace"],
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: deployment},
            "ownerReferences": [reference],
        },
        "data": data,
    }
