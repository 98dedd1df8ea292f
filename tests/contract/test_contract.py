"""Berth's presets against the engines' own released code (see matrix.py)."""

from __future__ import annotations

import pytest
from tests.contract import matrix, wheels

CASES = matrix.cases()


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


def test_docs_table_is_current(outcomes: dict[str, matrix.Outcome]) -> None:
    """docs/api.md shows what the cases above found (hack/contract.sh --write-table)."""
    missing = [c.id for c in CASES if c.id not in outcomes]
    found = outcomes | {c.id: matrix.check(c) for c in CASES if c.id in missing}
    assert matrix.current_table() == matrix.table(found)


@pytest.mark.parametrize(
    ("version", "returns"), [("0.10.2", False), ("0.17.1", False), ("0.18.0", True)]
)
def test_vllm_port_with_data_parallel_hangs_before_0_18(version: str, returns: bool) -> None:
    """Why the preset never sets VLLM_PORT with DP: get_open_ports_list(5) spins."""
    src = wheels.source("vllm", version)
    request = {"checks": ["scan"], "tp": 1, "dp": 4, "dp_local": 4, "first_rank": 0}
    answer = matrix.run_probe("vllm", src, request, {"VLLM_PORT": "24000"})
    assert (answer is not None) == returns
    if answer is not None:
        ports = [port for _, port in answer["scan"]["ports"]]
        # Even where it returns, get_open_port() repeats a port the DP list also hands out.
        assert ports[0] == ports[1] == 24000 and 24000 in ports[3:]


def test_vllm_0_9_0_refused_with_several_dp_engines_per_pod() -> None:
    outcome = matrix.check(matrix.Case("vllm", "0.9.0", matrix.TOPOLOGIES[1]))
    assert outcome.status == "refused" and "0.9.1" in outcome.detail
