"""vLLM: the ports each vLLM release binds, and the env that pins them.

Upstream evidence per rule is listed in docs/api.md (presets) and proven by
tests/contract against the released wheels.

* vLLM adds the *global* data-parallel index to ``VLLM_NIXL_SIDE_CHANNEL_PORT``
  (one listener per DP engine since v0.11.1; ``dp_rank * tp + tp_rank`` before)
  and to the KV-events endpoint port, so those env vars carry a rank base.
* ``VLLM_PORT`` is where vLLM's ``get_open_port()`` starts scanning upward;
  it gets a private window so the scan stays inside the pod's block.
"""

from __future__ import annotations

from berth.api import PortBlock, PortEnv, RoleSpec
from berth.engines.rules import BlockSource, Preset, RuleSet, Version, env, fixed, ruled

NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
NIXL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
#: First vLLM release with one NIXL side-channel listener per DP engine
#: (base + global DP index); before it, one per TP worker (base + dp*tp + tp_rank).
NIXL_PER_ENGINE: Version = (0, 11, 1)
OLDEST: Version = (0, 9, 0)


def nixl(per_engine: bool) -> PortBlock:
    return ruled(
        "nixl",
        "perDataParallelRank" if per_engine else "perRank",
        env(NIXL_PORT_ENV, "rankBase"),
    )


def tail(role: RoleSpec, *kv_env: PortEnv) -> list[PortBlock]:
    """The blocks after NIXL, shared with Dynamo's vLLM workers."""
    blocks = [ruled("kv-events", "perDataParallelRank", *kv_env)]
    if role.data_parallel_size > 1:
        blocks.append(fixed("dp-rpc", env("BERTH_DP_RPC_PORT")))
    blocks.append(ruled("internal", "perRank", env("VLLM_PORT"), multiplier=4, plus=32))
    return blocks


def _blocks(nixl_per_engine: bool) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("http", env("BERTH_HTTP_PORT")),
            nixl(nixl_per_engine),
            *tail(role, env("BERTH_KV_EVENTS_PORT", "rankBase")),
        ]

    return blocks


PRESET = Preset(
    "vllm",
    (
        RuleSet(OLDEST, _blocks(nixl_per_engine=False), (NIXL_HOST_ENV,)),
        RuleSet(NIXL_PER_ENGINE, _blocks(nixl_per_engine=True), (NIXL_HOST_ENV,)),
    ),
    "vLLM",
)
