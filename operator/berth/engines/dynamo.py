"""NVIDIA Dynamo's vLLM workers: vLLM's blocks minus HTTP, plus Dynamo's own."""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines import vllm
from berth.engines.rules import BlockSource, Preset, RuleSet, env, fixed

STATIC_ENV = {"DYN_SYSTEM_ENABLED": "true"}


def _blocks(nixl_per_engine: bool) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("system", env("DYN_SYSTEM_PORT")),
            fixed("request", env("DYN_TCP_RPC_PORT")),
            vllm.nixl(nixl_per_engine),
            # --kv-events-config gets $(BERTH_KV_EVENTS_PORT) (vLLM adds the DP
            # index); Dynamo releases that build the config themselves read
            # DYN_VLLM_KV_EVENT_PORT and subtract their own first DP rank.
            *vllm.tail(
                role, env("BERTH_KV_EVENTS_PORT", "rankBase"), env("DYN_VLLM_KV_EVENT_PORT")
            ),
        ]

    return blocks


PRESET = Preset(
    "dynamo-vllm",
    (
        RuleSet(vllm.OLDEST, _blocks(False), (vllm.NIXL_HOST_ENV,), STATIC_ENV),
        RuleSet(vllm.NIXL_PER_ENGINE, _blocks(True), (vllm.NIXL_HOST_ENV,), STATIC_ENV),
    ),
    "the vLLM version inside the Dynamo image,",
)
