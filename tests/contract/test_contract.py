"""Berth's presets against the engines' own released code (see matrix.py)."""

from __future__ import annotations

import pytest
from tests.contract import matrix, wheels

CASES = matrix.cases()
RECIPES = matrix.recipes()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, matrix.Outcome]:
    return {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_port_inside_the_pods_blocks(
    case: matrix.Case, outcomes: dict[str, matrix.Outcome]
) -> None:
    outcome = matrix.check(case)
    outcomes[case.id] = outcome
    assert outcome.status != "fail", outcome.detail


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.id for r in RECIPES])
def test_recipe_keeps_every_port_in_its_block(
    recipe: matrix.Recipe, outcomes: dict[str, matrix.Outcome]
) -> None:
    outcome = matrix.check_recipe(recipe)
    outcomes[recipe.id] = outcome
    assert outcome.status == "pass", outcome.detail


@pytest.mark.parametrize("version", list(matrix.DYNAMO_VLLM))
def test_dynamo_runtime_reads_the_presets_env(version: str) -> None:
    """DYN_SYSTEM_PORT and DYN_TCP_RPC_PORT: Rust code, so checked by name only."""
    assert all(matrix.rust_env(version).values())


def test_docs_table_is_current(outcomes: dict[str, matrix.Outcome]) -> None:
    """docs/api.md shows what the cases above found (hack/contract.sh --write-table)."""
    found = dict(outcomes)
    found |= {c.id: matrix.check(c) for c in CASES if c.id not in found}
    found |= {r.id: matrix.check_recipe(r) for r in RECIPES if r.id not in found}
    assert matrix.current_table() == matrix.table(found)


def test_ray_dp_needs_a_port_more_per_replica() -> None:
    """Ray adds the DP rank to the base and vLLM adds it again: replicas x tp*pp is short."""
    recipe = next(r for r in RECIPES if r.request["ray_dp"])
    short = matrix.Recipe(recipe.system, recipe.version, recipe.title, 4 * 2, recipe.request)
    outcome = matrix.check_recipe(short)
    assert outcome.status == "fail" and "outside" in outcome.detail


def test_dynamo_0_7_kv_event_port_is_shared_by_dp_ranks() -> None:
    """Why the preset warns: without --kv-events-config every DP process binds one port."""
    src = wheels.source("ai-dynamo", "0.7.1")
    request = {
        "checks": ["kv_events_alt"],
        "dp": 4,
        "dp_local": 2,
        "first_rank": 2,
        "force": True,
        "vllm_src": str(wheels.source("vllm", matrix.DYNAMO_VLLM["0.7.1"])),
    }
    answer = matrix.run_probe("ai-dynamo", src, request, {"DYN_VLLM_KV_EVENT_PORT": "21000"})
    ports = [port for _, port in answer["kv_events_alt"]["ports"]]
    assert ports == [21000, 21000]


@pytest.mark.parametrize(
    ("version", "returns"), [("0.10.2", False), ("0.17.1", False), ("0.18.0", True)]
)
def test_vllm_port_with_data_parallel_hangs_before_0_18(version: str, returns: bool) -> None:
    """Why the preset never sets VLLM_PORT with DP: get_open_ports_list(5) spins."""
    src = wheels.source("vllm", version)
    request = {"checks": ["scan"], "tp": 1, "dp": 4, "dp_local": 4, "first_rank": 0}
    # The probe returns in about a second; 10 s without an answer is a hang.
    answer = matrix.run_probe("vllm", src, request, {"VLLM_PORT": "24000"}, timeout=10)
    assert (answer is not None) == returns
    if answer is not None:
        ports = [port for _, port in answer["scan"]["ports"]]
        # Even where it returns, get_open_port() repeats a port the DP list also hands out.
        assert ports[0] == ports[1] == 24000 and 24000 in ports[3:]


def test_vllm_0_9_0_refused_with_several_dp_engines_per_pod() -> None:
    outcome = matrix.check(matrix.Case("vllm", "0.9.0", matrix.TOPOLOGIES[1]))
    assert outcome.status == "refused" and "0.9.1" in outcome.detail


@pytest.mark.parametrize(
    ("version", "low", "high"), [("0.5.8", 20100, 21999), ("0.5.22", 22000, 29999)]
)
def test_sglang_nccl_port_default_lands_in_the_pool(version: str, low: int, high: int) -> None:
    """Why the preset pins --nccl-port: unset, SGLang picks one inside 20000-29999."""
    src = wheels.source("sglang", version)
    request = {
        "checks": ["port_args"],
        "args": ["--model-path", "m", "--port", "20000"],
        "dp": 1,
        "dp_local": 1,
        "first_rank": 0,
        "leader": True,
        "dp_attention": False,
    }
    answer = matrix.run_probe("sglang", src, request, {})
    [(what, port)] = answer["port_args"]["ports"]
    assert what == "nccl" and low <= port <= high
