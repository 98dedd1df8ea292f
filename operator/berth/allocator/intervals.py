"""Sorted disjoint interval sets as two parallel int lists (starts, ends).

Plain ints in two lists, not PortRange objects: the allocator's hot path then
runs on C-level list operations and ``bisect``, which is what keeps it fast
in pure Python. Every set here is *normalised*: sorted, inclusive bounds, no
overlaps and no touching neighbours (adjacent runs are merged).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from berth.allocator.ranges import PortRange

Starts = list[int]
Ends = list[int]


def normalise(ranges: Iterable[PortRange]) -> tuple[Starts, Ends]:
    """Merge ranges given in any order, overlapping or touching, into one set."""
    starts: Starts = []
    ends: Ends = []
    for r in sorted(ranges):
        if ends and r.start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], r.end)
        else:
            starts.append(r.start)
            ends.append(r.end)
    return starts, ends


def subtract(a_s: Starts, a_e: Ends, b_s: Starts, b_e: Ends) -> tuple[Starts, Ends]:
    """The ports of set A that are not in set B (both normalised)."""
    out_s: Starts = []
    out_e: Ends = []
    j = 0
    nb = len(b_s)
    for start, e in zip(a_s, a_e, strict=True):
        while j < nb and b_e[j] < start:
            j += 1
        k = j
        s = start  # first port of this run not yet emitted or cut away
        while s <= e:
            if k >= nb or b_s[k] > e:
                out_s.append(s)
                out_e.append(e)
                break
            if b_s[k] > s:
                out_s.append(s)
                out_e.append(b_s[k] - 1)
            s = b_e[k] + 1
            k += 1
    return out_s, out_e


def total(starts: Starts, ends: Ends) -> int:
    """How many ports the set holds."""
    return sum(ends) - sum(starts) + len(starts)


def largest(starts: Starts, ends: Ends) -> int:
    """Length of the longest run in the set (0 when empty)."""
    if not starts:
        return 0
    return max(e - s for s, e in zip(starts, ends, strict=True)) + 1


def covers(starts: Starts, ends: Ends, lo: int, hi: int) -> bool:
    """Whether one run of the set holds every port lo..hi."""
    i = bisect_right(starts, lo) - 1
    return i >= 0 and ends[i] >= hi


def intersect(starts: Starts, ends: Ends, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of lo..hi that lie in the set, lowest first."""
    i = max(bisect_right(starts, lo) - 1, 0)
    parts = []
    n = len(starts)
    while i < n and starts[i] <= hi:
        s = max(starts[i], lo)
        e = min(ends[i], hi)
        if s <= e:
            parts.append((s, e))
        i += 1
    return parts


def first_fit(starts: Starts, ends: Ends, size: int, align: int) -> int:
    """Lowest start of ``size`` free ports starting on a multiple of ``align``; -1 if none."""
    span = size - 1
    if align == 1:
        for s, e in zip(starts, ends, strict=True):
            if e - s >= span:
                return s
    else:
        for s, e in zip(starts, ends, strict=True):
            at = s + (-s) % align
            if at + span <= e:
                return at
    return -1


def carve(starts: Starts, ends: Ends, lo: int, hi: int) -> None:
    """Remove lo..hi, which must lie inside one run of the set."""
    i = bisect_right(starts, lo) - 1
    s = starts[i]
    e = ends[i]
    if s == lo:
        if e == hi:
            del starts[i]
            del ends[i]
        else:
            starts[i] = hi + 1
    elif e == hi:
        ends[i] = lo - 1
    else:
        ends[i] = lo - 1
        starts.insert(i + 1, hi + 1)
        ends.insert(i + 1, e)


def carve_any(starts: Starts, ends: Ends, lo: int, hi: int) -> None:
    """Remove whatever part of lo..hi the set holds (it may hold none of it)."""
    for s, e in intersect(starts, ends, lo, hi):
        carve(starts, ends, s, e)


def without(starts: Starts, ends: Ends, cuts: Iterable[PortRange]) -> tuple[Starts, Ends]:
    """The set minus ``cuts``, as new lists (copied only when a cut touches the set)."""
    out_s = starts
    out_e = ends
    copied = False
    for r in cuts:
        lo = r.start
        hi = r.end
        # Ends grow with starts, so the last run starting at or below hi is
        # the only one that can decide whether the cut touches the set.
        i = bisect_right(out_s, hi) - 1
        if i < 0 or out_e[i] < lo:
            continue
        if not copied:
            out_s = out_s[:]
            out_e = out_e[:]
            copied = True
        if out_s[i] <= lo:
            carve(out_s, out_e, lo, min(hi, out_e[i]))
        else:
            carve_any(out_s, out_e, lo, hi)
    return out_s, out_e


def insert(starts: Starts, ends: Ends, lo: int, hi: int) -> None:
    """Add lo..hi, which must not overlap the set; merges with touching runs."""
    i = bisect_left(starts, lo)
    joins_prev = i > 0 and ends[i - 1] == lo - 1
    joins_next = i < len(starts) and starts[i] == hi + 1
    if joins_prev and joins_next:
        ends[i - 1] = ends[i]
        del starts[i]
        del ends[i]
    elif joins_prev:
        ends[i - 1] = hi
    elif joins_next:
        starts[i] = lo
    else:
        starts.insert(i, lo)
        ends.insert(i, hi)
