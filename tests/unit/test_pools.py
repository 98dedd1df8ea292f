"""Pool choice: which NodePortPool (or the default) a node draws its ports from."""

from __future__ import annotations

from typing import Any

import pytest

from berth.allocator.ranges import PortRange
from berth.api import NodePortPool
from berth.config import OperatorConfig
from berth.pools import Pool, choose_pool, pool_matches

DEFAULT_POOL = OperatorConfig().default_pool


def pool(
    name: str, priority: int = 0, selector: dict[str, Any] | None = None, **spec: Any
) -> NodePortPool:
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"ranges": [{"start": 21000, "end": 21999}], "priority": priority, **spec},
    }
    if selector is not None:
        body["spec"]["nodeSelector"] = selector
    return NodePortPool.model_validate(body)


GPU = {"nvidia.com/gpu.present": "true", "zone": "a"}
CPU = {"zone": "b"}


def test_default_pool_is_below_nodeport_and_ephemeral_ranges() -> None:
    assert Pool("default", (PortRange(20000, 29999),), ()) == DEFAULT_POOL
    assert DEFAULT_POOL.size == 10000


def test_no_pools_gives_the_default() -> None:
    assert choose_pool([], GPU, DEFAULT_POOL) is DEFAULT_POOL


def test_non_matching_pool_gives_the_default() -> None:
    gpu = pool("gpu", selector={"matchLabels": {"nvidia.com/gpu.present": "true"}})
    assert choose_pool([gpu], CPU, DEFAULT_POOL) is DEFAULT_POOL
    assert choose_pool([gpu], GPU, DEFAULT_POOL).name == "gpu"


def test_empty_or_missing_selector_matches_every_node() -> None:
    assert pool_matches(pool("all"), CPU)
    assert pool_matches(pool("all", selector={}), {})


def test_highest_priority_wins_then_name() -> None:
    pools = [
        pool("b-low", priority=1),
        pool("z-high", priority=5),
        pool("a-high", priority=5),
        pool("neg", priority=-3),
    ]
    assert choose_pool(pools, GPU, DEFAULT_POOL).name == "a-high"
    assert choose_pool(list(reversed(pools)), GPU, DEFAULT_POOL).name == "a-high"


def test_a_more_specific_pool_wins_only_by_priority() -> None:
    generic = pool("generic", priority=10)
    gb200 = pool(
        "gb200",
        priority=20,
        selector={"matchExpressions": [{"key": "product", "operator": "In", "values": ["GB200"]}]},
        ranges=[{"start": 6000, "end": 8999}],
    )
    chosen = choose_pool([generic, gb200], {"product": "GB200"}, DEFAULT_POOL)
    assert chosen.name == "gb200" and chosen.ranges == (PortRange(6000, 8999),)
    assert choose_pool([generic, gb200], {"product": "H100"}, DEFAULT_POOL).name == "generic"


@pytest.mark.parametrize(
    ("expression", "labels", "matches"),
    [
        ({"key": "zone", "operator": "In", "values": ["a", "c"]}, GPU, True),
        ({"key": "zone", "operator": "In", "values": ["c"]}, GPU, False),
        ({"key": "zone", "operator": "NotIn", "values": ["b"]}, GPU, True),
        ({"key": "zone", "operator": "NotIn", "values": ["b"]}, CPU, False),
        ({"key": "rack", "operator": "NotIn", "values": ["r1"]}, GPU, True),
        ({"key": "zone", "operator": "Exists"}, GPU, True),
        ({"key": "rack", "operator": "Exists"}, GPU, False),
        ({"key": "rack", "operator": "DoesNotExist"}, GPU, True),
        ({"key": "zone", "operator": "DoesNotExist"}, GPU, False),
    ],
)
def test_match_expressions(
    expression: dict[str, Any], labels: dict[str, str], matches: bool
) -> None:
    p = pool("p", selector={"matchExpressions": [expression]})
    assert pool_matches(p, labels) is matches


def test_labels_and_expressions_must_all_hold() -> None:
    p = pool(
        "p",
        selector={
            "matchLabels": {"zone": "a"},
            "matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "Exists"}],
        },
    )
    assert pool_matches(p, GPU)
    assert not pool_matches(p, {"zone": "a"})
    assert not pool_matches(p, {"nvidia.com/gpu.present": "true", "zone": "b"})


def test_pool_config_of_a_pool() -> None:
    p = pool(
        "gpu",
        ranges=[{"start": 24000, "end": 24999}, {"start": 20000, "end": 20999}],
        reserved=[{"start": 20100, "end": 20109}, {"start": 24000}, {"start": 20105, "end": 20120}],
    )
    config = Pool.of(p)
    assert config.name == "gpu"
    assert config.ranges == (PortRange(20000, 20999), PortRange(24000, 24999))
    assert config.reserved == (
        PortRange(20100, 20109),
        PortRange(20105, 20120),
        PortRange(24000, 24000),
    )
    assert config.size == 2000 - 21 - 1
