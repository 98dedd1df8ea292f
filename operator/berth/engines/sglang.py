"""SGLang: HTTP, disaggregation bootstrap, dist-init, NCCL and KV events.

Read from the released wheels (``sglang/srt/server_args.py`` unless named):

* ``--nccl-port``: the field exists from 0.4.9 (line 71); unset, 0.4.9-0.5.21
  probe ``--port + randint(100, 1000)`` upward (0.4.9 lines 1752-1763, 0.5.8
  5303-5311) and 0.5.22 on pick a random port in 22000-29999, inside the
  default pool (``PortArgs.init_new`` 757-759, ``utils/network.py``
  ``get_free_port_below_ephemeral`` 198-213). Older releases cannot be pinned
  and are refused.
* ``--dist-init-addr host:D`` with DP attention: ``D`` and ``port_base = D + 1``
  onward for tokenizer, detokenizer, RPC, metrics and the scheduler inputs
  (0.4.9 lines 1789-1803: ``port_base + 4 + 1 + dp_rank``, so ``D .. D+5+dp``;
  0.5.22 lines 814-841: six fixed ports ``port_base .. +5``); from 0.5.8 the
  DP-attention handshake also binds ``D + 13``
  (``DP_ATTENTION_HANDSHAKE_PORT_DELTA``, 0.5.8 line 5273;
  ``managers/data_parallel_controller.py`` lines 300-308). The block is
  ``dp + 8`` before 0.5.8 and ``dp + 14`` from 0.5.8.
* KV events: published by the attention-TP rank 0 of each DP rank
  (``managers/scheduler.py`` line 323 at 0.5.8).
"""

from __future__ import annotations

from berth.api import PortBlock, RoleSpec
from berth.engines.rules import BlockSource, Preset, RoleNotes, RuleSet, Version, env, fixed, ruled

OLDEST: Version = (0, 4, 9)
#: First release whose DP-attention handshake binds dist-init + 13.
HANDSHAKE: Version = (0, 5, 8)
#: First release whose replicas of pure DP publish KV events on distinct ports.
KV_EVENTS_PER_REPLICA: Version = (0, 5, 18)


def _blocks(since: Version) -> BlockSource:
    dist_init_plus = 14 if since >= HANDSHAKE else 8

    def blocks(role: RoleSpec) -> list[PortBlock]:
        return [
            fixed("http", env("BERTH_HTTP_PORT")),
            fixed("bootstrap", env("BERTH_BOOTSTRAP_PORT")),
            ruled(
                "dist-init",
                "perGlobalDataParallelRank",
                env("BERTH_DIST_INIT_PORT"),
                plus=dist_init_plus,
            ),
            fixed("nccl", env("BERTH_NCCL_PORT")),
            ruled("kv-events", "perDataParallelRank", env("BERTH_KV_EVENTS_PORT", "rankBase")),
        ]

    return blocks


def _warnings(since: Version) -> RoleNotes:
    def warnings(role: RoleSpec) -> tuple[str, ...]:
        if role.dp_local == 1:
            return ()
        notes: tuple[str, ...] = (
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
        RuleSet(since, _blocks(since), warnings=_warnings(since))
        for since in (OLDEST, HANDSHAKE, KV_EVENTS_PER_REPLICA)
    ),
    "SGLang",
)
