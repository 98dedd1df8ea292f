"""Pydantic models: the single source of truth for the CRD schemas.

``python -m berth.api.crdgen`` writes ``crds/`` (and the chart's copy) from
these models; ``--check`` fails when the committed YAML drifts.
"""

from berth.api.common import API_VERSION, GROUP, VERSION
from berth.api.deployment import (
    MAX_BLOCK_SIZE,
    Condition,
    Container,
    EngineSpec,
    InferenceDeployment,
    InferenceDeploymentSpec,
    InferenceDeploymentStatus,
    PodSpecTemplate,
    PodTemplate,
    PortBlock,
    PortEnv,
    RoleSpec,
    RoleStatus,
    SizeRule,
)
from berth.api.nodeportpool import (
    NodePortPool,
    NodePortPoolSpec,
    NodePortPoolStatus,
    NodeSelector,
    PoolRange,
    ReservedPorts,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "MAX_BLOCK_SIZE",
    "VERSION",
    "Condition",
    "Container",
    "EngineSpec",
    "InferenceDeployment",
    "InferenceDeploymentSpec",
    "InferenceDeploymentStatus",
    "NodePortPool",
    "NodePortPoolSpec",
    "NodePortPoolStatus",
    "NodeSelector",
    "PodSpecTemplate",
    "PodTemplate",
    "PoolRange",
    "PortBlock",
    "PortEnv",
    "ReservedPorts",
    "RoleSpec",
    "RoleStatus",
    "SizeRule",
]
