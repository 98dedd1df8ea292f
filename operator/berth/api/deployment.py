"""The InferenceDeployment API (namespaced, ``berth.dev/v1alpha1``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, model_validator

from berth.api.common import (
    DNS_LABEL,
    LOWER_NAME,
    USER_ENV_NAME,
    VERSION_PATTERN,
    ApiModel,
    EnvName,
    OpenModel,
    ResourceObject,
    StatusModel,
    cel,
    validations,
)

PresetName = Literal["vllm", "dynamo-vllm", "sglang", "custom"]
EnvValue = Literal["start", "rankBase"]
SizeBasis = Literal["perDataParallelRank", "perRank", "perGlobalDataParallelRank"]

#: Largest block one request may ask for; a pool must also hold it, which the
#: operator reports as a condition when no pool on the node can.
MAX_BLOCK_SIZE = 8192
MAX_BLOCKS = 16
#: Pod names are ``<deployment>-<role>-<index>``: these keep them, and the
#: labels carrying the deployment and role names, within 63 characters.
MAX_DEPLOYMENT_NAME = 40
MAX_ROLE_NAME = 16

#: A resource quantity (``4``, ``0.5``, ``"500m"``, ``"16Gi"``). Any JSON scalar
#: passes the schema, as it does in a Pod; the API server parses the Pod's.
Quantity = Annotated[
    int | float | str,
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} must be unique: {name!r} appears twice")
        seen.add(name)


# --------------------------------------------------------------------- engine


class EngineSpec(ApiModel):
    """The inference engine, whose preset decides which port blocks a worker needs."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.preset != 'custom' || !has(self.version)",
                "engine.version does not apply to preset custom (it has no port rules)",
                field_path=".version",
            )
        )
    )

    preset: PresetName
    """Port preset: vllm (vllm serve), dynamo-vllm (python -m dynamo.vllm), sglang
    (sglang.launch_server) or custom (no preset blocks: declare every block in ports)."""

    version: Annotated[str | None, Field(max_length=32, pattern=VERSION_PATTERN)] = None
    """Engine version the port rules are taken from, e.g. 0.11.1 (for dynamo-vllm: the
    vLLM version inside the Dynamo image). Omitted: the newest rules Berth knows. A
    version older than the preset supports is reported as a Degraded condition."""

    bind_address_env: Annotated[list[EnvName] | None, Field(max_length=8)] = None
    """Extra env var names that must carry the pod's own IP (status.hostIP with
    hostNetwork, else status.podIP), in addition to the preset's (vllm and dynamo-vllm:
    VLLM_NIXL_SIDE_CHANNEL_HOST)."""

    @model_validator(mode="after")
    def _custom_has_no_version(self) -> EngineSpec:
        if self.preset == "custom" and self.version is not None:
            raise ValueError(
                "engine.version does not apply to preset custom (it has no port rules)"
            )
        return self


# ----------------------------------------------------------------- port blocks


class PortEnv(ApiModel):
    """One env var that carries a port of the block to the engine."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.value == 'rankBase' || !has(self.portsPerRank)",
                "portsPerRank applies only to value rankBase",
                field_path=".portsPerRank",
            )
        )
    )

    name: EnvName
    """Env var name (C identifier: letters, digits, underscore). Reference it in
    container args as $(NAME)."""

    value: EnvValue = "start"
    """start: the block's first port. rankBase: the first port minus the pod's first
    global data-parallel rank times portsPerRank, for engines that add the global DP rank
    to a base port (so rank s binds exactly the block's first port)."""

    ports_per_rank: Annotated[int | None, Field(ge=1, le=1024)] = None
    """Ports each DP rank uses (rankBase only). Default: the block size divided by
    dataParallelSizeLocal."""

    @model_validator(mode="after")
    def _ports_per_rank_for_rank_base(self) -> PortEnv:
        if self.value != "rankBase" and self.ports_per_rank is not None:
            raise ValueError("portsPerRank applies only to value rankBase")
        return self


class SizeRule(ApiModel):
    """Block size derived from the role's parallelism: count(basis) * multiplier + plus."""

    basis: SizeBasis
    """perDataParallelRank: dataParallelSizeLocal (DP ranks in the pod). perRank:
    tensorParallelSize * dataParallelSizeLocal (GPU ranks in the pod).
    perGlobalDataParallelRank: dataParallelSize (the whole rank space of the engine
    group, for engines whose offsets cannot be rebased)."""

    multiplier: Annotated[int, Field(ge=1, le=256)] = 1
    """Ports per counted unit."""

    plus: Annotated[int, Field(ge=0, le=1024)] = 0
    """Fixed ports added on top."""


class PortBlock(ApiModel):
    """A contiguous block of host ports carved out of the node's pool for each pod.

    A block with the name of a preset block overrides the fields it sets (size and
    sizeRule replace each other); any other name adds a block.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!(has(self.size) && has(self.sizeRule))",
                "set either size or sizeRule, not both",
                field_path=".sizeRule",
            ),
            cel(
                "!has(self.env) || self.env.all(e, self.env.exists_one(f, f.name == e.name))",
                "env names must be unique within a port block",
                field_path=".env",
            ),
        )
    )

    name: Annotated[str, Field(min_length=1, max_length=15, pattern=LOWER_NAME)]
    """Block name (lowercase letters, digits, '-'; at most 15 characters), unique in its
    list. Preset blocks: see docs/api.md."""

    size: Annotated[int | None, Field(ge=1, le=MAX_BLOCK_SIZE)] = None
    """Number of ports in the block."""

    size_rule: SizeRule | None = None
    """Size computed from the role's parallelism, instead of size."""

    align: Annotated[int | None, Field(ge=1, le=1024)] = None
    """The block's first port is a multiple of this (default 1)."""

    env: Annotated[list[PortEnv] | None, Field(max_length=8)] = None
    """Env vars that carry the block to the engine (replaces the preset's list)."""

    enabled: bool | None = None
    """false drops the block (e.g. a preset block the engine is not configured to use).
    Default true."""

    @model_validator(mode="after")
    def _check(self) -> PortBlock:
        if self.size is not None and self.size_rule is not None:
            raise ValueError("set either size or sizeRule, not both")
        if self.env:
            _unique([e.name for e in self.env], "env names within a port block")
        return self


PortBlocks = Annotated[
    list[PortBlock] | None,
    Field(
        max_length=MAX_BLOCKS,
        json_schema_extra=validations(
            cel(
                "self.all(b, self.exists_one(c, c.name == b.name))",
                "port block names must be unique",
            )
        ),
    ),
]


def _unique_blocks(blocks: list[PortBlock] | None) -> None:
    if blocks:
        _unique([b.name for b in blocks], "port block names")


# ---------------------------------------------------------------- pod template


class EnvVar(OpenModel):
    """A container env var (valueFrom and future fields pass through to the Pod)."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=USER_ENV_NAME)]
    """Env var name."""

    value: str | None = None
    """Literal value; may reference other vars as $(NAME), including the port vars
    Berth injects."""

    value_from: dict[str, Any] | None = None
    """Source for the value (fieldRef, secretKeyRef, ...), as in a Pod."""


class VolumeMount(OpenModel):
    """Where a volume appears in the container."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    """Name of a volume in template.spec.volumes."""

    mount_path: Annotated[str, Field(min_length=1, max_length=4096)]
    """Path inside the container."""

    read_only: bool | None = None
    """Mount read-only."""

    sub_path: str | None = None
    """Sub-path of the volume to mount."""


class Resources(OpenModel):
    """Compute resources, e.g. limits: {nvidia.com/gpu: 4}."""

    limits: dict[str, Quantity] | None = None
    """Maximum resources (GPUs are requested here)."""

    requests: dict[str, Quantity] | None = None
    """Minimum resources the scheduler reserves."""


class Container(OpenModel):
    """An engine container. Berth prepends its port env vars to env; fields not listed
    here (ports, probes, securityContext, ...) pass through to the Pod."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """Container name (DNS label)."""

    image: Annotated[str, Field(min_length=1, max_length=1024)]
    """Container image, e.g. vllm/vllm-openai:v0.11.1."""

    command: Annotated[list[str] | None, Field(max_length=256)] = None
    """Entrypoint; may reference env vars as $(NAME)."""

    args: Annotated[list[str] | None, Field(max_length=1024)] = None
    """Arguments; reference Berth's port vars as $(NAME), e.g. --port=$(BERTH_HTTP_PORT)."""

    env: Annotated[list[EnvVar] | None, Field(max_length=256)] = None
    """Extra env vars. A var with the name of a Berth port var is replaced by Berth's."""

    resources: Resources | None = None
    """Compute resources."""

    volume_mounts: Annotated[list[VolumeMount] | None, Field(max_length=128)] = None
    """Volumes to mount."""


class Toleration(OpenModel):
    """Lets the pod schedule onto nodes with a matching taint."""

    key: str | None = None
    """Taint key (empty with operator Exists matches every key)."""

    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (default Equal)."""

    value: str | None = None
    """Taint value for Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match (empty: all)."""

    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class Volume(OpenModel):
    """A pod volume; its source (persistentVolumeClaim, hostPath, emptyDir, ...) passes
    through to the Pod."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """Volume name, referenced by volumeMounts."""


class PodSpecTemplate(OpenModel):
    """The worker pods' spec. Berth models what it reads or changes; any other PodSpec
    field passes through and is validated by the API server when the pod is created."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.containers.all(c, self.containers.exists_one(d, d.name == c.name))",
                "container names must be unique",
                field_path=".containers",
            )
        )
    )

    containers: Annotated[list[Container], Field(min_length=1, max_length=16)]
    """The containers; each receives the port env vars."""

    host_network: bool = True
    """Run in the node's network namespace (default true: NIXL/UCX/RDMA traffic is fast
    there, and that is where ports collide, which is what Berth prevents)."""

    enable_service_links: Annotated[
        bool | None,
        Field(
            json_schema_extra=validations(
                cel(
                    "self == false",
                    "enableServiceLinks must be false or unset: a Service named vllm* "
                    "would inject VLLM_PORT=tcp://... and abort vLLM",
                )
            )
        ),
    ] = None
    """Always false on Berth pods (a Service named vllm* would otherwise inject
    VLLM_PORT=tcp://... and vLLM aborts); only false or unset is accepted."""

    node_selector: dict[str, str] | None = None
    """Node labels the pod requires. This is also how a deployment picks its pools:
    each node's ports come from the NodePortPool that covers it."""

    tolerations: Annotated[list[Toleration] | None, Field(max_length=64)] = None
    """Taints the pod tolerates (GPU nodes are often tainted)."""

    affinity: dict[str, Any] | None = None
    """Node and pod (anti-)affinity, as in a Pod."""

    volumes: Annotated[list[Volume] | None, Field(max_length=128)] = None
    """Volumes (model cache, /dev/shm, ...)."""

    service_account_name: Annotated[str | None, Field(max_length=253)] = None
    """Service account the pods run as."""

    @model_validator(mode="after")
    def _check(self) -> PodSpecTemplate:
        _unique([c.name for c in self.containers], "container names")
        if self.enable_service_links:
            raise ValueError(
                "enableServiceLinks must be false or unset: a Service named vllm* "
                "would inject VLLM_PORT=tcp://... and abort vLLM"
            )
        return self


class TemplateMetadata(ApiModel):
    """Labels and annotations copied onto every worker pod."""

    labels: dict[str, str] | None = None
    """Pod labels (Berth adds its own berth.dev/* and app.kubernetes.io/managed-by)."""

    annotations: dict[str, str] | None = None
    """Pod annotations."""


class PodTemplate(ApiModel):
    """The template Berth creates each worker pod from."""

    metadata: TemplateMetadata | None = None
    """Labels and annotations for the pods."""

    spec: PodSpecTemplate
    """Pod spec."""


# ------------------------------------------------ rules across spec and roles
#
# A role's blocks are the preset's, overridden by name by spec.ports, then by
# the role's ports (berth.engines.resolve). Preset blocks are unknown here, so
# these rules judge only what the spec declares, and only where the preset
# cannot change the answer; the operator checks the rest after expansion.
# The CEL below and the Python twins under it encode the same merge.

# Optional lists are tested with has() around each macro, never as
# `has(x) ? x : []`: the API server's cost estimator loses a list's maxItems
# through a conditional and then refuses the rule as unbounded.
_SPEC = "self.ports"


def _blocks(role: str) -> str:
    return f"{role}.ports"


def _all(path: str, var: str, body: str) -> str:
    return f"(!has({path}) || {path}.all({var}, {body}))"


def _exists(path: str, var: str, body: str) -> str:
    return f"(has({path}) && {path}.exists({var}, {body}))"


def _role_block_enabled(b: str) -> str:
    """A role block is off if it says so, or says nothing and spec.ports' block is off."""
    off = _exists(_SPEC, "s", f"s.name == {b}.name && has(s.enabled) && !s.enabled")
    return f"(has({b}.enabled) ? {b}.enabled : !{off})"


def _spec_block_enabled(role: str, s: str) -> str:
    """A spec block is off if the role's block of that name says so, else if it says so."""
    said = _exists(_blocks(role), "b", f"b.name == {s}.name && has(b.enabled)")
    on = _exists(_blocks(role), "b", f"b.name == {s}.name && has(b.enabled) && b.enabled")
    return f"({said} ? {on} : (!has({s}.enabled) || {s}.enabled))"


def _role_env_block(role: str, b: str) -> str:
    """The role's own block sets env and stays enabled."""
    return f"(has({b}.env) && {_role_block_enabled(b)})"


def _spec_env_block(role: str, s: str) -> str:
    """spec.ports' block sets env the role keeps (no role block of that name sets env)."""
    replaced = _exists(_blocks(role), "b", f"b.name == {s}.name && has(b.env)")
    return f"(has({s}.env) && !{replaced} && {_spec_block_enabled(role, s)})"


def _is_bind_env(role: str, name: str) -> str:
    own, spec = f"{role}.engine.bindAddressEnv", "self.engine.bindAddressEnv"
    return (
        f"(has({role}.engine) ? (has({own}) && {name} in {own}) : "
        f"(has({spec}) && {name} in {spec}))"
    )


# Env names set twice. A rule over every role's merged blocks exceeds the API
# server's CEL cost budget, so the blocks are judged as written, in pieces
# that together refuse the same specs as _check_env_names: a block counts
# unless it says enabled: false; spec.ports' block counts for a role unless
# the role has a block of its name.
_ON = "(!has({b}.enabled) || {b}.enabled)"
_SETS = "{b}.env.exists(f, f.name == e.name)"


def _unique_env_rule(path: str) -> str:
    """Within one list of blocks (spec.ports, or a role's ports)."""
    holder = f"has(o.env) && {_ON.format(b='o')} && {_SETS.format(b='o')}"
    return _all(
        path,
        "x",
        f"!has(x.env) || !{_ON.format(b='x')} || x.env.all(e, {path}.exists_one(o, {holder}))",
    )


def _own_vs_bind_env_rule(bind: str) -> str:
    """A role's blocks against its own engine's bindAddressEnv."""
    return f"!has({bind}) || " + _all(
        "self.ports",
        "x",
        f"!has(x.env) || !{_ON.format(b='x')} || x.env.all(e, !(e.name in {bind}))",
    )


def _kept(role: str, s: str) -> str:
    """spec.ports' block ``s`` sets env that reaches ``role`` as written."""
    overridden = _exists(_blocks(role), "q", f"q.name == {s}.name")
    return f"(has({s}.env) && {_ON.format(b=s)} && !{overridden})"


def _role_vs_spec_env_rule() -> str:
    own = f"has(x.env) && {_ON.format(b='x')} && {_SETS.format(b='x')}"
    return (
        "self.roles.all(r, "
        + _all(_SPEC, "o", f"!{_kept('r', 'o')} || o.env.all(e, !{_exists('r.ports', 'x', own)})")
        + ")"
    )


def _spec_vs_bind_env_rule() -> str:
    return (
        "self.roles.all(r, "
        + _all(_SPEC, "o", f"!{_kept('r', 'o')} || o.env.all(e, !{_is_bind_env('r', 'e.name')})")
        + ")"
    )


def _role_vs_spec_bind_env_rule() -> str:
    spec_bind = "self.engine.bindAddressEnv"
    return (
        f"!has({spec_bind}) || self.roles.all(r, has(r.engine) || "
        + _all(
            "r.ports",
            "x",
            f"!has(x.env) || !{_ON.format(b='x')} || x.env.all(e, !(e.name in {spec_bind}))",
        )
        + ")"
    )


def _has_size(b: str) -> str:
    return f"(has({b}.size) || has({b}.sizeRule))"


def _custom_sizes_rule() -> str:
    preset = "(has(r.engine) ? r.engine.preset : self.engine.preset)"
    own = _all(
        _blocks("r"),
        "b",
        f"!{_role_block_enabled('b')} || {_has_size('b')} || "
        + _exists(_SPEC, "s", f"s.name == b.name && {_has_size('s')}"),
    )
    spec = _all(
        _SPEC,
        "s",
        f"{_exists(_blocks('r'), 'b', 'b.name == s.name')} || "
        f"(has(s.enabled) && !s.enabled) || {_has_size('s')}",
    )
    return f"self.roles.all(r, {preset} != 'custom' || ({own} && {spec}))"


def _rule_size(role: str, rule: str) -> str:
    dp_local = (
        f"(has({role}.dataParallelSizeLocal) ? {role}.dataParallelSizeLocal : "
        f"{role}.dataParallelSize)"
    )
    count = (
        f"({rule}.basis == 'perDataParallelRank' ? {dp_local} : "
        f"{rule}.basis == 'perRank' ? {role}.tensorParallelSize * {dp_local} : "
        f"{role}.dataParallelSize)"
    )
    return (
        f"{count} * (has({rule}.multiplier) ? {rule}.multiplier : 1) + "
        f"(has({rule}.plus) ? {rule}.plus : 0)"
    )


def _size_rule_bound_rule() -> str:
    def fits(rule: str) -> str:
        return f"{_rule_size('r', rule)} <= {MAX_BLOCK_SIZE}"

    own = _all(
        _blocks("r"),
        "b",
        f"!has(b.sizeRule) || !{_role_block_enabled('b')} || {fits('b.sizeRule')}",
    )
    sized_by_role = _exists(_blocks("r"), "b", f"b.name == s.name && {_has_size('b')}")
    spec = _all(
        _SPEC,
        "s",
        f"!has(s.sizeRule) || {sized_by_role} || !{_spec_block_enabled('r', 's')} || "
        f"{fits('s.sizeRule')}",
    )
    return f"self.roles.all(r, {own} && {spec})"


_ENV_TWICE_MESSAGE = (
    "an env var is set twice in a role: each env name may appear once in the role's "
    "port blocks, spec.ports' blocks the role does not override by name, and "
    "engine.bindAddressEnv (blocks with enabled: false do not count)"
)
_CUSTOM_SIZE_MESSAGE = (
    "with preset custom every enabled port block needs size or sizeRule (there is no "
    "preset block to take one from)"
)
_RULE_SIZE_MESSAGE = (
    f"a port block's sizeRule gives more than {MAX_BLOCK_SIZE} ports for a role's "
    "parallelism (count * multiplier + plus)"
)


def _effective_blocks(
    spec: InferenceDeploymentSpec, role: RoleSpec
) -> list[tuple[PortBlock, PortBlock | None]]:
    """(block, spec.ports' block of the same name) for each declared block, by name."""
    base = {b.name: b for b in spec.ports or ()}
    own = {b.name: b for b in role.ports or ()}
    merged = [(b, base.get(name)) for name, b in own.items()]
    return merged + [(b, None) for name, b in base.items() if name not in own]


def _enabled(block: PortBlock, under: PortBlock | None) -> bool:
    if block.enabled is not None:
        return block.enabled
    return under is None or under.enabled is not False


def _env_names(blocks: list[PortBlock] | None) -> list[str]:
    return [e.name for b in blocks or () if b.enabled is not False for e in b.env or ()]


def _check_env_names(spec: InferenceDeploymentSpec, role: RoleSpec) -> None:
    """Python twin of the env rules: each env name once per role, blocks as written."""
    engine = role.engine or spec.engine
    own_names = {b.name for b in role.ports or ()}
    kept = [b for b in spec.ports or () if b.name not in own_names]
    names = _env_names(role.ports) + _env_names(kept)
    bind = set(engine.bind_address_env or ())
    spec_names = _env_names(spec.ports)
    if (
        len(set(names)) != len(names)
        or bind & set(names)
        or len(set(spec_names)) != len(spec_names)
    ):
        raise ValueError(_ENV_TWICE_MESSAGE)


def _check_declared_blocks(spec: InferenceDeploymentSpec) -> None:
    """Python twin of the three rules above."""
    for role in spec.roles:
        engine = role.engine or spec.engine
        _check_env_names(spec, role)
        for block, under in _effective_blocks(spec, role):
            if not _enabled(block, under):
                continue
            rule = block.size_rule
            if rule is None and block.size is None and under is not None:
                rule = under.size_rule
            if rule is not None:
                count = {
                    "perDataParallelRank": role.dp_local,
                    "perRank": role.tensor_parallel_size * role.dp_local,
                    "perGlobalDataParallelRank": role.data_parallel_size,
                }[rule.basis]
                if count * rule.multiplier + rule.plus > MAX_BLOCK_SIZE:
                    raise ValueError(_RULE_SIZE_MESSAGE)
            sized = any(
                b is not None and (b.size, b.size_rule) != (None, None) for b in (block, under)
            )
            if engine.preset == "custom" and not sized:
                raise ValueError(_CUSTOM_SIZE_MESSAGE)


# ----------------------------------------------------------------------- roles


class RoleSpec(ApiModel):
    """A group of identical worker pods (e.g. prefill or decode).

    Pods are numbered 0..replicas-1. Consecutive pods form engine groups of
    dataParallelSize/dataParallelSizeLocal pods; pod i holds the global DP ranks from
    (i mod podsPerGroup) * dataParallelSizeLocal on.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.dataParallelSizeLocal) || "
                "self.dataParallelSize % self.dataParallelSizeLocal == 0",
                "dataParallelSizeLocal must divide dataParallelSize",
                field_path=".dataParallelSizeLocal",
            ),
            cel(
                "!has(self.dataParallelSizeLocal) || "
                "self.dataParallelSizeLocal > self.dataParallelSize || "
                "self.replicas % (self.dataParallelSize / self.dataParallelSizeLocal) == 0",
                "replicas must be a multiple of dataParallelSize / dataParallelSizeLocal "
                "(the pods of one engine group)",
                field_path=".replicas",
            ),
            cel(_unique_env_rule("self.ports"), _ENV_TWICE_MESSAGE, field_path=".ports"),
            cel(
                "!has(self.engine) || " + _own_vs_bind_env_rule("self.engine.bindAddressEnv"),
                _ENV_TWICE_MESSAGE,
                field_path=".ports",
            ),
        )
    )

    name: Annotated[str, Field(min_length=1, max_length=MAX_ROLE_NAME, pattern=LOWER_NAME)]
    """Role name, e.g. prefill or decode (lowercase, at most 16 characters); part of the
    pod names <deployment>-<role>-<index>."""

    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Number of worker pods."""

    tensor_parallel_size: Annotated[int, Field(ge=1, le=512)] = 1
    """Tensor-parallel size (GPUs per engine)."""

    data_parallel_size: Annotated[int, Field(ge=1, le=1024)] = 1
    """Global data-parallel size of one engine group (the engine's --data-parallel-size)."""

    data_parallel_size_local: Annotated[int | None, Field(ge=1, le=1024)] = None
    """DP ranks per pod (the engine's --data-parallel-size-local). Must divide
    dataParallelSize. Default: dataParallelSize (the whole group in one pod)."""

    engine: EngineSpec | None = None
    """Overrides spec.engine for this role."""

    ports: PortBlocks = None
    """Port blocks for this role; override spec.ports and the preset by name."""

    template: PodTemplate
    """Pod template of the workers."""

    @property
    def dp_local(self) -> int:
        """DP ranks per pod (dataParallelSizeLocal or its default)."""
        return self.data_parallel_size_local or self.data_parallel_size

    @property
    def pods_per_group(self) -> int:
        """Pods that together hold one engine group's DP ranks."""
        return max(1, self.data_parallel_size // self.dp_local)

    @model_validator(mode="after")
    def _check(self) -> RoleSpec:
        if self.data_parallel_size % self.dp_local != 0:
            raise ValueError("dataParallelSizeLocal must divide dataParallelSize")
        if self.replicas % self.pods_per_group != 0:
            raise ValueError(
                "replicas must be a multiple of dataParallelSize / dataParallelSizeLocal "
                "(the pods of one engine group)"
            )
        _unique_blocks(self.ports)
        return self


class InferenceDeploymentSpec(ApiModel):
    """Desired state: the roles, their engine and ports, and their pod templates."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(_unique_env_rule(_SPEC), _ENV_TWICE_MESSAGE, field_path=".ports"),
            cel(_role_vs_spec_env_rule(), _ENV_TWICE_MESSAGE, field_path=".roles"),
            cel(_spec_vs_bind_env_rule(), _ENV_TWICE_MESSAGE, field_path=".roles"),
            cel(_role_vs_spec_bind_env_rule(), _ENV_TWICE_MESSAGE, field_path=".roles"),
            cel(_custom_sizes_rule(), _CUSTOM_SIZE_MESSAGE, field_path=".roles"),
            cel(_size_rule_bound_rule(), _RULE_SIZE_MESSAGE, field_path=".roles"),
        )
    )

    engine: EngineSpec
    """Engine preset for every role (a role may override it)."""

    ports: PortBlocks = None
    """Port blocks for every role: extend or override the preset's blocks by name."""

    roles: Annotated[
        list[RoleSpec],
        Field(
            min_length=1,
            max_length=8,
            json_schema_extra=validations(
                cel(
                    "self.all(r, self.exists_one(s, s.name == r.name))",
                    "role names must be unique",
                )
            ),
        ),
    ]
    """The roles (prefill, decode, ...), each a group of worker pods."""

    @model_validator(mode="after")
    def _check(self) -> InferenceDeploymentSpec:
        _unique([r.name for r in self.roles], "role names")
        _unique_blocks(self.ports)
        _check_declared_blocks(self)
        return self


# ---------------------------------------------------------------------- status


ConditionType = Literal["Ready", "Progressing", "PortsAllocated", "Degraded"]


class Condition(StatusModel):
    """A status condition (types Ready, Progressing, PortsAllocated, Degraded)."""

    type: Annotated[str, Field(max_length=64)]
    """Ready, Progressing, PortsAllocated or Degraded."""

    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""

    reason: Annotated[str | None, Field(max_length=128)] = None
    """Machine-readable reason in CamelCase, e.g. PortsExhausted or InvalidSpec."""

    message: Annotated[str | None, Field(max_length=32768)] = None
    """Human-readable details."""

    last_transition_time: datetime | None = None
    """When status last changed."""

    observed_generation: int | None = None
    """metadata.generation the condition was computed for."""


class RoleStatus(StatusModel):
    """Pod counts of one role."""

    name: str
    """Role name."""

    desired: int = 0
    """Pods the role should have."""

    ready: int = 0
    """Pods that are Ready."""

    allocated: int = 0
    """Pods that hold their ports."""


class InferenceDeploymentStatus(StatusModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = None
    """metadata.generation the status reflects."""

    conditions: list[Condition] | None = None
    """Ready, Progressing, PortsAllocated and Degraded, each with a reason."""

    roles: list[RoleStatus] | None = None
    """Per-role desired, ready and allocated pod counts."""

    summary: str | None = None
    """Short summary of the port assignments, e.g. node-a: 20000-20047."""

    prefill: str | None = None
    """Ready/desired pods of the role named prefill, e.g. 2/2."""

    decode: str | None = None
    """Ready/desired pods of the role named decode, e.g. 2/2."""

    def condition(self, type_: str) -> Condition | None:
        for condition in self.conditions or ():
            if condition.type == type_:
                return condition
        return None


# ------------------------------------------------------------------- resource


class InferenceDeployment(ResourceObject):
    """Worker pods of an LLM inference engine, with per-node port blocks assigned by
    Berth."""

    kind: str = "InferenceDeployment"
    spec: InferenceDeploymentSpec
    status: InferenceDeploymentStatus | None = None

    @model_validator(mode="after")
    def _check_name(self) -> InferenceDeployment:
        name = self.metadata.get("name")
        if isinstance(name, str) and len(name) > MAX_DEPLOYMENT_NAME:
            raise ValueError(_NAME_MESSAGE)
        return self

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))


_NAME_MESSAGE = (
    f"metadata.name must be at most {MAX_DEPLOYMENT_NAME} characters: pods are named "
    "<name>-<role>-<index> and the name is a label value"
)

#: Rules on the whole object (only metadata.name is visible to CEL there).
ROOT_VALIDATIONS = [
    cel(f"self.metadata.name.size() <= {MAX_DEPLOYMENT_NAME}", _NAME_MESSAGE),
]
