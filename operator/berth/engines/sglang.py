"""SGLang: HTTP, disaggregation bootstrap, dist-init, NCCL and KV events."""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines.rules import Preset, RuleSet, env, fixed, ruled


def _blocks(role: RoleSpec) -> list[PortBlock]:
    return [
        fixed("http", env("BERTH_HTTP_PORT")),
        fixed("bootstrap", env("BERTH_BOOTSTRAP_PORT")),
        # --dist-init-addr host:D binds D and D+1.. for tokenizer, detokenizer,
        # RPC, metrics and one scheduler input per DP rank.
        ruled("dist-init", "perGlobalDataParallelRank", env("BERTH_DIST_INIT_PORT"), plus=8),
        fixed("nccl", env("BERTH_NCCL_PORT")),
        ruled("kv-events", "perDataParallelRank", env("BERTH_KV_EVENTS_PORT", "rankBase")),
    ]


PRESET = Preset("sglang", (RuleSet((0, 4, 0), _blocks),), "SGLang")
