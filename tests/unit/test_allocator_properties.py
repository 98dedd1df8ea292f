"""Property tests: the allocator against a port-by-port oracle, step by step.

The oracle keeps plain sets of ports and finds each block by scanning ports
upwards, so it is obviously right and obviously slow. The real pool must
agree with it after every allocate, release, adopt, rebuild and reconfigure,
and the invariants of docs/design.md (I1 no overlap, exact release, exact
rebuild, nothing moves) are checked after every step. Pools are small
(ports 1000-1300) so that exhaustion, fragmentation and conflicts are common.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from berth.allocator import (
    AllocationConflict,
    Allocator,
    Assignment,
    BlockRequest,
    PoolExhausted,
    PortRange,
)
from berth.allocator import intervals as iv

LO, HI = 1000, 1300
OWNERS = [f"pod-{c}" for c in "abcdefgh"]
NAMES = ["http", "nixl", "kv", "rpc"]

MODEST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------ oracle


def ports_of(ranges: Iterable[PortRange]) -> set[int]:
    return {p for r in ranges for p in range(r.start, r.end + 1)}


def runs(ports: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ports, lowest first."""
    out: list[tuple[int, int]] = []
    for p in sorted(ports):
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def largest(ports: set[int]) -> int:
    return max((e - s + 1 for s, e in runs(ports)), default=0)


@dataclass
class Oracle:
    """Sets of ports and a linear scan: the allocator's specification."""

    pool: set[int] = field(default_factory=set)
    held: dict[str, dict[str, PortRange]] = field(default_factory=dict)

    def configure(self, ranges: Sequence[PortRange], reserved: Sequence[PortRange]) -> None:
        self.pool = ports_of(ranges) - ports_of(reserved)

    def taken(self) -> set[int]:
        return ports_of(r for blocks in self.held.values() for r in blocks.values())

    def free(self) -> set[int]:
        return self.pool - self.taken()

    def outside(self) -> set[str]:
        return {o for o, blocks in self.held.items() if not ports_of(blocks.values()) <= self.pool}

    def allocate(
        self, requests: Sequence[BlockRequest], avoid: Sequence[PortRange]
    ) -> dict[str, PortRange] | tuple[str, int, int]:
        """The expected blocks, or (failing block, largest free run, free) on exhaustion."""
        available = self.free() - ports_of(avoid)
        blocks: dict[str, PortRange] = {}
        for r in requests:
            start = next(
                (
                    p
                    for p in sorted(available)
                    if p % r.align == 0 and all(q in available for q in range(p, p + r.size))
                ),
                None,
            )
            if start is None:
                return (r.name, largest(available), len(available))
            blocks[r.name] = PortRange(start, start + r.size - 1)
            available -= set(range(start, start + r.size))
        return blocks


# -------------------------------------------------------------- strategies


@st.composite
def port_ranges(draw: st.DrawFn, lo: int = LO, hi: int = HI, longest: int = 120) -> PortRange:
    start = draw(st.integers(lo, hi))
    length = draw(st.integers(1, longest))
    return PortRange(start, min(start + length - 1, hi))


range_lists = st.lists(port_ranges(), min_size=1, max_size=3)
reserved_lists = st.lists(port_ranges(LO - 10, HI + 10, 8), max_size=4)
avoid_lists = st.lists(port_ranges(LO, HI, 8), max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> list[BlockRequest]:
    names = draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True))
    return [
        BlockRequest(
            name,
            draw(st.one_of(st.integers(1, 4), st.integers(1, 40))),
            draw(st.sampled_from([1, 1, 1, 2, 4, 8])),
        )
        for name in names
    ]


@st.composite
def assignments(draw: st.DrawFn, owner: str) -> Assignment:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True))
    return Assignment(owner, {n: draw(port_ranges(LO - 20, HI + 20, 12)) for n in names})


# ----------------------------------------------------------- state machine


class AllocatorMachine(RuleBasedStateMachine):
    """Interleaves every pool operation and checks the pool against the oracle."""

    pool: Allocator
    oracle: Oracle

    @initialize(ranges=range_lists, reserved=reserved_lists)
    def start(self, ranges: list[PortRange], reserved: list[PortRange]) -> None:
        self.pool = Allocator(ranges, reserved)
        self.oracle = Oracle()
        self.oracle.configure(ranges, reserved)

    def free_ports(self) -> set[int]:
        return ports_of(self.pool.free_ranges())

    @rule(owner=st.sampled_from(OWNERS), wanted=requests(), avoid=avoid_lists, data=st.data())
    def allocate(
        self, owner: str, wanted: list[BlockRequest], avoid: list[PortRange], data: st.DataObject
    ) -> None:
        edges = [p for r in self.pool.free_ranges() for p in (r.start, r.end)]
        if edges:
            # Avoided ports on the edges of free runs: where off-by-ones hide.
            at = data.draw(st.lists(st.sampled_from(edges), max_size=2))
            span = data.draw(st.sampled_from([0, 0, 1, 3]))
            avoid = avoid + [PortRange(p, min(p + span, HI + 20)) for p in at]
        held = self.pool.get(owner)
        before = self.pool.encode(), self.pool.free_ranges()
        if held is not None:
            # Idempotent whatever is asked now; nothing changes.
            assert self.pool.allocate(owner, wanted, avoid) is held
            assert (self.pool.encode(), self.pool.free_ranges()) == before
            return
        expected = self.oracle.allocate(wanted, avoid)
        event(f"allocate: {'exhausted' if isinstance(expected, tuple) else 'placed'}")
        if isinstance(expected, tuple):
            with pytest.raises(PoolExhausted) as caught:
                self.pool.allocate(owner, wanted, avoid)
            error = caught.value
            block = next(r for r in wanted if r.name == error.block)
            assert (error.block, error.largest_free, error.free) == expected
            assert (error.owner, error.requested, error.align) == (owner, block.size, block.align)
            assert error.pool_size == self.pool.size
            assert "\n" not in str(error) and f"'{block.name}'" in str(error)
            # A run long enough that still failed can only be the alignment's fault.
            blames_alignment = "multiple of" in str(error)
            assert blames_alignment == (error.largest_free >= block.size)
            # All or nothing: a failed request leaves no trace.
            assert (self.pool.encode(), self.pool.free_ranges()) == before
            return
        got = self.pool.allocate(owner, wanted, avoid)
        assert got.owner == owner
        assert got.blocks == expected
        assert list(got.blocks) == [r.name for r in wanted]
        for r in wanted:
            assert got.blocks[r.name].start % r.align == 0
            assert got.blocks[r.name].size == r.size
        assert not ports_of(got.blocks.values()) & ports_of(avoid)
        self.oracle.held[owner] = dict(got.blocks)

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        free_before = self.free_ports()
        expected = self.oracle.held.pop(owner, None)
        got = self.pool.release(owner)
        if expected is None:
            assert got is None
            assert self.free_ports() == free_before
            return
        assert got is not None and got.blocks == expected
        # Exactly the released ports that lie in the pool become free again.
        assert self.free_ports() == free_before | (ports_of(expected.values()) & self.oracle.pool)

    @rule(owner=st.sampled_from(OWNERS))
    def release_then_adopt_restores(self, owner: str) -> None:
        if owner not in self.oracle.held:
            return
        before = self.pool.encode(), self.pool.free_ranges(), self.pool.outside_pool()
        assignment = self.pool.release(owner)
        assert assignment is not None
        self.pool.adopt(assignment)
        assert (self.pool.encode(), self.pool.free_ranges(), self.pool.outside_pool()) == before

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def adopt(self, data: st.DataObject, owner: str) -> None:
        assignment = data.draw(assignments(owner))
        before = self.pool.encode(), self.pool.free_ranges()
        mine = ports_of(assignment.blocks.values())
        held = self.oracle.held.get(owner)
        others = ports_of(
            r for o, blocks in self.oracle.held.items() if o != owner for r in blocks.values()
        )
        self_overlap = sum(r.size for r in assignment.blocks.values()) != len(mine)
        event(f"adopt: {'conflict' if held or mine & others or self_overlap else 'taken'}")
        if held == assignment.blocks:
            self.pool.adopt(assignment)
        elif held is not None or mine & others or self_overlap:
            with pytest.raises(AllocationConflict):
                self.pool.adopt(assignment)
            assert (self.pool.encode(), self.pool.free_ranges()) == before
        else:
            self.pool.adopt(assignment)
            self.oracle.held[owner] = dict(assignment.blocks)
            assert (owner in {a.owner for a in self.pool.outside_pool()}) == (
                not mine <= self.oracle.pool
            )

    @rule()
    def rebuild(self) -> None:
        records = self.pool.encode()
        # ConfigMap data: string keys to string values, JSON-clean.
        assert json.loads(json.dumps(records)) == records
        rebuilt = Allocator.decode(self.pool.ranges, self.pool.reserved, records)
        assert rebuilt == self.pool
        assert list(rebuilt.assignments()) == list(self.pool.assignments())
        assert rebuilt.outside_pool() == self.pool.outside_pool()
        assert (rebuilt.free, rebuilt.size) == (self.pool.free, self.pool.size)
        self.pool = rebuilt  # carry on with the rebuilt copy

    @rule(ranges=range_lists, reserved=reserved_lists)
    def reconfigure(self, ranges: list[PortRange], reserved: list[PortRange]) -> None:
        before = self.pool.encode()
        outside = self.pool.reconfigure(ranges, reserved)
        self.oracle.configure(ranges, reserved)
        assert self.pool.encode() == before  # nothing moves
        assert [a.owner for a in outside] == [a.owner for a in self.pool.outside_pool()]
        assert {a.owner for a in outside} == self.oracle.outside()
        event(f"reconfigure: {min(len(outside), 2)}+ outside")

    @invariant()
    def agrees_with_the_oracle(self) -> None:
        pool, oracle = self.pool, self.oracle
        seen: set[int] = set()
        for a in pool.assignments():
            for r in a.blocks.values():
                ports = set(range(r.start, r.end + 1))
                assert not ports & seen, f"port held twice: {sorted(ports & seen)}"  # I1
                seen |= ports
        assert {a.owner: a.blocks for a in pool.assignments()} == oracle.held
        outside = {a.owner for a in pool.outside_pool()}
        assert outside == oracle.outside()
        for a in pool.assignments():
            if a.owner not in outside:
                assert ports_of(a.blocks.values()) <= oracle.pool  # in pool, not reserved
        free = self.free_ports()
        assert free == oracle.free()
        assert pool.size == len(oracle.pool)
        assert pool.free == len(free)
        assert pool.free + len(seen & oracle.pool) == pool.size
        assert pool.largest_free_run() == largest(free)
        assert [(r.start, r.end) for r in pool.free_ranges()] == runs(free)  # normalised
        firsts = [min(r.start for r in a.blocks.values()) for a in pool.assignments() if a.blocks]
        assert firsts == sorted(firsts)
        assert len(pool) == len(oracle.held)
        assert all(o in pool for o in oracle.held)


AllocatorMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAllocatorMachine = AllocatorMachine.TestCase


# ------------------------------------------------------------ plain properties


def to_lists(ranges: Iterable[PortRange]) -> tuple[list[int], list[int]]:
    return iv.normalise(ranges)


@MODEST
@given(a=st.lists(port_ranges(), max_size=6), b=st.lists(port_ranges(), max_size=6))
def test_interval_set_arithmetic(a: list[PortRange], b: list[PortRange]) -> None:
    a_s, a_e = to_lists(a)
    b_s, b_e = to_lists(b)
    assert list(zip(a_s, a_e, strict=True)) == runs(ports_of(a))
    out_s, out_e = iv.subtract(a_s, a_e, b_s, b_e)
    assert list(zip(out_s, out_e, strict=True)) == runs(ports_of(a) - ports_of(b))
    view_s, view_e = iv.without(a_s, a_e, b)
    assert (view_s, view_e) == (out_s, out_e)
    assert list(zip(a_s, a_e, strict=True)) == runs(ports_of(a))  # left untouched
    assert iv.total(a_s, a_e) == len(ports_of(a))
    assert iv.largest(a_s, a_e) == largest(ports_of(a))


@MODEST
@given(a=st.lists(port_ranges(), max_size=6), r=port_ranges())
def test_interval_insert_and_carve_are_inverse(a: list[PortRange], r: PortRange) -> None:
    s, e = to_lists(a)
    iv.carve_any(s, e, r.start, r.end)
    assert list(zip(s, e, strict=True)) == runs(ports_of(a) - ports_of([r]))
    iv.insert(s, e, r.start, r.end)
    assert list(zip(s, e, strict=True)) == runs(ports_of(a) | ports_of([r]))


@MODEST
@given(
    owner=st.text(min_size=1, max_size=40),
    blocks=st.dictionaries(
        st.text(st.characters(blacklist_characters=",= \t\r\n"), min_size=1, max_size=12),
        port_ranges(1, 65535, 2000),
        max_size=6,
    ),
)
def test_assignment_record_round_trips(owner: str, blocks: dict[str, PortRange]) -> None:
    assignment = Assignment(owner, blocks)
    text = assignment.encode()
    assert "\n" not in text
    back = Assignment.decode(owner, text)
    assert back == assignment
    assert list(back.blocks) == list(blocks)


@MODEST
@given(
    ranges=range_lists,
    reserved=reserved_lists,
    sequence=st.lists(st.tuples(st.sampled_from(OWNERS), requests()), max_size=12),
)
def test_same_history_gives_same_pool(
    ranges: list[PortRange],
    reserved: list[PortRange],
    sequence: list[tuple[str, list[BlockRequest]]],
) -> None:
    def replay() -> Allocator:
        pool = Allocator(ranges, reserved)
        for owner, wanted in sequence:
            if owner in pool and len(wanted) % 2:
                pool.release(owner)
                continue
            with contextlib.suppress(PoolExhausted):
                pool.allocate(owner, wanted)
        return pool

    assert replay() == replay()
