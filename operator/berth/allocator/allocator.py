"""One node's port pool: lowest-address first fit over a sorted free list.

State is the pool (configured ranges minus reserved ports), the free set
(pool minus every held port) and who holds what. Both sets are sorted
interval lists searched with ``bisect``, so an allocation costs a short scan
of free runs, not a walk over ports. Nothing here does I/O: the ledger
persists :meth:`Allocator.encode` and rebuilds with :meth:`Allocator.decode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise

from berth.allocator import intervals as iv
from berth.allocator.blocks import Assignment, BlockRequest, check_block_name
from berth.allocator.errors import AllocationConflict, PoolExhausted
from berth.allocator.ranges import MAX_PORT, PortRange


class Allocator:
    """Port ranges minus reserved ports, carved into blocks for owners (pod UIDs)."""

    __slots__ = (
        "_free",
        "_free_e",
        "_free_s",
        "_held",
        "_outside",
        "_pool_e",
        "_pool_s",
        "_ranges",
        "_reserved",
        "_size",
    )

    _ranges: tuple[PortRange, ...]
    _reserved: tuple[PortRange, ...]
    _pool_s: list[int]  # pool = ranges minus reserved
    _pool_e: list[int]
    _free_s: list[int]  # free = pool minus held
    _free_e: list[int]
    _size: int
    _free: int

    def __init__(self, ranges: Sequence[PortRange], reserved: Sequence[PortRange] = ()) -> None:
        self._held: dict[str, Assignment] = {}
        self._outside: set[str] = set()
        self._configure(ranges, reserved)

    # ------------------------------------------------------------------ queries

    @property
    def ranges(self) -> tuple[PortRange, ...]:
        """The configured ranges, merged and sorted."""
        return self._ranges

    @property
    def reserved(self) -> tuple[PortRange, ...]:
        """The reserved ports, merged and sorted."""
        return self._reserved

    @property
    def size(self) -> int:
        """Ports in the pool: the ranges minus reserved ports."""
        return self._size

    @property
    def free(self) -> int:
        """Pool ports nobody holds."""
        return self._free

    def largest_free_run(self) -> int:
        """The largest block that could be allocated now (ignoring alignment)."""
        return iv.largest(self._free_s, self._free_e)

    def free_ranges(self) -> list[PortRange]:
        """The free runs, lowest first (for range maps and audits)."""
        return [PortRange(s, e) for s, e in zip(self._free_s, self._free_e, strict=True)]

    def pool_ranges(self) -> list[PortRange]:
        """The pool's usable runs (ranges minus reserved), lowest first."""
        return [PortRange(s, e) for s, e in zip(self._pool_s, self._pool_e, strict=True)]

    def get(self, owner: str) -> Assignment | None:
        return self._held.get(owner)

    def assignments(self) -> Iterator[Assignment]:
        """Every assignment, ordered by first port (empty ones last, by owner)."""
        return iter(sorted(self._held.values(), key=_order))

    def outside_pool(self) -> list[Assignment]:
        """Held assignments with ports outside the pool or on reserved ports."""
        return sorted((self._held[o] for o in self._outside), key=_order)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, owner: object) -> bool:
        return owner in self._held

    def __eq__(self, other: object) -> bool:
        """Same configuration, same holders, same free ports: a faithful rebuild."""
        if not isinstance(other, Allocator):
            return NotImplemented
        return (
            self._ranges == other._ranges
            and self._reserved == other._reserved
            and self._held == other._held
            and self._free_s == other._free_s
            and self._free_e == other._free_e
            and self._outside == other._outside
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        ranges = ",".join(map(str, self._ranges))
        return f"<Allocator {ranges} owners={len(self._held)} free={self._free}/{self._size}>"

    # ---------------------------------------------------------------- changes

    def allocate(
        self,
        owner: str,
        requests: Sequence[BlockRequest],
        avoid: Sequence[PortRange] = (),
    ) -> Assignment:
        """Carve every requested block for ``owner``, or none of them.

        Each block takes the lowest free start that fits, in request order.
        ``avoid`` ports (other pods' declared host ports) count as taken for
        this call only. An owner that already holds an assignment gets it
        back unchanged, whatever it asks for now: a replayed event must never
        move a running pod's ports (I3, docs/design.md).
        """
        held = self._held.get(owner)
        if held is not None:
            return held
        _check_unique(requests)
        free_s = self._free_s
        free_e = self._free_e
        if avoid:
            # Search a private view without the avoided ports (a copy only if
            # one of them is free); the real free list is carved at the end.
            free_s, free_e = iv.without(free_s, free_e, avoid)
        cut = free_s is not self._free_s
        if not cut and len(requests) > 1:
            # A copy keeps a half-placed request from touching the real list.
            free_s = free_s[:]
            free_e = free_e[:]
        blocks: dict[str, PortRange] = {}
        for request in requests:
            size = request.size
            at = iv.first_fit(free_s, free_e, size, request.align)
            if at < 0:
                raise PoolExhausted(
                    owner,
                    request.name,
                    requested=size,
                    align=request.align,
                    largest_free=iv.largest(free_s, free_e),
                    free=iv.total(free_s, free_e),
                    pool_size=self._size,
                )
            end = at + size - 1
            iv.carve(free_s, free_e, at, end)
            blocks[request.name] = PortRange(at, end)
        if cut:
            for r in blocks.values():
                iv.carve(self._free_s, self._free_e, r.start, r.end)
        else:
            # The search ran on the free list itself or on a plain copy of it.
            self._free_s = free_s
            self._free_e = free_e
        assignment = Assignment(owner, blocks)
        self._held[owner] = assignment
        self._free -= assignment.ports()
        return assignment

    def release(self, owner: str) -> Assignment | None:
        """Give back exactly what ``owner`` held; None if it held nothing."""
        assignment = self._held.pop(owner, None)
        if assignment is None:
            return None
        free_s = self._free_s
        free_e = self._free_e
        if owner in self._outside:
            self._outside.discard(owner)
            for r in assignment.blocks.values():
                for s, e in iv.intersect(self._pool_s, self._pool_e, r.start, r.end):
                    iv.insert(free_s, free_e, s, e)
                    self._free += e - s + 1
        else:
            for r in assignment.blocks.values():
                iv.insert(free_s, free_e, r.start, r.end)
                self._free += r.end - r.start + 1
        return assignment

    def adopt(self, assignment: Assignment) -> None:
        """Hold an existing assignment verbatim (rebuild from a ledger or annotation).

        Ports outside the pool are accepted and reported by
        :meth:`outside_pool`; ports another owner holds raise
        AllocationConflict and leave the pool unchanged. Adopting an
        identical assignment again is a no-op.
        """
        owner = assignment.owner
        held = self._held.get(owner)
        if held is not None:
            if held == assignment:
                return
            raise AllocationConflict(owner, "", None, owner)
        for name in assignment.blocks:
            check_block_name(name)
        blocks = sorted(assignment.blocks.items(), key=lambda item: item[1])
        for (_, a), (name, b) in pairwise(blocks):
            if b.start <= a.end:
                raise AllocationConflict(owner, name, b, owner)
        outside = False
        for name, r in blocks:
            parts = iv.intersect(self._pool_s, self._pool_e, r.start, r.end)
            inside = sum(e - s + 1 for s, e in parts)
            if inside < r.end - r.start + 1:
                outside = True
            for s, e in parts:
                if not iv.covers(self._free_s, self._free_e, s, e):
                    raise AllocationConflict(owner, name, r, self._holder_of(r))
            if inside < r.end - r.start + 1:
                for other in self._outside:
                    if any(o.overlaps(r) for o in self._held[other].blocks.values()):
                        raise AllocationConflict(owner, name, r, other)
        kept = Assignment(owner, dict(assignment.blocks))
        for _, r in blocks:
            for s, e in iv.intersect(self._pool_s, self._pool_e, r.start, r.end):
                iv.carve(self._free_s, self._free_e, s, e)
                self._free -= e - s + 1
        self._held[owner] = kept
        if outside:
            self._outside.add(owner)

    def reconfigure(
        self, ranges: Sequence[PortRange], reserved: Sequence[PortRange] = ()
    ) -> list[Assignment]:
        """Adopt new ranges and reserved ports without moving anything.

        Returns the assignments now (partly) outside the pool; they stay held
        so nobody else gets those ports until their owners release them.
        """
        self._configure(ranges, reserved)
        return self.outside_pool()

    # ------------------------------------------------------------ persistence

    def encode(self) -> dict[str, str]:
        """Owner -> compact record, for one ConfigMap's ``data`` (lowest first)."""
        return {a.owner: a.encode() for a in self.assignments()}

    @classmethod
    def decode(
        cls,
        ranges: Sequence[PortRange],
        reserved: Sequence[PortRange],
        records: Mapping[str, str],
    ) -> Allocator:
        """Rebuild a pool from :meth:`encode`'s output; equal to the original."""
        pool = cls(ranges, reserved)
        for owner, text in records.items():
            pool.adopt(Assignment.decode(owner, text))
        return pool

    # --------------------------------------------------------------- internals

    def _configure(self, ranges: Sequence[PortRange], reserved: Sequence[PortRange]) -> None:
        range_s, range_e = iv.normalise(ranges)
        res_s, res_e = iv.normalise(reserved)
        self._ranges = tuple(map(PortRange, range_s, range_e))
        self._reserved = tuple(map(PortRange, res_s, res_e))
        self._pool_s, self._pool_e = iv.subtract(range_s, range_e, res_s, res_e)
        self._size = iv.total(self._pool_s, self._pool_e)
        held_s, held_e = iv.normalise(r for a in self._held.values() for r in a.blocks.values())
        self._free_s, self._free_e = iv.subtract(self._pool_s, self._pool_e, held_s, held_e)
        self._free = iv.total(self._free_s, self._free_e)
        self._outside = {
            a.owner
            for a in self._held.values()
            if not all(
                iv.covers(self._pool_s, self._pool_e, r.start, r.end) for r in a.blocks.values()
            )
        }

    def _holder_of(self, ports: PortRange) -> str:
        """Who holds any of ``ports`` (error path only, so a plain scan)."""
        for a in self._held.values():
            if any(r.overlaps(ports) for r in a.blocks.values()):
                return a.owner
        return "?"


def _order(assignment: Assignment) -> tuple[int, str]:
    first = assignment.first_port
    return (MAX_PORT + 1 if first is None else first, assignment.owner)


def _check_unique(requests: Sequence[BlockRequest]) -> None:
    if len(requests) > 1 and len({r.name for r in requests}) != len(requests):
        names = [r.name for r in requests]
        raise ValueError(f"duplicate block names in request: {names}")
