"""How a preset is written: rule sets by engine version, and block shorthands.

Each engine module (vllm.py, dynamo.py, sglang.py) lists the port blocks its
engine binds, version by version, as :class:`RuleSet` values; the blocks are
the same :class:`~berth.api.PortBlock` type users write in ``ports``, so an
override is a field-wise merge by name (resolve.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from berth.api import PortBlock, PortEnv, RoleSpec, SizeRule
from berth.plan import EnvValue, GroupEnv

Version = tuple[int, int, int]
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")

BlockSource = Callable[[RoleSpec], list[PortBlock]]
RoleNotes = Callable[[RoleSpec], tuple[str, ...]]
SizeBasis = Literal["perDataParallelRank", "perRank", "perGlobalDataParallelRank"]


class PresetError(ValueError):
    """A spec the schema accepts but Berth cannot turn into port blocks."""


def parse_version(text: str) -> Version:
    """``"v0.11.1rc2"`` -> ``(0, 11, 1)`` (pre-releases count as the release)."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise PresetError(f"engine version {text!r} is not a version like 0.11.1")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def show_version(version: Version) -> str:
    return ".".join(map(str, version))


def env(name: str, value: EnvValue = "start") -> PortEnv:
    return PortEnv(name=name, value=value)


def fixed(name: str, *envs: PortEnv, size: int = 1) -> PortBlock:
    """A block of a fixed size."""
    return PortBlock(name=name, size=size, env=list(envs))


def ruled(
    name: str, basis: SizeBasis, *envs: PortEnv, multiplier: int = 1, plus: int = 0
) -> PortBlock:
    """A block sized from the role's parallelism."""
    rule = SizeRule(basis=basis, multiplier=multiplier, plus=plus)
    return PortBlock(name=name, size_rule=rule, env=list(envs))


@dataclass(frozen=True)
class RuleSet:
    """The port rules of one engine from version ``since`` on (until the next set)."""

    since: Version
    blocks: BlockSource
    bind_address_env: tuple[str, ...] = ()
    static_env: Mapping[str, str] = field(default_factory=dict)
    #: Env a multi-pod DP group's pods get from the group (see berth.plan.GroupEnv).
    group_env: Callable[[RoleSpec], tuple[GroupEnv, ...]] = lambda role: ()
    #: Ports this engine binds that no env or flag pins, for the status.
    warnings: RoleNotes = lambda role: ()


@dataclass(frozen=True)
class Preset:
    name: str
    #: Oldest first; the first set is the oldest version supported.
    rule_sets: tuple[RuleSet, ...]
    #: What ``engine.version`` names (shown in errors).
    version_of: str

    def supported(self) -> str:
        return ", ".join(show_version(r.since) for r in self.rule_sets)

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
                    f"preset {self.name} supports {self.version_of} {show_version(oldest)} "
                    f"and newer (rule sets from {self.supported()}), not {version}: use "
                    "preset custom and declare the blocks"
                )
            chosen = max((r for r in self.rule_sets if r.since <= wanted), key=lambda r: r.since)
        index = self.rule_sets.index(chosen)
        label = f">={show_version(chosen.since)}"
        if index + 1 < len(self.rule_sets):
            label += f",<{show_version(self.rule_sets[index + 1].since)}"
        return chosen, label
