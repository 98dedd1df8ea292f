"""Unit tests for the pure port allocator: the behaviour the operator relies on."""

from __future__ import annotations

import json
import pickle
import uuid

import pytest

from berth.allocator import (
    AllocationConflict,
    Allocator,
    Assignment,
    BlockRequest,
    PoolExhausted,
    PortRange,
)

R = PortRange


def req(*specs: tuple[str, int] | tuple[str, int, int]) -> list[BlockRequest]:
    return [BlockRequest(*spec) for spec in specs]


def pool_of(*ranges: str, reserved: tuple[str, ...] = ()) -> Allocator:
    return Allocator([R.parse(r) for r in ranges], [R.parse(r) for r in reserved])


# ------------------------------------------------------------------ requests


def test_block_request_validates() -> None:
    assert BlockRequest("nixl", 8) == BlockRequest("nixl", 8, 1)
    for bad in ("", "a,b", "a=b", "a b"):
        with pytest.raises(ValueError, match="invalid block name"):
            BlockRequest(bad, 1)
    with pytest.raises(ValueError, match="size 0"):
        BlockRequest("x", 0)
    with pytest.raises(ValueError, match="align 0"):
        BlockRequest("x", 1, 0)


def test_duplicate_block_names_are_rejected() -> None:
    pool = pool_of("100-199")
    with pytest.raises(ValueError, match="duplicate block names"):
        pool.allocate("a", req(("http", 1), ("http", 2)))
    assert len(pool) == 0
    assert pool.free == 100


# ------------------------------------------------------------- the pool shape


def test_pool_is_ranges_minus_reserved() -> None:
    pool = pool_of("20000-20009", "20005-20019", "30000", reserved=("20010-20014", "40000"))
    assert pool.ranges == (R(20000, 20019), R(30000, 30000))
    assert pool.reserved == (R(20010, 20014), R(40000, 40000))
    assert pool.pool_ranges() == [R(20000, 20009), R(20015, 20019), R(30000, 30000)]
    assert pool.size == pool.free == 16
    assert pool.largest_free_run() == 10


def test_empty_pool_exhausts_with_a_clear_message() -> None:
    pool = Allocator([])
    assert pool.size == pool.free == pool.largest_free_run() == 0
    with pytest.raises(PoolExhausted) as caught:
        pool.allocate("a", req(("http", 1)))
    assert str(caught.value) == (
        "block 'http' needs 1 port but the largest free run is 0 (0 free of 0 in pool)"
    )


# ------------------------------------------------------------ first fit, order


def test_lowest_address_first_fit_in_request_order() -> None:
    pool = pool_of("20000-29999")
    a = pool.allocate("a", req(("http", 1), ("nixl", 8)))
    assert a == Assignment("a", {"http": R(20000, 20000), "nixl": R(20001, 20008)})
    assert list(a.blocks) == ["http", "nixl"]
    assert a.ports() == 9
    b = pool.allocate("b", req(("http", 1)))
    assert b.blocks == {"http": R(20009, 20009)}
    pool.release("a")
    # The hole left by "a" is reused from its lowest port.
    c = pool.allocate("c", req(("nixl", 4), ("http", 1)))
    assert c.blocks == {"nixl": R(20000, 20003), "http": R(20004, 20004)}
    # A block too big for the remaining hole goes past it; a later small one fills it.
    d = pool.allocate("d", req(("big", 5), ("small", 2)))
    assert d.blocks == {"big": R(20010, 20014), "small": R(20005, 20006)}
    assert d.first_port == 20005


def test_reserved_ports_are_never_handed_out() -> None:
    pool = pool_of("100-109", reserved=("100", "102-104"))
    got = [pool.allocate(str(i), req(("p", 1))).blocks["p"].start for i in range(6)]
    assert got == [101, 105, 106, 107, 108, 109]
    with pytest.raises(PoolExhausted):
        pool.allocate("x", req(("p", 1)))


def test_allocation_is_deterministic() -> None:
    def run() -> dict[str, str]:
        pool = pool_of("20000-20999", reserved=("20010-20019",))
        for i in range(40):
            pool.allocate(f"o{i}", req(("http", 1), ("nixl", 1 + i % 7, 1 + i % 4)))
            if i % 3 == 0:
                pool.release(f"o{i // 2}")
        return pool.encode()

    assert run() == run()


# ------------------------------------------------------------------ alignment


@pytest.mark.parametrize("align", [2, 4, 8, 16, 64])
def test_aligned_blocks_start_on_multiples(align: int) -> None:
    pool = pool_of("20001-20999")
    pool.allocate("pad", req(("http", 1)))  # 20001
    got = pool.allocate("a", req(("nixl", 8, align)))
    start = got.blocks["nixl"].start
    assert start % align == 0
    # It is the lowest such start: the previous multiple is taken or below the pool.
    assert start - align < 20002
    assert pool.largest_free_run() >= 20999 - start - 8


def test_alignment_leaves_the_gap_free() -> None:
    pool = pool_of("20001-20100")
    a = pool.allocate("a", req(("http", 1), ("nixl", 8, 8)))
    assert a.blocks == {"http": R(20001, 20001), "nixl": R(20008, 20015)}
    b = pool.allocate("b", req(("kv", 6)))
    assert b.blocks == {"kv": R(20002, 20007)}


# --------------------------------------------------------------- idempotency


def test_allocate_again_returns_the_same_assignment_whatever_the_request() -> None:
    pool = pool_of("20000-20099")
    first = pool.allocate("a", req(("http", 1), ("nixl", 8)))
    free = pool.free
    again = pool.allocate("a", req(("other", 50)), avoid=[R(20000, 20099)])
    assert again is first
    assert pool.free == free
    assert pool.get("a") is first
    assert "a" in pool and "b" not in pool
    assert len(pool) == 1


def test_release_returns_exactly_what_was_held() -> None:
    pool = pool_of("20000-20099")
    before = pool.free_ranges()
    held = pool.allocate("a", req(("http", 1), ("nixl", 8, 4)))
    assert pool.release("a") == held
    assert pool.free_ranges() == before
    assert pool.release("a") is None
    assert pool.get("a") is None


def test_release_merges_free_runs() -> None:
    pool = pool_of("1-30")
    for owner in "abc":
        pool.allocate(owner, req(("p", 10)))
    pool.release("a")
    pool.release("c")
    assert pool.free_ranges() == [R(1, 10), R(21, 30)]
    pool.release("b")
    assert pool.free_ranges() == [R(1, 30)]
    assert pool.free == pool.size == 30


# ----------------------------------------------------------- all or nothing


def test_exhaustion_is_all_or_nothing_and_names_the_block() -> None:
    pool = pool_of("20000-20099")
    pool.allocate("a", req(("w", 40)))
    pool.allocate("b", req(("w", 20)))
    pool.release("a")  # 20000-20039 and 20060-20099 free
    before = pool.encode(), pool.free_ranges()
    with pytest.raises(PoolExhausted) as caught:
        pool.allocate("c", req(("http", 1), ("nixl", 41)))
    error = caught.value
    assert (error.owner, error.block, error.requested, error.align) == ("c", "nixl", 41, 1)
    # The failing block saw the pool minus the block placed before it.
    assert (error.largest_free, error.free, error.pool_size) == (40, 79, 100)
    assert str(error) == (
        "block 'nixl' needs 41 contiguous ports but the largest free run is 40"
        " (79 free of 100 in pool)"
    )
    assert (pool.encode(), pool.free_ranges()) == before
    assert "c" not in pool


def test_exhaustion_message_reads_as_one_sentence() -> None:
    # 10,000 ports: one big holder, then 30 free runs of 40 split by single held ports.
    pool = pool_of("20000-29999")
    pool.adopt(Assignment("big", {"w": R(20000, 28770)}))
    for k in range(1, 30):
        port = 28771 + 41 * k - 1
        pool.adopt(Assignment(f"sep{k}", {"p": R(port, port)}))
    assert (pool.free, pool.largest_free_run()) == (1200, 40)
    with pytest.raises(PoolExhausted) as caught:
        pool.allocate("pod-uid", req(("http", 1), ("nixl", 64, 8)), avoid=[R(20000, 20000)])
    error = caught.value
    assert str(error) == (
        "block 'nixl' needs 64 contiguous ports (align 8) but the largest free run is 40"
        " (1,199 free of 10,000 in pool)"
    )
    assert (error.owner, error.block, error.requested, error.align) == ("pod-uid", "nixl", 64, 8)
    assert (error.largest_free, error.free, error.pool_size) == (40, 1199, 10_000)
    assert pool.free == 1200


def test_exhaustion_caused_by_alignment_says_so() -> None:
    pool = pool_of("20001-20070")  # 70 free, but no 64 aligned to 8 fits inside
    with pytest.raises(PoolExhausted) as caught:
        pool.allocate("a", req(("nixl", 64, 8)))
    error = caught.value
    assert error.largest_free == 70
    assert str(error) == (
        "block 'nixl' needs 64 contiguous ports (align 8) but no free run holds them at a"
        " multiple of 8; the largest free run is 70 (70 free of 70 in pool)"
    )
    assert "\n" not in str(error)


def test_exhaustion_at_exactly_the_size_but_misaligned_blames_alignment() -> None:
    pool = pool_of("20001-20064")
    with pytest.raises(PoolExhausted, match="no free run holds them at a multiple of 8") as caught:
        pool.allocate("a", req(("nixl", 64, 8)))
    assert caught.value.largest_free == caught.value.requested == 64


def test_exhaustion_error_pickles() -> None:
    error = PoolExhausted("o", "b", requested=3, align=2, largest_free=1, free=5, pool_size=9)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, PoolExhausted)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
    conflict = AllocationConflict("o", "b", R(1, 2), "p")
    assert str(pickle.loads(pickle.dumps(conflict))) == str(conflict)


# -------------------------------------------------------------------- avoid


def test_avoid_ports_are_skipped_for_this_call_only() -> None:
    pool = pool_of("20000-20099")
    a = pool.allocate("a", req(("http", 1), ("nixl", 8)), avoid=[R(20000, 20000), R(20005, 20005)])
    assert a.blocks == {"http": R(20001, 20001), "nixl": R(20006, 20013)}
    assert pool.free_ranges() == [R(20000, 20000), R(20002, 20005), R(20014, 20099)]
    b = pool.allocate("b", req(("http", 1)))
    assert b.blocks == {"http": R(20000, 20000)}


def test_avoid_counts_in_the_exhaustion_figures() -> None:
    pool = pool_of("1-10")
    with pytest.raises(PoolExhausted) as caught:
        pool.allocate("a", req(("w", 5)), avoid=[R(4, 4), R(8, 8)])
    assert (caught.value.largest_free, caught.value.free, caught.value.pool_size) == (3, 8, 10)
    assert pool.free == 10


# ------------------------------------------------------------- pool changes


def test_reconfigure_never_moves_and_reports_outside() -> None:
    pool = pool_of("20000-20099")
    a = pool.allocate("a", req(("http", 1), ("nixl", 8)))  # 20000, 20001-20008
    b = pool.allocate("b", req(("w", 10)))  # 20009-20018
    c = pool.allocate("c", req(("w", 10)))  # 20019-20028
    outside = pool.reconfigure([R(20000, 20015), R(20019, 20099)], [R(20004, 20004)])
    assert outside == [a, b]
    assert pool.outside_pool() == [a, b]
    assert [pool.get(o) for o in "abc"] == [a, b, c]
    # Ports held outside are not part of the pool; nothing else can get them.
    assert pool.size == 96
    assert pool.free == 96 - 8 - 7 - 10
    d = pool.allocate("d", req(("w", 3)))
    assert d.blocks == {"w": R(20029, 20031)}
    # Releasing gives back only what is in the pool now.
    pool.release("b")
    assert pool.free_ranges()[0] == R(20009, 20015)
    assert pool.outside_pool() == [a]
    # Growing back brings the remaining holder inside again.
    assert pool.reconfigure([R(20000, 20099)], []) == []
    assert pool.free == 100 - 9 - 10 - 3


def test_reconfigure_reserving_a_held_port_keeps_it_held() -> None:
    pool = pool_of("100-109")
    a = pool.allocate("a", req(("p", 3)))
    assert pool.reconfigure([R(100, 109)], [R(101, 101)]) == [a]
    assert pool.size == 9
    assert pool.free == 7
    pool.release("a")
    assert pool.free_ranges() == [R(100, 100), R(102, 109)]


# -------------------------------------------------------------------- adopt


def test_adopt_rebuilds_verbatim() -> None:
    pool = pool_of("20000-20099")
    kept = Assignment("a", {"nixl": R(20050, 20057), "http": R(20010, 20010)})
    pool.adopt(kept)
    assert pool.get("a") == kept
    assert pool.free == 91
    pool.adopt(Assignment("a", dict(kept.blocks)))  # identical: no-op
    assert pool.free == 91
    b = pool.allocate("b", req(("w", 20)))
    assert b.blocks == {"w": R(20011, 20030)}


def test_adopt_rejects_overlap_and_leaves_the_pool_unchanged() -> None:
    pool = pool_of("20000-20099")
    pool.allocate("a", req(("w", 10)))
    before = pool.encode(), pool.free_ranges()
    with pytest.raises(AllocationConflict) as caught:
        pool.adopt(Assignment("b", {"x": R(20050, 20050), "y": R(20005, 20012)}))
    assert str(caught.value) == "block 'y' of owner b at 20005-20012 overlaps ports held by owner a"
    assert (caught.value.holder, caught.value.block) == ("a", "y")
    with pytest.raises(AllocationConflict, match="already holds a different assignment"):
        pool.adopt(Assignment("a", {"w": R(20090, 20099)}))
    with pytest.raises(AllocationConflict, match="overlaps its own"):
        pool.adopt(Assignment("c", {"x": R(20050, 20059), "y": R(20055, 20056)}))
    assert (pool.encode(), pool.free_ranges()) == before


def test_adopt_outside_the_pool_is_held_and_reported() -> None:
    pool = pool_of("20000-20099", reserved=("20050",))
    a = Assignment("a", {"http": R(19990, 20001)})
    b = Assignment("b", {"x": R(20050, 20050)})
    pool.adopt(a)
    pool.adopt(b)
    assert pool.outside_pool() == [a, b]
    assert pool.free == 99 - 2
    with pytest.raises(AllocationConflict, match="held by owner a"):
        pool.adopt(Assignment("c", {"x": R(19980, 19990)}))
    with pytest.raises(AllocationConflict, match="held by owner b"):
        pool.adopt(Assignment("c", {"x": R(20050, 20050)}))
    pool.release("a")
    assert pool.free == 99
    assert pool.outside_pool() == [b]


# ------------------------------------------------------------- persistence


def test_records_are_compact_and_human_readable() -> None:
    pool = pool_of("20000-29999")
    pool.allocate("uid-2", req(("http", 1), ("nixl", 8)))
    pool.allocate("uid-1", req(("http", 1)))
    pool.allocate("uid-0", [])
    assert pool.encode() == {
        "uid-2": "http=20000,nixl=20001-20008",
        "uid-1": "http=20009",
        "uid-0": "",
    }
    assert [a.owner for a in pool.assignments()] == ["uid-2", "uid-1", "uid-0"]
    rebuilt = Allocator.decode(pool.ranges, pool.reserved, pool.encode())
    assert rebuilt == pool
    assert list(rebuilt.assignments()) == list(pool.assignments())


def test_assignment_codec() -> None:
    a = Assignment("o", {"http": R(8000, 8000), "nixl": R(20001, 20008)})
    assert a.encode() == "http=8000,nixl=20001-20008"
    assert Assignment.decode("o", a.encode()) == a
    assert Assignment.decode("o", "") == Assignment("o", {})
    for bad in ("http", "http=", "http=x", "http=2-1", "=5", "a=1,a=2", "a=70000"):
        with pytest.raises(ValueError):
            Assignment.decode("o", bad)


def test_decode_refuses_conflicting_records() -> None:
    records = {"a": "w=100-109", "b": "w=105"}
    with pytest.raises(AllocationConflict):
        Allocator.decode([R(100, 199)], [], records)


def test_hundreds_of_allocations_stay_far_below_the_object_limit() -> None:
    pool = pool_of("20000-29999")
    shapes = [
        req(("http", 1)),
        req(("http", 1), ("nixl", 8), ("kv", 8)),
        req(("http", 1), ("nixl", 16, 8), ("kv", 16), ("rpc", 1)),
    ]
    for i in range(500):
        pool.allocate(str(uuid.UUID(int=i)), shapes[i % 3])
    data = pool.encode()
    size = len(json.dumps({"data": data}).encode())
    assert size < 64 * 1024  # the API server's limit is 1 MiB
    assert Allocator.decode(pool.ranges, pool.reserved, data) == pool


def test_equality_and_repr() -> None:
    pool = pool_of("1-10")
    assert pool != "pool"
    assert pool == pool_of("1-10")
    pool.allocate("a", req(("p", 2)))
    assert pool != pool_of("1-10")
    assert repr(pool) == "<Allocator 1-10 owners=1 free=8/10>"
