"""NVIDIA Dynamo's vLLM workers: vLLM's blocks minus HTTP, plus Dynamo's own.

``engine.version`` is the vLLM version inside the Dynamo image, so the vLLM
rules of that version apply (vllm.py). The ai-dynamo wheels' ``Requires-Dist``
pin it: Dynamo 0.7.1 vLLM 0.11.0, 0.8.1 0.12.0, 0.9.1 0.14.1, 1.0.0 0.16.0,
1.1.0 0.19.0, 1.2.1 0.20.1, 1.6.1 0.31.0. Dynamo's own ports, read from those
wheels and run by tests/contract (tests/contract/probe_dynamo.py) at 0.7.1,
1.0.0 and 1.6.1:

* ``DYN_VLLM_KV_EVENT_PORT`` (default 20080, inside the default pool): without
  ``--kv-events-config`` Dynamo 0.7-1.0 build ``tcp://*:{port - dp_rank}``
  and vLLM adds the rank back, so the publisher binds the env's port itself
  (``dynamo/vllm/args.py`` 369-380 at 0.7.1, 301-319 at 1.0.0). From 1.1.0
  (vLLM 0.19.0) Dynamo reads no such env and only passes an explicit
  ``--kv-events-config`` on (``args.py`` 538-557 at 1.6.1).
* ``DYN_FORWARDPASS_METRIC_PORT`` (default 20380, inside the default pool),
  from Dynamo 1.1.0: the forward-pass metrics publisher binds ``base +
  data_parallel_index``, the global DP rank (``instrumented_scheduler.py``
  270-290 at 1.1.0, 2125-2172 at 1.6.1). Setting the env also *turns the
  metrics on* (``args.py`` 319-323 and 392-415 at 1.6.1), and ``--fpm-trace``
  turns them on without it, at the default port: the preset pins it.
* ``DYN_SYSTEM_PORT`` and ``DYN_TCP_RPC_PORT`` are read by Dynamo's Rust
  runtime (the ai-dynamo-runtime wheel); the suite checks both names occur in
  its compiled library. The TCP request plane exists from Dynamo 0.7.
* Dynamo 0.4-0.6 overwrote ``VLLM_NIXL_SIDE_CHANNEL_PORT`` with a port from its
  own etcd allocator (``--dynamo-port-min/max``, default 20000-30000,
  ``vllm/args.py`` 231-291 and ``vllm/ports.py`` at 0.6.1); those releases
  ship vLLM 0.10.x and are refused (docs/api.md has a recipe for them).
"""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines import vllm
from berth.engines.rules import BlockSource, Preset, RoleNotes, RuleSet, Version, env, fixed, ruled

STATIC_ENV = {"DYN_SYSTEM_ENABLED": "true"}
#: vLLM of Dynamo 0.7.0, the first release with ``DYN_TCP_RPC_PORT`` and no
#: NIXL-port override.
OLDEST: Version = (0, 11, 0)
#: vLLM of Dynamo 1.1.0: forward-pass metrics, no DYN_VLLM_KV_EVENT_PORT.
FORWARD_PASS_METRICS: Version = (0, 19, 0)
KV_ENV = "DYN_VLLM_KV_EVENT_PORT"


def _blocks(since: Version) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        # --kv-events-config gets $(BERTH_KV_EVENTS_PORT) (vLLM adds the DP
        # index); before 1.1 Dynamo builds the config itself from DYN_VLLM_KV_EVENT_PORT.
        kv_env = [env(vllm.KV_EVENTS_ENV, "rankBase")]
        if since < FORWARD_PASS_METRICS:
            kv_env.append(env(KV_ENV))
        found = [
            fixed("system", env("DYN_SYSTEM_PORT")),
            fixed("request", env("DYN_TCP_RPC_PORT")),
            vllm.nixl(since),
            *vllm.tail(role, since, *kv_env),
        ]
        if since >= FORWARD_PASS_METRICS:
            fpm = env("DYN_FORWARDPASS_METRIC_PORT", "rankBase")
            found.append(ruled("fpm", "perDataParallelRank", fpm))
        return found

    return blocks


def _warnings(since: Version) -> RoleNotes:
    def warnings(role: RoleSpec) -> tuple[str, ...]:
        notes = vllm.warnings(role)
        if since < FORWARD_PASS_METRICS and role.dp_local > 1:
            notes += (
                "Dynamo before 1.1 builds the KV-events endpoint from DYN_VLLM_KV_EVENT_PORT, "
                "one port for every DP worker process of the pod: pass --kv-events-config "
                "with $(BERTH_KV_EVENTS_PORT) (vLLM adds the global DP rank)",
            )
        return notes

    return warnings


PRESET = Preset(
    "dynamo-vllm",
    tuple(
        RuleSet(
            since,
            _blocks(since),
            (vllm.NIXL_HOST_ENV,),
            STATIC_ENV,
            vllm.group_env,
            _warnings(since),
        )
        for since in (OLDEST, vllm.V0_11_1, FORWARD_PASS_METRICS)
    ),
    "the vLLM version inside the Dynamo image,",
)
