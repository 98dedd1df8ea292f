"""SGLang: HTTP, disaggregation bootstrap, dist-init, NCCL and KV events.

Read from the released wheels (``sglang/srt/server_args.py`` unless named):

* ``--nccl-port``: the field exists from 0.4.9 (line 71); unset, 0.4.9-0.5.21
  probe ``--port + randint(100, 1000)`` upward (0.4.9 lines 1752-1763, 0.5.8
  5303-5311) and 0.5.22 on pick a random port in 22000-29999, inside the
  default pool (``PortArgs.init_new`` 757-759, ``utils/network.py``
  ``get_free_port_below_ephemeral`` 198-213). Older releases cannot be pinned
  and are refused.
* ``--dist-init-addr host:D`` with DP attention (``PortArgs.init_new``, TCP
  branch; only node 0 binds, the other nodes connect): ``D`` (torch's
  TCPStore) and ``port_base = D + 1`` onward for tokenizer, detokenizer, RPC,
  metrics and the DP controller's input.

  - 0.4.9 (lines 1776-1803): the ranks' scheduler inputs at
    ``port_base + 4 + 1 + dp_rank``, so ``D .. D+5+dp``: ``dp + 6`` ports.
  - 0.5.8 (lines 5334-5385): ``D .. D+5``; the ranks' sockets come from
    ``bind_to_random_port`` (``managers/data_parallel_controller.py`` 371-388,
    ``utils/common.py`` 1375-1379: pyzmq's 49152-65535, never a block), and
    the DP-attention handshake binds ``D + 13``
    (``DP_ATTENTION_HANDSHAKE_PORT_DELTA``, line 5273; controller 300-308):
    14 ports.
  - 0.5.22 (lines 804-891): also ``load_collector`` at ``port_base + 5``; with
    ``SGLANG_RUST_SERVER`` the ranks' inputs are ``port_base + 6 + dp_rank``
    (836-841), so the block is ``dp + 14`` (handshake: controller 458-492).
    0.5.23 the same (lines 818-905). DP attention is ``--attn-dp-size`` from
    0.5.22 (``arg_groups/fields/parallel.py`` line 81); ``--enable-dp-attention``
    is translated only by the resolution pipeline.
* KV events: the scheduler's publisher offsets the endpoint port by the
  attention-DP rank (0.4.9 ``managers/scheduler.py`` 652-656; 0.5.8
  ``scheduler_metrics_mixin.py`` 127-131), from 0.5.22 by
  ``select_kv_publisher_dp_rank`` (``disaggregation/kv_events.py`` 44-63: the
  replica rank under pure DP), through ``ZmqEventPublisher.offset_endpoint_port``.
* A server spanning pods: every node's ``PortArgs.init_new`` checks that the
  leader's dist-init ports are free *locally* (``wait_port_available``, 0.5.8
  lines 5360-5371), so a follower fails to start if its node uses one of them.

All of it is run by tests/contract (tests/contract/probe_sglang.py) at 0.4.9,
0.5.8, 0.5.22 and 0.5.23.
"""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines.rules import BlockSource, Preset, RoleNotes, RuleSet, Version, env, fixed, ruled
from berth.plan import GroupEnv

OLDEST: Version = (0, 4, 9)
#: First release whose DP-attention handshake binds dist-init + 13.
HANDSHAKE: Version = (0, 5, 8)
#: First release whose replicas of pure DP publish KV events on distinct ports.
KV_EVENTS_PER_REPLICA: Version = (0, 5, 18)
#: Has the SGLANG_RUST_SERVER path (ranks' inputs at D + 7 + rank); 0.5.8 has
#: not, the releases between were not read and keep the smaller block.
RUST_SERVER: Version = (0, 5, 22)


def _dist_init(since: Version) -> PortBlock:
    """D and the cluster SGLang derives from it (see the module doc)."""
    port = env("BERTH_DIST_INIT_PORT")
    if since >= RUST_SERVER:
        return ruled("dist-init", "perGlobalDataParallelRank", port, plus=14)
    if since >= HANDSHAKE:
        return fixed("dist-init", port, size=14)
    return ruled("dist-init", "perGlobalDataParallelRank", port, plus=6)


def _blocks(since: Version) -> BlockSource:
    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("http", env("BERTH_HTTP_PORT")),
            fixed("bootstrap", env("BERTH_BOOTSTRAP_PORT")),
            _dist_init(since),
            fixed("nccl", env("BERTH_NCCL_PORT")),
            ruled("kv-events", "perDataParallelRank", env("BERTH_KV_EVENTS_PORT", "rankBase")),
        ]

    return blocks


def group_env(role: RoleSpec) -> tuple[GroupEnv, ...]:
    """A server spanning pods: every pod passes the leader's ``--dist-init-addr``.

    ``--dist-init-addr $(BERTH_DIST_INIT_ADDRESS):$(BERTH_DIST_INIT_LEADER_PORT)``;
    only node 0 binds the dist-init cluster, the others connect to it.
    """
    if role.dp_local == role.data_parallel_size:
        return ()
    return (
        GroupEnv("BERTH_DIST_INIT_ADDRESS", "leaderAddress"),
        GroupEnv("BERTH_DIST_INIT_LEADER_PORT", "leaderBlock", "dist-init"),
    )


def _warnings(since: Version) -> RoleNotes:
    def warnings(role: RoleSpec) -> tuple[str, ...]:
        notes: tuple[str, ...] = ()
        if role.dp_local < role.data_parallel_size:
            notes += (
                "SGLang nodes other than node 0 check that the leader's dist-init ports are "
                "free on their own node before starting (PortArgs.init_new "
                "wait_port_available) and fail if another process holds one there",
            )
        if role.dp_local == 1:
            return notes
        notes += (
            "SGLang without --enable-dp-attention runs one replica per DP rank and every "
            "replica binds the same --nccl-port and --dist-init-addr: use DP attention or "
            "one replica per pod",
        )
        if since < KV_EVENTS_PER_REPLICA:
            notes += ("SGLang before 0.5.18: pure-DP replicas publish KV events on one port",)
        return notes

    return warnings


PRESET = Preset(
    "sglang",
    tuple(
        RuleSet(since, _blocks(since), group_env=group_env, warnings=_warnings(since))
        for since in (OLDEST, HANDSHAKE, KV_EVENTS_PER_REPLICA, RUST_SERVER)
    ),
    "SGLang",
)
