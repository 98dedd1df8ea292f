"""Engine presets: which blocks each engine gets, overrides, size rules, and the
rank-offset semantics that keep every DP rank's ports inside its pod's block."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeployment, InferenceDeploymentSpec, RoleSpec
from berth.engines import PRESETS, PresetError, parse_version, resolve_role
from berth.plan import EnvBinding, PlanBlock, PlanError, PortPlan, RolePlan, first_global_rank


def port_env(role: RolePlan, blocks: dict[str, PortRange], first_rank: int) -> dict[str, str]:
    """What the per-pod ConfigMap of a pod with these blocks carries."""
    return PortPlan(role, first_rank).env(Assignment("pod", blocks))


def spec(
    preset: str = "vllm",
    version: str | None = None,
    ports: list[dict[str, Any]] | None = None,
    **role: Any,
) -> InferenceDeploymentSpec:
    engine: dict[str, Any] = {"preset": preset}
    if version is not None:
        engine["version"] = version
    body: dict[str, Any] = {
        "engine": engine,
        "roles": [
            {
                "name": "worker",
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                **role,
            }
        ],
    }
    if ports is not None:
        body["ports"] = ports
    return InferenceDeploymentSpec.model_validate(body)


def resolve(preset: str = "vllm", version: str | None = None, **kw: Any) -> RolePlan:
    s = spec(preset, version, **kw)
    return resolve_role(s, s.roles[0])


def blocks(role: RolePlan) -> dict[str, PlanBlock]:
    return {b.name: b for b in role.blocks}


def env(role: RolePlan) -> dict[str, tuple[str, str, int]]:
    return {e.name: (b.name, e.value, e.ports_per_rank) for b in role.blocks for e in b.env}


# ------------------------------------------------------------------- vLLM


def test_vllm_current_single_engine() -> None:
    role = resolve(tensorParallelSize=4)
    assert [b.name for b in role.blocks] == ["http", "nixl", "kv-events", "internal"]
    sizes = {b.name: b.size for b in role.blocks}
    assert sizes == {"http": 1, "nixl": 1, "kv-events": 1, "internal": 8}
    assert env(role) == {
        "BERTH_HTTP_PORT": ("http", "start", 0),
        "VLLM_NIXL_SIDE_CHANNEL_PORT": ("nixl", "rankBase", 1),
        "BERTH_KV_EVENTS_PORT": ("kv-events", "rankBase", 1),
        "VLLM_PORT": ("internal", "start", 0),
    }
    assert role.bind_address_env == ("VLLM_NIXL_SIDE_CHANNEL_HOST",)
    assert role.static_env == {}
    assert role.preset == "vllm"
    assert role.rules == ">=0.11.1"
    assert role.group_env == () and role.warnings == ()


def test_vllm_data_parallel_in_one_pod_has_no_vllm_port_and_no_dp_rpc() -> None:
    """VLLM_PORT hangs vLLM 0.10.2-0.17.1 with DP; dp-rpc is bound only across pods."""
    role = resolve(version="0.11.1", tensorParallelSize=2, dataParallelSize=4)
    sizes = {b.name: b.size for b in role.blocks}
    assert sizes == {"http": 1, "nixl": 4, "kv-events": 4}
    assert "VLLM_PORT" not in env(role)
    assert role.group_env == ()
    assert any("bind(0)" in w for w in role.warnings)


def test_vllm_data_parallel_across_pods() -> None:
    role = resolve(tensorParallelSize=2, dataParallelSize=8, dataParallelSizeLocal=4, replicas=2)
    sizes = {b.name: b.size for b in role.blocks}
    # One NIXL listener and one KV-events publisher per DP engine in the pod.
    assert sizes == {"http": 1, "nixl": 4, "kv-events": 4, "dp-rpc": 1}
    assert env(role)["BERTH_DP_RPC_PORT"] == ("dp-rpc", "start", 0)
    assert [(g.name, g.source, g.block) for g in role.group_env] == [
        ("BERTH_DP_ADDRESS", "leaderAddress", ""),
        ("BERTH_DP_LEADER_RPC_PORT", "leaderBlock", "dp-rpc"),
        ("BERTH_DP_START_RANK", "firstRank", ""),
    ]


def test_group_env_of_a_follower_comes_from_its_leader() -> None:
    role = resolve(tensorParallelSize=2, dataParallelSize=8, dataParallelSizeLocal=4, replicas=2)
    follower = PortPlan(role, first_rank=4)
    leader = Assignment("pod-0", {"dp-rpc": PortRange(21000, 21000)})
    assert follower.group_env_names() == [
        "BERTH_DP_ADDRESS",
        "BERTH_DP_LEADER_RPC_PORT",
        "BERTH_DP_START_RANK",
    ]
    assert follower.group_env(leader, "10.1.2.3") == {
        "BERTH_DP_ADDRESS": "10.1.2.3",
        "BERTH_DP_LEADER_RPC_PORT": "21000",
        "BERTH_DP_START_RANK": "4",
    }
    with pytest.raises(PlanError, match="no block 'dp-rpc'"):
        follower.group_env(Assignment("pod-0", {}), "10.1.2.3")
    # The group env travels in the pod's plan; plans without it decode as before.
    decoded = PortPlan.decode(follower.encode())
    assert (decoded.role.blocks, decoded.role.group_env) == (role.blocks, role.group_env)
    plain = PortPlan(resolve(), 0)
    assert "groupEnv" not in plain.encode()


@pytest.mark.parametrize(
    ("version", "value", "per_rank"),
    [("0.9.1", "start", 0), ("0.9.2", "rankBase", 4), ("0.11.0", "rankBase", 4)],
)
def test_vllm_before_0_11_1_has_a_nixl_port_per_tp_worker(
    version: str, value: str, per_rank: int
) -> None:
    """0.9.1 offsets NIXL by the *local* DP rank (base = block start), 0.9.2-0.11.0 by the
    global one (rank base)."""
    role = resolve(version=version, tensorParallelSize=4, dataParallelSize=2)
    nixl = blocks(role)["nixl"]
    assert nixl.size == 4 * 2
    assert nixl.env == (EnvBinding("VLLM_NIXL_SIDE_CHANNEL_PORT", value, per_rank),)  # type: ignore[arg-type]


def test_vllm_0_9_0_has_no_dp_offset() -> None:
    role = resolve(version="0.9.0", tensorParallelSize=4)
    assert blocks(role)["nixl"].env == (EnvBinding("VLLM_NIXL_SIDE_CHANNEL_PORT", "start", 0),)
    assert blocks(role)["kv-events"].env == (EnvBinding("BERTH_KV_EVENTS_PORT", "start", 0),)
    with pytest.raises(PresetError, match="dataParallelSizeLocal to 1"):
        resolve(version="0.9.0", dataParallelSize=2)
    spans = resolve(version="0.9.0", dataParallelSize=2, dataParallelSizeLocal=1, replicas=2)
    assert "dp-rpc" in blocks(spans)


@pytest.mark.parametrize(
    ("version", "rules"),
    [
        ("0.11.1", ">=0.11.1"),
        ("v0.11.1", ">=0.11.1"),
        ("0.11.1rc2", ">=0.11.1"),
        ("0.12", ">=0.11.1"),
        ("1.4.0", ">=0.11.1"),  # newer than Berth knows: the newest rules
        ("0.11.0", ">=0.9.2,<0.11.1"),
        ("0.9.2", ">=0.9.2,<0.11.1"),
        ("0.9.1", ">=0.9.1,<0.9.2"),
        ("0.9", ">=0.9.0,<0.9.1"),
    ],
)
def test_vllm_version_selects_rules(version: str, rules: str) -> None:
    assert resolve(version=version).rules == rules


def test_vllm_too_old_is_a_preset_error() -> None:
    with pytest.raises(
        PresetError,
        match=r"supports vLLM 0\.9\.0 and newer \(rule sets from 0\.9\.0, 0\.9\.1, 0\.9\.2, "
        r"0\.11\.1\), not 0\.8\.5",
    ):
        resolve(version="0.8.5")


def test_unparseable_version_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match="not a version"):
        PRESETS["vllm"].rules_for("latest")
    assert parse_version("v0.11.1.post1") == (0, 11, 1)
    assert parse_version("0.12") == (0, 12, 0)


# ----------------------------------------------------------- Dynamo, SGLang


def test_dynamo_vllm() -> None:
    """Dynamo >= 1.1 (vLLM >= 0.19): forward-pass metrics, no DYN_VLLM_KV_EVENT_PORT."""
    role = resolve("dynamo-vllm", tensorParallelSize=2, dataParallelSize=2)
    assert role.rules == ">=0.19.0"
    assert [b.name for b in role.blocks] == ["system", "request", "nixl", "kv-events", "fpm"]
    e = env(role)
    assert e["DYN_SYSTEM_PORT"] == ("system", "start", 0)
    assert e["DYN_TCP_RPC_PORT"] == ("request", "start", 0)
    assert e["BERTH_KV_EVENTS_PORT"] == ("kv-events", "rankBase", 1)
    assert "DYN_VLLM_KV_EVENT_PORT" not in e  # Dynamo 1.1+ reads no such env
    # Forward-pass metrics: base + global DP rank, default 20380 (inside the pool).
    assert e["DYN_FORWARDPASS_METRIC_PORT"] == ("fpm", "rankBase", 1)
    assert "BERTH_HTTP_PORT" not in e  # the Dynamo frontend serves HTTP, not the worker
    assert role.static_env == {"DYN_SYSTEM_ENABLED": "true"}
    assert role.bind_address_env == ("VLLM_NIXL_SIDE_CHANNEL_HOST",)
    assert not any("DYN_VLLM_KV_EVENT_PORT" in w for w in role.warnings)


@pytest.mark.parametrize(
    ("version", "rules"), [("0.11.0", ">=0.11.0,<0.11.1"), ("0.16.0", ">=0.11.1,<0.19.0")]
)
def test_dynamo_vllm_before_1_1(version: str, rules: str) -> None:
    """Dynamo 0.7-1.0: KV events from DYN_VLLM_KV_EVENT_PORT too, no forward-pass metrics."""
    role = resolve("dynamo-vllm", version, tensorParallelSize=2, dataParallelSize=2)
    assert role.rules == rules
    assert [b.name for b in role.blocks] == ["system", "request", "nixl", "kv-events"]
    e = env(role)
    # Both KV-events conventions point into the same block.
    assert e["BERTH_KV_EVENTS_PORT"] == ("kv-events", "rankBase", 1)
    assert e["DYN_VLLM_KV_EVENT_PORT"] == ("kv-events", "start", 0)
    assert any("DYN_VLLM_KV_EVENT_PORT" in w for w in role.warnings)


def test_dynamo_vllm_versions() -> None:
    """Dynamo 0.7 ships vLLM 0.11.0; older Dynamo overwrote the NIXL port and is refused."""
    role = resolve("dynamo-vllm", "0.11.0", tensorParallelSize=8)
    assert blocks(role)["nixl"].size == 8
    with pytest.raises(PresetError, match="vLLM version inside the Dynamo image"):
        resolve("dynamo-vllm", "0.10.1")


@pytest.mark.parametrize(
    ("version", "dist_init", "rules"),
    [
        ("0.4.9", 8 + 6, ">=0.4.9,<0.5.8"),
        ("0.5.8", 14, ">=0.5.8,<0.5.18"),
        ("0.5.23", 8 + 14, ">=0.5.22"),
    ],
)
def test_sglang(version: str, dist_init: int, rules: str) -> None:
    """dist-init: D..D+5+dp (0.4.9), D..D+13 (0.5.8), + the rust-server ranks (0.5.22)."""
    role = resolve("sglang", version, tensorParallelSize=8, dataParallelSize=8)
    assert role.rules == rules
    sizes = {b.name: b.size for b in role.blocks}
    assert sizes == {"http": 1, "bootstrap": 1, "dist-init": dist_init, "nccl": 1, "kv-events": 8}
    e = env(role)
    assert e["BERTH_DIST_INIT_PORT"] == ("dist-init", "start", 0)
    assert e["BERTH_NCCL_PORT"] == ("nccl", "start", 0)
    assert e["BERTH_KV_EVENTS_PORT"] == ("kv-events", "rankBase", 1)
    assert role.bind_address_env == ()
    assert any("--enable-dp-attention" in w for w in role.warnings)


def test_sglang_server_spanning_pods_points_every_pod_at_the_leader() -> None:
    role = resolve(
        "sglang", tensorParallelSize=2, dataParallelSize=4, dataParallelSizeLocal=2, replicas=2
    )
    assert [(g.name, g.source, g.block) for g in role.group_env] == [
        ("BERTH_DIST_INIT_ADDRESS", "leaderAddress", ""),
        ("BERTH_DIST_INIT_LEADER_PORT", "leaderBlock", "dist-init"),
    ]
    assert any("wait_port_available" in w for w in role.warnings)
    assert resolve("sglang", tensorParallelSize=2, dataParallelSize=4).group_env == ()


def test_sglang_before_nccl_port_is_refused() -> None:
    with pytest.raises(PresetError, match=r"supports SGLang 0\.4\.9 and newer"):
        resolve("sglang", "0.4.8")


def test_custom_has_no_blocks_but_takes_explicit_ones() -> None:
    assert resolve("custom").blocks == ()
    role = resolve(
        "custom",
        ports=[
            {"name": "api", "size": 1, "env": [{"name": "API_PORT"}]},
            {
                "name": "agents",
                "sizeRule": {"basis": "perRank", "multiplier": 2},
                "align": 8,
                "env": [{"name": "TRTLLM_NIXL_PORT", "value": "rankBase", "portsPerRank": 2}],
            },
        ],
        tensorParallelSize=4,
    )
    assert role.blocks == (
        PlanBlock("api", 1, 1, (EnvBinding("API_PORT", "start", 0),)),
        PlanBlock("agents", 8, 8, (EnvBinding("TRTLLM_NIXL_PORT", "rankBase", 2),)),
    )


# ---------------------------------------------------------------- overrides


def test_deployment_ports_override_preset_and_role_ports_override_both() -> None:
    s = InferenceDeploymentSpec.model_validate(
        {
            "engine": {"preset": "vllm"},
            "ports": [
                {"name": "internal", "size": 100},
                {"name": "metrics", "size": 1, "env": [{"name": "METRICS_PORT"}]},
            ],
            "roles": [
                {
                    "name": "prefill",
                    "ports": [
                        {"name": "internal", "sizeRule": {"basis": "perRank", "plus": 8}},
                        {"name": "kv-events", "enabled": False},
                        {"name": "http", "align": 10},
                    ],
                    "tensorParallelSize": 4,
                    "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                },
                {
                    "name": "decode",
                    "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                },
            ],
        }
    )
    prefill = blocks(resolve_role(s, s.roles[0]))
    decode = blocks(resolve_role(s, s.roles[1]))
    assert list(prefill) == ["http", "nixl", "internal", "metrics"]
    assert prefill["internal"].size == 4 + 8  # role rule replaced the deployment's size
    assert prefill["http"].align == 10
    assert prefill["http"].env == (EnvBinding("BERTH_HTTP_PORT", "start", 0),)  # env kept
    assert decode["internal"].size == 100
    assert "kv-events" in decode
    assert decode["metrics"].env == (EnvBinding("METRICS_PORT", "start", 0),)


def test_override_env_replaces_the_preset_list() -> None:
    role = resolve(ports=[{"name": "http", "env": [{"name": "PORT"}]}])
    assert blocks(role)["http"].env == (EnvBinding("PORT", "start", 0),)
    assert "BERTH_HTTP_PORT" not in env(role)


def test_role_engine_override() -> None:
    s = InferenceDeploymentSpec.model_validate(
        {
            "engine": {"preset": "vllm"},
            "roles": [
                {
                    "name": "router",
                    "engine": {"preset": "custom"},
                    "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                }
            ],
        }
    )
    assert resolve_role(s, s.roles[0]).blocks == ()


def test_new_block_without_size_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match="neither size nor sizeRule"):
        resolve(ports=[{"name": "extra", "env": [{"name": "X"}]}])


def test_env_bound_twice_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match=r"BERTH_HTTP_PORT .* already set by port block 'http'"):
        resolve(ports=[{"name": "other", "size": 1, "env": [{"name": "BERTH_HTTP_PORT"}]}])
    with pytest.raises(PresetError, match="already set by bindAddressEnv"):
        resolve(
            ports=[{"name": "other", "size": 1, "env": [{"name": "VLLM_NIXL_SIDE_CHANNEL_HOST"}]}]
        )


def test_rank_base_needs_whole_ports_per_rank() -> None:
    with pytest.raises(PresetError, match="not a multiple of dataParallelSizeLocal 4"):
        resolve(
            dataParallelSize=4,
            ports=[{"name": "x", "size": 6, "env": [{"name": "X", "value": "rankBase"}]}],
        )
    with pytest.raises(PresetError, match="do not fit"):
        resolve(
            dataParallelSize=4,
            ports=[
                {
                    "name": "x",
                    "size": 6,
                    "env": [{"name": "X", "value": "rankBase", "portsPerRank": 2}],
                }
            ],
        )


def test_block_larger_than_the_limit_is_a_preset_error() -> None:
    # A preset's block (vLLM 0.9.2's nixl: one port per rank, tp x dp); the
    # schema refuses a declared sizeRule this large before the operator sees it.
    with pytest.raises(PresetError, match="needs 16384 ports"):
        resolve(version="0.9.2", tensorParallelSize=64, dataParallelSize=256)


@pytest.mark.parametrize(
    ("basis", "multiplier", "plus", "expected"),
    [
        ("perDataParallelRank", 1, 0, 4),
        ("perDataParallelRank", 3, 2, 14),
        ("perRank", 1, 0, 8),
        ("perRank", 2, 1, 17),
        ("perGlobalDataParallelRank", 1, 0, 8),
        ("perGlobalDataParallelRank", 2, 5, 21),
    ],
)
def test_size_rules(basis: str, multiplier: int, plus: int, expected: int) -> None:
    role = resolve(
        "custom",
        tensorParallelSize=2,
        dataParallelSize=8,
        dataParallelSizeLocal=4,
        replicas=2,
        ports=[{"name": "x", "sizeRule": {"basis": basis, "multiplier": multiplier, "plus": plus}}],
    )
    assert role.blocks[0].size == expected


# ------------------------------------------------------------ rank offsets


def test_first_global_rank() -> None:
    role = spec(dataParallelSize=8, dataParallelSizeLocal=2, replicas=8).roles[0]
    assert [first_global_rank(role, i) for i in range(8)] == [0, 2, 4, 6, 0, 2, 4, 6]
    whole = spec(dataParallelSize=8, replicas=3).roles[0]
    assert [first_global_rank(whole, i) for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="pod index"):
        first_global_rank(whole, -1)


def test_port_env_worked_example() -> None:
    """The docs/api.md example: decode pod 1 of a DP-8 group, 2 ranks per pod."""
    role = resolve(tensorParallelSize=2, dataParallelSize=8, dataParallelSizeLocal=2, replicas=4)
    assigned = {
        "http": PortRange(20000, 20000),
        "nixl": PortRange(20001, 20002),
        "kv-events": PortRange(20003, 20004),
        "dp-rpc": PortRange(20005, 20005),
    }
    assert [b.name for b in role.blocks] == list(assigned)
    values = port_env(role, assigned, first_rank=2)
    assert values == {
        "BERTH_HTTP_PORT": "20000",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": "19999",  # + rank 2 = 20001, + rank 3 = 20002
        "BERTH_KV_EVENTS_PORT": "20001",  # + rank 2 = 20003, + rank 3 = 20004
        "BERTH_DP_RPC_PORT": "20005",
    }


def test_port_env_errors() -> None:
    role = RolePlan(blocks=(PlanBlock("nixl", 2, 1, (EnvBinding("N", "rankBase", 2),)),))
    with pytest.raises(PlanError, match="no ports assigned for block 'nixl'"):
        port_env(role, {}, 0)
    with pytest.raises(PlanError, match="needs 2 ports"):
        port_env(role, {"nixl": PortRange(100, 100)}, 0)
    with pytest.raises(PlanError, match="is not a port"):
        port_env(role, {"nixl": PortRange(5, 6)}, 3)
    assert port_env(role, {"nixl": PortRange(10, 11)}, 3) == {"N": "4"}


# What each engine does with the value it is given, written from the engines'
# sources (not from Berth's code): the ports every DP engine of the pod binds.


def vllm_nixl_ports(base: int, tp: int, global_ranks: range, per_engine: bool) -> list[int]:
    if per_engine:  # base + data_parallel_index (scheduler-side listener)
        return [base + g for g in global_ranks]
    # base + dp_rank * tp_size, then each TP worker listens on + tp_rank
    return [base + g * tp + t for g in global_ranks for t in range(tp)]


def kv_events_ports(base: int, global_ranks: range) -> list[int]:
    # offset_endpoint_port(endpoint, data_parallel_rank): base + rank
    return [base + g for g in global_ranks]


def dynamo_kv_ports(env_value: int, global_ranks: range) -> list[int]:
    # Dynamo 0.7 runs one process per DP rank and builds tcp://*:{kv_port - dp_rank};
    # vLLM adds the rank back, so every process binds kv_port.
    return [env_value - g + g for g in global_ranks]


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    dp_local = draw(st.sampled_from([1, 2, 4, 8]))
    groups = draw(st.integers(1, 8))
    dp = dp_local * groups
    replicas = groups * draw(st.integers(1, 3))
    pod = draw(st.integers(0, replicas - 1))
    return tp, dp, dp_local, replicas, pod


@settings(max_examples=300, deadline=None)
@given(
    layout=layouts(),
    preset=st.sampled_from(["vllm", "dynamo-vllm", "sglang"]),
    version=st.sampled_from([None, "0.9.1", "0.11.0"]),
    start=st.integers(1024, 60000),
)
def test_every_rank_binds_inside_its_pods_blocks(
    layout: tuple[int, int, int, int, int], preset: str, version: str | None, start: int
) -> None:
    tp, dp, dp_local, replicas, pod = layout
    if preset == "sglang" or (preset == "dynamo-vllm" and version == "0.9.1"):
        version = None
    s = spec(
        preset,
        version,
        tensorParallelSize=tp,
        dataParallelSize=dp,
        dataParallelSizeLocal=dp_local,
        replicas=replicas,
    )
    role_spec: RoleSpec = s.roles[0]
    role = resolve_role(s, role_spec)
    # Lay the blocks out back to back from `start`, as an allocator might.
    assigned: dict[str, PortRange] = {}
    cursor = start
    for block in role.blocks:
        assigned[block.name] = PortRange(cursor, cursor + block.size - 1)
        cursor += block.size
    first = first_global_rank(role_spec, pod)
    ranks = range(first, first + dp_local)
    assert first % dp_local == 0 and first + dp_local <= dp
    values = {k: int(v) for k, v in port_env(role, assigned, first).items()}

    def inside(ports: list[int], block: str) -> None:
        span = assigned[block]
        assert ports, block
        assert all(p in span for p in ports), (block, span, ports)
        assert len(set(ports)) == len(ports)

    if preset in ("vllm", "dynamo-vllm"):
        per_engine = version is None
        nixl_base = values["VLLM_NIXL_SIDE_CHANNEL_PORT"]
        if version == "0.9.1":  # offset by the local DP rank: base + local * tp + tp_rank
            nixl_base -= first * tp
        inside(vllm_nixl_ports(nixl_base, tp, ranks, per_engine), "nixl")
        if per_engine:
            assert len(vllm_nixl_ports(0, tp, ranks, True)) == assigned["nixl"].size
    inside(kv_events_ports(values["BERTH_KV_EVENTS_PORT"], ranks), "kv-events")
    # Dynamo < 1.1 only; more than one rank per pod: a warning (test_dynamo_vllm_before_1_1)
    if preset == "dynamo-vllm" and dp_local == 1 and "DYN_VLLM_KV_EVENT_PORT" in values:
        inside(dynamo_kv_ports(values["DYN_VLLM_KV_EVENT_PORT"], ranks), "kv-events")
    for name, (block_name, value, _) in env(role).items():
        if value == "start":
            assert values[name] == assigned[block_name].start


def test_a_second_pod_on_the_node_gets_disjoint_ports() -> None:
    """Two pods of one DP group on one node: both rank sets bind, none collide."""
    s = spec(tensorParallelSize=1, dataParallelSize=4, dataParallelSizeLocal=2, replicas=2)
    role = resolve_role(s, s.roles[0])
    nixl = blocks(role)["nixl"]
    pod0 = {"nixl": PortRange(20000, 20001)}
    pod1 = {"nixl": PortRange(20002, 20003)}
    only_nixl = RolePlan(blocks=(nixl,))
    base0 = int(
        port_env(only_nixl, pod0, first_global_rank(s.roles[0], 0))["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    )
    base1 = int(
        port_env(only_nixl, pod1, first_global_rank(s.roles[0], 1))["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    )
    bound0 = vllm_nixl_ports(base0, 1, range(0, 2), True)
    bound1 = vllm_nixl_ports(base1, 1, range(2, 4), True)
    assert bound0 == [20000, 20001] and bound1 == [20002, 20003]
    # Handing out the block start instead (the llm-d-router#2227 bug) would make
    # pod 1's ranks 2 and 3 bind 20004-20005: outside its block.
    assert vllm_nixl_ports(pod1["nixl"].start, 1, range(2, 4), True) == [20004, 20005]


def test_deployment_example_resolves() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "vllm-disagg.yaml"
    d = InferenceDeployment.model_validate(yaml.safe_load(path.read_text()))
    prefill, decode = (resolve_role(d.spec, r) for r in d.spec.roles)
    assert "kv-replay" in blocks(prefill)
    assert "kv-events" not in blocks(decode)
    assert blocks(decode)["nixl"].size == 4


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")),
)
def test_every_example_resolves(name: str) -> None:
    """Every InferenceDeployment example is valid for the version it names."""
    path = Path(__file__).resolve().parents[2] / "examples" / name
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "InferenceDeployment":
            d = InferenceDeployment.model_validate(doc)
            for role in d.spec.roles:
                plan = resolve_role(d.spec, role)
                used = " ".join(
                    " ".join([*(c.args or []), *(c.command or [])])
                    for c in role.template.spec.containers
                )
                pod = PortPlan(plan, 0)
                provided = {*pod.env_names(), *pod.group_env_names()}
                # Every $(BERTH_...) an example passes is one the preset provides.
                for ref in re.findall(r"\$\((BERTH_[A-Z_]+)\)", used):
                    assert ref in provided, (name, role.name, ref)
