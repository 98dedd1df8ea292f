"""Label, annotation and object names Berth writes: one place to change them."""

from __future__ import annotations

from berth.api.common import API_VERSION, GROUP, VERSION

# The API group and version are defined once, with the models.
__all__ = ["API_VERSION", "GROUP", "VERSION"]

# Labels on worker pods (selectable) and annotations (free-form payloads).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "berth"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_ROLE = f"{GROUP}/role"
LABEL_INDEX = f"{GROUP}/index"
LABEL_LEDGER = f"{GROUP}/ledger"
ANNOTATION_PORT_PLAN = f"{GROUP}/port-plan"
ANNOTATION_PORTS = f"{GROUP}/ports"
ANNOTATION_LEDGER_NODE = f"{GROUP}/node"
#: On pods of a DP group that spans pods: the pod holding the group's rank 0.
ANNOTATION_GROUP_LEADER = f"{GROUP}/group-leader"

FINALIZER = f"{GROUP}/finalizer"
LEDGER_PREFIX = "berth-ledger."


def pod_name(deployment: str, role: str, index: int) -> str:
    return f"{deployment}-{role}-{index}"


def pod_ports_configmap(pod: str) -> str:
    """The per-pod ConfigMap the containers' port env vars point into."""
    return f"{pod}-ports"


def port_map_configmap(deployment: str) -> str:
    """The per-deployment ConfigMap listing every worker's node, IP and ports."""
    return f"{deployment}-port-map"


def ledger_configmap(node: str) -> str:
    return f"{LEDGER_PREFIX}{node}"
