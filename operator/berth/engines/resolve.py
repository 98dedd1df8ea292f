"""From a role's spec to its :class:`~berth.plan.RolePlan`: preset, overrides, sizes."""

from __future__ import annotations

from berth.api import MAX_BLOCK_SIZE, InferenceDeploymentSpec, PortBlock, PortEnv, RoleSpec
from berth.engines import dynamo, sglang, vllm
from berth.engines.rules import Preset, PresetError
from berth.plan import EnvBinding, PlanBlock, RolePlan

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (vllm.PRESET, dynamo.PRESET, sglang.PRESET, Preset("custom", (), ""))
}


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


def resolve_role(spec: InferenceDeploymentSpec, role: RoleSpec) -> RolePlan:
    """Expand the role's preset, apply spec.ports then role.ports by name, size it all.

    Raises :class:`PresetError` for what the schema cannot catch: an engine version
    older than the preset supports, a block left without a size, an env var bound
    twice, a rankBase block too small for its ranks.
    """
    engine = role.engine or spec.engine
    rules, label = PRESETS[engine.preset].rules_for(engine.version)
    blocks: dict[str, PortBlock] = {b.name: b for b in rules.blocks(role)}
    for override in [*(spec.ports or ()), *(role.ports or ())]:
        base = blocks.get(override.name)
        blocks[override.name] = override if base is None else _merge(base, override)

    resolved: list[PlanBlock] = []
    for block in blocks.values():
        if block.enabled is False:
            continue
        size = block_size(block, role)
        if size > MAX_BLOCK_SIZE:
            raise PresetError(
                f"port block {block.name!r} needs {size} ports; at most {MAX_BLOCK_SIZE}"
            )
        env = tuple(_binding(e, block, size, role) for e in block.env or ())
        resolved.append(PlanBlock(block.name, size, block.align or 1, env))

    bind_env = tuple(dict.fromkeys([*rules.bind_address_env, *(engine.bind_address_env or ())]))
    static_env = dict(rules.static_env)
    seen: dict[str, str] = {name: "bindAddressEnv" for name in bind_env}
    seen.update({name: "the preset's fixed env" for name in static_env})
    for planned in resolved:
        for binding in planned.env:
            if binding.name in seen:
                raise PresetError(
                    f"env {binding.name} of port block {planned.name!r} is already set by "
                    f"{seen[binding.name]}"
                )
            seen[binding.name] = f"port block {planned.name!r}"
    group_env = rules.group_env(role)
    for group in group_env:
        if group.name in seen:
            raise PresetError(f"env {group.name} is already set by {seen[group.name]}")
    return RolePlan(
        blocks=tuple(resolved),
        bind_address_env=bind_env,
        static_env=static_env,
        preset=engine.preset,
        rules=label,
        group_env=group_env,
        warnings=rules.warnings(role),
    )
