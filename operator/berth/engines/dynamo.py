"""NVIDIA Dynamo's vLLM workers: vLLM's blocks minus HTTP, plus Dynamo's own.

``engine.version`` is the vLLM version inside the Dynamo image (ai-dynamo
0.7.1 pins vLLM 0.11.0, 1.6.1 pins 0.31.0: the wheels' ``Requires-Dist``), so
the vLLM rules of that version apply (vllm.py). Dynamo's own ports, read from
the ai-dynamo wheels:

* ``DYN_VLLM_KV_EVENT_PORT`` (``dynamo/vllm/envs.py`` line 20 at 0.7.1, default
  20080, inside the default pool): ``dynamo/vllm/args.py`` lines 369-380 at
  0.7.1 build ``tcp://*:{port - dp_rank}`` and vLLM adds the rank back, so the
  publisher binds the env's port itself. From 1.x (``args.py`` 538-557 at
  1.6.1) Dynamo only uses an explicit ``--kv-events-config``.
* ``DYN_FORWARDPASS_METRIC_PORT`` (``dynamo/vllm/envs.py`` lines 20-23 at
  1.6.1, default 20380, inside the default pool): the forward-pass metrics
  publisher binds ``base + data_parallel_index``, the global DP rank
  (``dynamo/vllm/instrumented_scheduler.py`` lines 2125-2172 at 1.6.1).
* ``DYN_SYSTEM_PORT`` and ``DYN_TCP_RPC_PORT`` are read by Dynamo's Rust
  runtime (not in the Python wheel, so not run by the contract suite); the
  TCP request plane exists from Dynamo 0.7.
* Dynamo 0.4-0.6 overwrote ``VLLM_NIXL_SIDE_CHANNEL_PORT`` with a port from its
  own etcd allocator (``--dynamo-port-min/max``, default 20000-30000); those
  releases ship vLLM 0.10.x and are refused (older than 0.11.0).
"""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines import vllm
from berth.engines.rules import BlockSource, Preset, RuleSet, Version, env, fixed, ruled

STATIC_ENV = {"DYN_SYSTEM_ENABLED": "true"}
#: vLLM of Dynamo 0.7.0, the first release with ``DYN_TCP_RPC_PORT`` and no
#: NIXL-port override.
OLDEST: Version = (0, 11, 0)


def _blocks(since: Version) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("system", env("DYN_SYSTEM_PORT")),
            fixed("request", env("DYN_TCP_RPC_PORT")),
            vllm.nixl(since),
            # --kv-events-config gets $(BERTH_KV_EVENTS_PORT) (vLLM adds the DP
            # index); Dynamo 0.7 builds the config itself from DYN_VLLM_KV_EVENT_PORT.
            *vllm.tail(
                role, since, env(vllm.KV_EVENTS_ENV, "rankBase"), env("DYN_VLLM_KV_EVENT_PORT")
            ),
            ruled("fpm", "perDataParallelRank", env("DYN_FORWARDPASS_METRIC_PORT", "rankBase")),
        ]

    return blocks


def _warn(role: RoleSpec) -> tuple[str, ...]:
    notes = vllm.warnings(role)
    if role.dp_local > 1:
        notes += (
            "Dynamo 0.7 builds the KV-events endpoint from DYN_VLLM_KV_EVENT_PORT, one port "
            "for every DP worker process of the pod: pass --kv-events-config with "
            "$(BERTH_KV_EVENTS_PORT) (vLLM adds the global DP rank)",
        )
    return notes


PRESET = Preset(
    "dynamo-vllm",
    tuple(
        RuleSet(since, _blocks(since), (vllm.NIXL_HOST_ENV,), STATIC_ENV, vllm.group_env, _warn)
        for since in (OLDEST, vllm.V0_11_1)
    ),
    "the vLLM version inside the Dynamo image,",
)
