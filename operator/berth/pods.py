"""What Berth reads off a pod: whose it is, whether it is done, what it was given.

Every pod predicate lives here, and so does the one codec of the
``berth.dev/ports`` annotation: the assignment delivered to a pod, which is
the truth about its ports once written (I3, docs/design.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.ledger.records import Holder
from berth.names import (
    ANNOTATION_PORTS,
    GROUP,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    MANAGED_BY,
)

Body = Mapping[str, Any]

TERMINAL_PHASES = ("Succeeded", "Failed")
SUMMARY_CONDITIONS = ("Ready", "PodScheduled")


def is_terminated(pod: Body) -> bool:
    """Finished for good: its processes are gone, so are its claims on ports."""
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def is_berths(pod: Body) -> bool:
    """A worker pod Berth created (and so allocates for)."""
    labels = pod["metadata"].get("labels") or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGED_BY and LABEL_DEPLOYMENT in labels


def is_ready(pod: Body) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def owned_by(body: Body, uid: str) -> bool:
    """Whether ``body`` names the object with ``uid`` among its owners."""
    return any(o.get("uid") == uid for o in body["metadata"].get("ownerReferences") or ())


def is_managed(body: Body) -> bool:
    """Labelled as written by Berth (pods, ConfigMaps, ledgers)."""
    return (body["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY


def awaits_ports(pod: Body) -> bool:
    """Bound, alive and not delivered yet: allocation has work to do."""
    return (
        node_of(pod) is not None
        and not is_terminated(pod)
        and not pod["metadata"].get("deletionTimestamp")
        and ANNOTATION_PORTS not in (pod["metadata"].get("annotations") or {})
    )


def node_of(pod: Body) -> str | None:
    return (pod.get("spec") or {}).get("nodeName") or None


def holder_of(pod: Body) -> Holder:
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    return Holder(
        meta["namespace"],
        meta["name"],
        meta["uid"],
        labels.get(LABEL_DEPLOYMENT, ""),
        labels.get(LABEL_ROLE, ""),
    )


@dataclass(frozen=True, slots=True)
class ForeignClaim:
    """Host ports a pod Berth does not manage declares on its node."""

    node: str
    ports: tuple[int, ...]
    namespace: str
    pod: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return pod_reference(self.namespace, self.pod, self.uid)


def pod_reference(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """Enough of a pod to post an Event about it."""
    meta = {"name": name, "namespace": namespace, "uid": uid}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta}


def foreign_claim(pod: Body) -> ForeignClaim | None:
    """The host ports a pod Berth does not manage holds, if any.

    With hostNetwork, Kubernetes defaults hostPort to containerPort, so every
    declared port of such a pod is a host port.
    """
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    labels = pod["metadata"].get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) == MANAGED_BY or not node or is_terminated(pod):
        return None
    ports = {
        port.get("hostPort") or port["containerPort"]
        for container in spec.get("containers") or ()
        for port in container.get("ports") or ()
        if port.get("hostPort") or spec.get("hostNetwork")
    }
    if not ports:
        return None
    meta = pod["metadata"]
    return ForeignClaim(node, tuple(sorted(ports)), meta["namespace"], meta["name"], meta["uid"])


def encode_ports(assignment: Assignment) -> str:
    """The ``berth.dev/ports`` annotation: ``{"http":"20000","nixl":"20001-20008"}``."""
    return json.dumps(
        {name: str(rng) for name, rng in assignment.blocks.items()}, separators=(",", ":")
    )


def decode_ports(text: str) -> dict[str, PortRange]:
    """Block name -> range; raises ValueError on text no Berth wrote."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{ANNOTATION_PORTS} is not a JSON object")
    return {str(name): PortRange.parse(str(span)) for name, span in data.items()}


def delivered_ports(pod: Body) -> dict[str, PortRange] | None:
    """The blocks delivered to the pod (its annotation), or None before delivery.

    An unreadable annotation counts as not delivered: the per-pod ConfigMap
    is then the only witness left (see repair.py).
    """
    text = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_PORTS)
    if not text:
        return None
    try:
        return decode_ports(text)
    except ValueError:
        return None


def worker_summary(pod: Body) -> dict[str, Any]:
    """The part of a worker pod reconciles and repairs read: a fraction of its
    memory (with 10,000 pods, the view is most of the operator's live data).

    Berth's own labels, the owners' uids, and the conditions status reads
    (Ready; PodScheduled, whose message says when the scheduler waits for
    ports): the predicates here and in capacity.py answer the same for the
    summary as for the pod.
    """
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "deletionTimestamp") if k in meta}
    ports = (meta.get("annotations") or {}).get(ANNOTATION_PORTS)
    labels = meta.get("labels") or {}
    return {
        "metadata": {
            **kept,
            "ownerReferences": [{"uid": o["uid"]} for o in meta.get("ownerReferences") or ()],
            "labels": {
                k: v for k, v in labels.items() if k == LABEL_MANAGED_BY or k.startswith(GROUP)
            },
            "annotations": {ANNOTATION_PORTS: ports} if ports else {},
        },
        "spec": {k: spec[k] for k in ("nodeName", "hostNetwork") if spec.get(k)},
        "status": {
            **{k: status[k] for k in ("phase", "hostIP", "podIP") if k in status},
            "conditions": [
                {k: c[k] for k in ("type", "status", "message") if k in c}
                for c in status.get("conditions") or ()
                if c.get("type") in SUMMARY_CONDITIONS
            ],
        },
    }
