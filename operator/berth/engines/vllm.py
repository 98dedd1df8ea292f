"""vLLM: the ports each vLLM release binds, and the env that pins them.

Every rule below was read from the released wheel of the version it names and
is run by tests/contract (vLLM's own code, heavy imports stubbed) for every
version in the matrix of docs/api.md.

NIXL side channel (``VLLM_NIXL_SIDE_CHANNEL_PORT``), file
``vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py`` (0.33.0:
``.../v1/nixl/base_scheduler.py``):

* 0.9.0 (lines 384-409): each TP worker listens on ``base + tp_rank``; no DP
  offset, so two DP engines in one pod bind the same ports.
* 0.9.1 (lines 180-187, 337-344, 416-433): ``base + data_parallel_rank_local * tp``
  then ``+ tp_rank``: a *local* offset, so the base is the block start.
* 0.9.2-0.11.0 (0.9.2 lines 188-195, 452-469; 0.11.0 lines 264-271, 607-624):
  ``base + data_parallel_rank * tp + tp_rank`` with the *global* DP rank.
* 0.11.1 on (0.11.1 lines 346-356, 432-446; 0.33.0 base_scheduler.py 60-80,
  343-357): one listener per DP engine at ``base + data_parallel_index``
  (the global rank).

KV events (``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``; the rank
comes from ``vllm/v1/core/sched/scheduler.py``): 0.9.0 (scheduler.py 80-81)
passes no rank, the endpoint is bound as given; from 0.9.1 (scheduler.py 85-87)
the port is offset by the global DP rank (``offset_endpoint_port``).

``--data-parallel-rpc-port``: bound only when the DP group spans pods.
``vllm/v1/engine/utils.py`` ``launch_core_engines`` (0.9.2 lines 393-398,
0.11.1 lines 866-871, 0.33.0 lines 1340-1352): ``handshake_local_only =
offline_mode or local_engine_count == dp_size`` picks an IPC path otherwise;
0.9.0/0.9.1 ``v1/engine/core_client.py`` (0.9.0 lines 435-448) the same test.

``VLLM_PORT`` (``vllm/utils.py`` 0.9.x, ``vllm/utils/__init__.py`` 0.10.x-0.11.0
lines 925-973 at 0.10.2, ``vllm/utils/network_utils.py`` from 0.11.1, lines
150-197 at 0.17.1): ``get_open_port()`` returns the first port from
``VLLM_PORT`` up that it can bind and then closes it, so repeated calls return
the same port until something binds it; ``get_open_ports_list()`` (the DP
master ports, ``config/parallel.py`` 325 at 0.10.2, 530 at 0.11.1) loops until
it has 5 *distinct* ports and never returns in 0.10.2-0.17.1 (fixed in 0.18.0,
network_utils.py 169-215, which still overlaps the ports of earlier
``get_open_port()`` calls). Berth therefore sets ``VLLM_PORT`` only for
single-engine pods (``dataParallelSize == 1``); with DP the scan ports come
from ``bind(0)``, in the kernel's ephemeral range, which pools never overlap.
"""

from __future__ import annotations

from berth.api import PortBlock, PortEnv, RoleSpec
from berth.engines.rules import (
    BlockSource,
    Preset,
    PresetError,
    RuleSet,
    Version,
    env,
    fixed,
    ruled,
    show_version,
)
from berth.plan import GroupEnv

NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
NIXL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
KV_EVENTS_ENV = "BERTH_KV_EVENTS_PORT"
DP_RPC_ENV = "BERTH_DP_RPC_PORT"
#: Ports of the private ``VLLM_PORT`` window of a single-engine pod.
INTERNAL_WINDOW = 8

V0_9_0: Version = (0, 9, 0)
V0_9_1: Version = (0, 9, 1)
#: NIXL offset by the *global* DP rank.
V0_9_2: Version = (0, 9, 2)
#: One NIXL listener per DP engine.
V0_11_1: Version = (0, 11, 1)
#: The newest release the contract suite ran; newer ones get these rules.
NEWEST_CHECKED: Version = (0, 33, 0)


def nixl(since: Version) -> PortBlock:
    """The NIXL side-channel block of the vLLM release ``since`` (see module doc)."""
    if since >= V0_11_1:
        return ruled("nixl", "perDataParallelRank", env(NIXL_PORT_ENV, "rankBase"))
    # One listener per TP worker; 0.9.2-0.11.0 offset by the global rank.
    if since >= V0_9_2:
        return ruled("nixl", "perRank", env(NIXL_PORT_ENV, "rankBase"))
    return ruled("nixl", "perRank", env(NIXL_PORT_ENV))


def spans_pods(role: RoleSpec) -> bool:
    return role.dp_local < role.data_parallel_size


def tail(role: RoleSpec, since: Version, *kv_env: PortEnv) -> list[PortBlock]:
    """The blocks after NIXL, shared with Dynamo's vLLM workers."""
    if since < V0_9_1:
        if role.dp_local > 1:
            raise PresetError(
                f"vLLM {show_version(since)} binds NIXL at base + tp_rank and KV events at "
                "one port for every DP engine of a pod: set dataParallelSizeLocal to 1 or "
                "use vLLM 0.9.1 or newer"
            )
        blocks = [fixed("kv-events", *[env(e.name) for e in kv_env])]
    else:
        blocks = [ruled("kv-events", "perDataParallelRank", *kv_env)]
    if spans_pods(role):
        blocks.append(fixed("dp-rpc", env(DP_RPC_ENV)))
    if role.data_parallel_size == 1:
        blocks.append(fixed("internal", env("VLLM_PORT"), size=INTERNAL_WINDOW))
    return blocks


def group_env(role: RoleSpec) -> tuple[GroupEnv, ...]:
    """What every pod of a DP group spanning pods passes to vLLM.

    ``--data-parallel-address $(BERTH_DP_ADDRESS) --data-parallel-rpc-port
    $(BERTH_DP_LEADER_RPC_PORT) --data-parallel-start-rank $(BERTH_DP_START_RANK)``
    (vllm/entrypoints/cli/serve.py: followers connect to rank 0's address and port).
    """
    if not spans_pods(role):
        return ()
    return (
        GroupEnv("BERTH_DP_ADDRESS", "leaderAddress"),
        GroupEnv("BERTH_DP_LEADER_RPC_PORT", "leaderBlock", "dp-rpc"),
        GroupEnv("BERTH_DP_START_RANK", "firstRank"),
    )


def warnings(role: RoleSpec) -> tuple[str, ...]:
    if role.data_parallel_size == 1:
        return ()
    return (
        "vLLM with data parallelism picks its internal ports (DP master, coordinator, "
        "torch.distributed) with bind(0) in the ephemeral range: VLLM_PORT would hang "
        "vLLM 0.10.2-0.17.1 and repeats ports in every release, so Berth leaves it unset",
    )


def _blocks(since: Version) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("http", env("BERTH_HTTP_PORT")),
            nixl(since),
            *tail(role, since, env(KV_EVENTS_ENV, "rankBase")),
        ]

    return blocks


PRESET = Preset(
    "vllm",
    tuple(
        RuleSet(since, _blocks(since), (NIXL_HOST_ENV,), {}, group_env, warnings)
        for since in (V0_9_0, V0_9_1, V0_9_2, V0_11_1)
    ),
    "vLLM",
)
