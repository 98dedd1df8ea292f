"""Engine presets: the port blocks each engine binds, and how they reach it.

A preset expands into :class:`~berth.api.deployment.PortBlock` objects, the
same type users write in ``spec.ports`` and ``roles[].ports``, so overriding a
preset block is a field-wise merge by name.  :func:`resolve_role` turns the
result into plain, frozen :class:`ResolvedBlock` values the operator stores
in each pod's port plan.

Where each rule comes from (engine sources, checked by hand) is listed in
docs/api.md; the short version:

* vLLM adds the *global* data-parallel index to ``VLLM_NIXL_SIDE_CHANNEL_PORT``
  (one listener per DP engine since v0.11.1; ``dp_rank * tp + tp_rank`` before)
  and to the KV-events endpoint port.  A pod holding ranks ``s..s+k-1`` must
  therefore get ``blockStart - s * portsPerRank`` (``rankBase``), not the
  block start, or rank ``s`` binds outside its block.
* ``VLLM_PORT`` is where vLLM's ``get_open_port()`` starts scanning upward;
  it gets a private window so the scan stays inside the pod's block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from berth.allocator.ranges import PortRange
from berth.api.deployment import (
    MAX_BLOCK_SIZE,
    InferenceDeploymentSpec,
    PortBlock,
    PortEnv,
    PresetName,
    RoleSpec,
    SizeRule,
)

EnvValue = Literal["start", "rankBase"]


class PresetError(ValueError):
    """A spec the schema accepts but Berth cannot turn into port blocks."""


@dataclass(frozen=True)
class EnvBinding:
    """An env var carrying a block's port: its first port, or the rank base.

    ``value == "rankBase"`` yields ``blockStart - firstGlobalRank * ports_per_rank``;
    ``"start"`` yields ``blockStart`` (``ports_per_rank`` is 0 then).
    """

    name: str
    value: EnvValue
    ports_per_rank: int = 0

    def port(self, span: PortRange, first_rank: int) -> int:
        if self.value == "start":
            return span.start
        return span.start - first_rank * self.ports_per_rank


@dataclass(frozen=True)
class ResolvedBlock:
    """A block a pod needs: ``size`` contiguous ports, first one a multiple of ``align``."""

    name: str
    size: int
    align: int = 1
    env: tuple[EnvBinding, ...] = ()


@dataclass(frozen=True)
class ResolvedRole:
    """Everything port-related the operator needs to build a role's pods."""

    blocks: tuple[ResolvedBlock, ...]
    #: Env vars that get the pod's own IP from the downward API.
    bind_address_env: tuple[str, ...] = ()
    #: Fixed env vars the preset needs.
    static_env: dict[str, str] = field(default_factory=dict)
    #: Informational (not part of a pod's port plan, so not compared): the
    #: preset and the rule set applied, e.g. ``>=0.11.1``.
    preset: str = field(default="custom", compare=False)
    rules: str = field(default="", compare=False)

    @property
    def total_ports(self) -> int:
        return sum(b.size for b in self.blocks)

    def env_names(self) -> list[str]:
        return [e.name for b in self.blocks for e in b.env]


# ---------------------------------------------------------------- preset data

Version = tuple[int, int, int]
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> Version:
    """``"v0.11.1rc2"`` -> ``(0, 11, 1)`` (pre-releases count as the release)."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise PresetError(f"engine version {text!r} is not a version like 0.11.1")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _show(version: Version) -> str:
    return ".".join(map(str, version))


def _env(name: str, value: EnvValue = "start") -> PortEnv:
    return PortEnv(name=name, value=value)


def _fixed(name: str, *env: PortEnv, size: int = 1) -> PortBlock:
    return PortBlock(name=name, size=size, env=list(env))


def _ruled(
    name: str,
    basis: Literal["perDataParallelRank", "perRank", "perGlobalDataParallelRank"],
    *env: PortEnv,
    multiplier: int = 1,
    plus: int = 0,
) -> PortBlock:
    rule = SizeRule(basis=basis, multiplier=multiplier, plus=plus)
    return PortBlock(name=name, size_rule=rule, env=list(env))


BlockSource = Callable[[RoleSpec], list[PortBlock]]


@dataclass(frozen=True)
class RuleSet:
    """The port rules of one engine from version ``since`` on (until the next set)."""

    since: Version
    blocks: BlockSource
    bind_address_env: tuple[str, ...] = ()
    static_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    #: Oldest first; the first set is the oldest version supported.
    rule_sets: tuple[RuleSet, ...]
    #: What ``engine.version`` names (shown in errors).
    version_of: str

    def rules_for(self, version: str | None) -> tuple[RuleSet, str]:
        """The rule set for ``version`` (None: newest) and its label, e.g. ``>=0.11.1``."""
        if not self.rule_sets:
            if version is not None:
                raise PresetError(f"preset {self.name} takes no engine version")
            return RuleSet((0, 0, 0), lambda role: []), ""
        chosen = self.rule_sets[-1]
        if version is not None:
            wanted = parse_version(version)
            oldest = self.rule_sets[0].since
            if wanted < oldest:
                raise PresetError(
                    f"preset {self.name} supports {self.version_of} {_show(oldest)} and "
                    f"newer, not {version}: use preset custom and declare the blocks"
                )
            chosen = max((r for r in self.rule_sets if r.since <= wanted), key=lambda r: r.since)
        index = self.rule_sets.index(chosen)
        label = f">={_show(chosen.since)}"
        if index + 1 < len(self.rule_sets):
            label += f",<{_show(self.rule_sets[index + 1].since)}"
        return chosen, label


# vLLM ---------------------------------------------------------------------

NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
NIXL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
#: First vLLM release with one NIXL side-channel listener per DP engine
#: (base + global DP index); before it, one per TP worker (base + dp*tp + tp_rank).
VLLM_NIXL_PER_ENGINE: Version = (0, 11, 1)
VLLM_OLDEST: Version = (0, 9, 0)


def _nixl(per_engine: bool) -> PortBlock:
    basis: Literal["perDataParallelRank", "perRank"] = (
        "perDataParallelRank" if per_engine else "perRank"
    )
    return _ruled("nixl", basis, _env(NIXL_PORT_ENV, "rankBase"))


def _vllm_tail(role: RoleSpec, *kv_env: PortEnv) -> list[PortBlock]:
    blocks = [_ruled("kv-events", "perDataParallelRank", *kv_env)]
    if role.data_parallel_size > 1:
        blocks.append(_fixed("dp-rpc", _env("BERTH_DP_RPC_PORT")))
    blocks.append(_ruled("internal", "perRank", _env("VLLM_PORT"), multiplier=4, plus=32))
    return blocks


def _vllm(nixl_per_engine: bool) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            _fixed("http", _env("BERTH_HTTP_PORT")),
            _nixl(nixl_per_engine),
            *_vllm_tail(role, _env("BERTH_KV_EVENTS_PORT", "rankBase")),
        ]

    return blocks


def _dynamo_vllm(nixl_per_engine: bool) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            _fixed("system", _env("DYN_SYSTEM_PORT")),
            _fixed("request", _env("DYN_TCP_RPC_PORT")),
            _nixl(nixl_per_engine),
            # --kv-events-config gets $(BERTH_KV_EVENTS_PORT) (vLLM adds the DP
            # index); Dynamo releases that build the config themselves read
            # DYN_VLLM_KV_EVENT_PORT and subtract their own first DP rank.
            *_vllm_tail(
                role,
                _env("BERTH_KV_EVENTS_PORT", "rankBase"),
                _env("DYN_VLLM_KV_EVENT_PORT"),
            ),
        ]

    return blocks


# SGLang -------------------------------------------------------------------


def _sglang(role: RoleSpec) -> list[PortBlock]:
    return [
        _fixed("http", _env("BERTH_HTTP_PORT")),
        _fixed("bootstrap", _env("BERTH_BOOTSTRAP_PORT")),
        # --dist-init-addr host:D binds D and D+1.. for tokenizer, detokenizer,
        # RPC, metrics and one scheduler input per DP rank.
        _ruled("dist-init", "perGlobalDataParallelRank", _env("BERTH_DIST_INIT_PORT"), plus=8),
        _fixed("nccl", _env("BERTH_NCCL_PORT")),
        _ruled("kv-events", "perDataParallelRank", _env("BERTH_KV_EVENTS_PORT", "rankBase")),
    ]


PRESETS: dict[str, Preset] = {
    "vllm": Preset(
        "vllm",
        (
            RuleSet(VLLM_OLDEST, _vllm(nixl_per_engine=False), (NIXL_HOST_ENV,)),
            RuleSet(VLLM_NIXL_PER_ENGINE, _vllm(nixl_per_engine=True), (NIXL_HOST_ENV,)),
        ),
        "vLLM",
    ),
    "dynamo-vllm": Preset(
        "dynamo-vllm",
        (
            RuleSet(
                VLLM_OLDEST,
                _dynamo_vllm(nixl_per_engine=False),
                (NIXL_HOST_ENV,),
                {"DYN_SYSTEM_ENABLED": "true"},
            ),
            RuleSet(
                VLLM_NIXL_PER_ENGINE,
                _dynamo_vllm(nixl_per_engine=True),
                (NIXL_HOST_ENV,),
                {"DYN_SYSTEM_ENABLED": "true"},
            ),
        ),
        "the vLLM version inside the Dynamo image,",
    ),
    "sglang": Preset("sglang", (RuleSet((0, 4, 0), _sglang),), "SGLang"),
    "custom": Preset("custom", (), ""),
}


def preset_blocks(
    preset: PresetName, role: RoleSpec, version: str | None = None
) -> list[PortBlock]:
    """The blocks a preset contributes for ``role`` before any override."""
    rules, _ = PRESETS[preset].rules_for(version)
    return rules.blocks(role)


# ------------------------------------------------------------------ resolution


def _merge(base: PortBlock, override: PortBlock) -> PortBlock:
    update = {
        name: getattr(override, name)
        for name in ("size", "size_rule", "align", "env", "enabled")
        if getattr(override, name) is not None
    }
    if "size" in update or "size_rule" in update:
        update.setdefault("size", None)
        update.setdefault("size_rule", None)
    return base.model_copy(update=update)


def block_size(block: PortBlock, role: RoleSpec) -> int:
    """A block's size for this role (raises PresetError when it has none)."""
    if block.size is not None:
        return block.size
    rule = block.size_rule
    if rule is None:
        raise PresetError(
            f"port block {block.name!r} has neither size nor sizeRule "
            "(only blocks that override a preset block may omit both)"
        )
    count = {
        "perDataParallelRank": role.dp_local,
        "perRank": role.tensor_parallel_size * role.dp_local,
        "perGlobalDataParallelRank": role.data_parallel_size,
    }[rule.basis]
    return count * rule.multiplier + rule.plus


def _binding(env: PortEnv, block: PortBlock, size: int, role: RoleSpec) -> EnvBinding:
    if env.value == "start":
        return EnvBinding(env.name, "start", 0)
    per_rank = env.ports_per_rank
    if per_rank is None:
        if size % role.dp_local != 0:
            raise PresetError(
                f"port block {block.name!r}: size {size} is not a multiple of "
                f"dataParallelSizeLocal {role.dp_local}; set portsPerRank on {env.name}"
            )
        per_rank = size // role.dp_local
    if per_rank * role.dp_local > size:
        raise PresetError(
            f"port block {block.name!r}: {role.dp_local} DP ranks x {per_rank} ports per "
            f"rank do not fit in {size} ports (env {env.name})"
        )
    return EnvBinding(env.name, "rankBase", per_rank)


def resolve_role(spec: InferenceDeploymentSpec, role: RoleSpec) -> ResolvedRole:
    """Expand the role's preset, apply spec.ports then role.ports by name, size it all.

    Raises :class:`PresetError` for what the schema cannot catch: an engine version
    older than the preset supports, a block left without a size, an env var bound
    twice, a rankBase block too small for its ranks.
    """
    engine = role.engine or spec.engine
    preset = PRESETS[engine.preset]
    rules, label = preset.rules_for(engine.version)
    blocks: dict[str, PortBlock] = {b.name: b for b in rules.blocks(role)}
    for override in [*(spec.ports or ()), *(role.ports or ())]:
        base = blocks.get(override.name)
        blocks[override.name] = override if base is None else _merge(base, override)

    resolved: list[ResolvedBlock] = []
    for block in blocks.values():
        if block.enabled is False:
            continue
        size = block_size(block, role)
        if size > MAX_BLOCK_SIZE:
            raise PresetError(
                f"port block {block.name!r} needs {size} ports; at most {MAX_BLOCK_SIZE}"
            )
        env = tuple(_binding(e, block, size, role) for e in block.env or ())
        resolved.append(ResolvedBlock(block.name, size, block.align or 1, env))

    bind_env = tuple(dict.fromkeys([*rules.bind_address_env, *(engine.bind_address_env or ())]))
    static_env = dict(rules.static_env)
    seen: dict[str, str] = {name: "bindAddressEnv" for name in bind_env}
    seen.update({name: "the preset's fixed env" for name in static_env})
    for block_ in resolved:
        for binding in block_.env:
            if binding.name in seen:
                raise PresetError(
                    f"env {binding.name} of port block {block_.name!r} is already set by "
                    f"{seen[binding.name]}"
                )
            seen[binding.name] = f"port block {block_.name!r}"
    return ResolvedRole(
        blocks=tuple(resolved),
        bind_address_env=bind_env,
        static_env=static_env,
        preset=engine.preset,
        rules=label,
    )


def first_global_rank(role: RoleSpec, pod_index: int) -> int:
    """The first global DP rank pod ``pod_index`` of the role holds."""
    if pod_index < 0:
        raise ValueError(f"pod index must be >= 0, not {pod_index}")
    return (pod_index % role.pods_per_group) * role.dp_local


def port_env(
    role: ResolvedRole, assigned: Mapping[str, PortRange], first_rank: int
) -> dict[str, str]:
    """Env var name -> port (as text) for a pod whose blocks are ``assigned``."""
    env: dict[str, str] = {}
    for block in role.blocks:
        span = assigned.get(block.name)
        if span is None:
            raise PresetError(f"no ports assigned for block {block.name!r}")
        if span.size < block.size:
            raise PresetError(
                f"block {block.name!r} needs {block.size} ports, got {span} ({span.size})"
            )
        for binding in block.env:
            port = binding.port(span, first_rank)
            if port < 1:
                raise PresetError(
                    f"{binding.name}: rank base {span.start} - {first_rank} x "
                    f"{binding.ports_per_rank} = {port} is not a port; give the node a "
                    "pool with higher ports or size the block perGlobalDataParallelRank"
                )
            env[binding.name] = str(port)
    return env
