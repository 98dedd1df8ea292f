"""What each engine binds: one module per engine, rules by version.

``resolve_role`` turns a role of an InferenceDeployment into the
:class:`~berth.plan.RolePlan` its pods carry.
"""

from berth.engines.resolve import PRESETS, block_size, resolve_role
from berth.engines.rules import Preset, PresetError, RuleSet, parse_version

__all__ = [
    "PRESETS",
    "Preset",
    "PresetError",
    "RuleSet",
    "block_size",
    "parse_version",
    "resolve_role",
]
