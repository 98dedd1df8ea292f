#!/usr/bin/env python3
"""Allocator figures: allocate+release pairs per second, and ledger size per node.

Prints numbers; asserts nothing (timings belong in a report, not in a test
that flakes on a busy CI machine). Run:

    python -m scripts.bench_allocator [--seconds 1.0]   (from the repository root)

Steady state: a pool of 12,768 ports (20000-32767) holds N live owners; each
pair releases a pseudo-randomly chosen owner and allocates a new one, so the
free list fragments as it would under real churn. The victim sequence and
request shapes are drawn before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence

from berth.allocator import Allocator, BlockRequest, PortRange

POOL = [PortRange(20000, 32767)]
OWNERS = (8, 16, 32, 64, 256)

# One block per pod, sizes cycling through the brief's mix.
SINGLE: list[list[BlockRequest]] = [[BlockRequest("block", size)] for size in (1, 2, 8, 16, 64)]

# Pods as engines ask: an HTTP port plus side-channel / KV / rank windows.
PODS: list[list[BlockRequest]] = [
    [BlockRequest("http", 1)],
    [BlockRequest("http", 1), BlockRequest("nixl", 2)],
    [BlockRequest("http", 1), BlockRequest("nixl", 8), BlockRequest("kv", 8)],
    [
        BlockRequest("http", 1),
        BlockRequest("nixl", 16, 8),
        BlockRequest("kv", 16),
        BlockRequest("rpc", 1),
    ],
    [BlockRequest("http", 1), BlockRequest("window", 64)],
]

# Other pods' declared host ports on the node, passed as `avoid` every call.
FOREIGN = [PortRange(p, p) for p in (20003, 20100, 20500, 21000, 22000, 25000, 30000, 32000)]


def churn(
    live: int, shapes: Sequence[Sequence[BlockRequest]], seconds: float, avoid: Sequence[PortRange]
) -> float:
    """Best-of-three allocate+release pairs per second at ``live`` owners."""
    rng = random.Random(live)
    best = 0.0
    for _ in range(3):
        pool = Allocator(POOL)
        owners = [f"owner-{i}" for i in range(live)]
        for i, owner in enumerate(owners):
            pool.allocate(owner, shapes[i % len(shapes)], avoid)
        batch = 20_000
        victims = [rng.randrange(live) for _ in range(batch)]
        picks = [shapes[rng.randrange(len(shapes))] for _ in range(batch)]
        names = [f"pod-{i}" for i in range(batch)]
        done = 0
        elapsed = 0.0
        while elapsed < seconds / 3:
            allocate = pool.allocate
            release = pool.release
            start = time.perf_counter()
            for victim, shape, name in zip(victims, picks, names, strict=True):
                release(owners[victim])
                allocate(name, shape, avoid)
                owners[victim] = name
            elapsed += time.perf_counter() - start
            done += batch
            names = [f"{n}+" for n in names]
        assert len(pool) == live
        best = max(best, done / elapsed)
    return best


def encoded_size(count: int) -> tuple[int, int, int]:
    """Bytes of the ConfigMap ``data`` (JSON) for ``count`` pods with UID keys."""
    pool = Allocator(POOL)
    for i in range(count):
        pool.allocate(str(uuid.UUID(int=i + 1)), PODS[i % 4])
    data = pool.encode()
    body = json.dumps({"data": data}, separators=(",", ":"))
    rebuilt = Allocator.decode(POOL, (), data)
    assert rebuilt == pool
    return len(body.encode()), pool.size - pool.free, max(len(v) for v in data.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per figure")
    args = parser.parse_args()
    print(f"pool {POOL[0]} ({POOL[0].size:,} ports), Python {sys.version.split()[0]}")
    print()
    print("allocate+release pairs/s (best of 3)")
    print(
        f"{'owners':>7}  {'1 block, sizes 1/2/8/16/64':>27}  {'pods of 1-4 blocks':>19}"
        f"  {'pods + 8 avoid ports':>21}"
    )
    for live in OWNERS:
        single = churn(live, SINGLE, args.seconds, ())
        pods = churn(live, PODS, args.seconds, ())
        avoid = churn(live, PODS, args.seconds, FOREIGN)
        print(f"{live:>7}  {single:>27,.0f}  {pods:>19,.0f}  {avoid:>21,.0f}")
    print()
    print("encoded ledger per node (pods of 1-4 blocks, UID keys, JSON data)")
    for count in (100, 500):
        size, held, longest = encoded_size(count)
        print(
            f"{count:>5} owners: {size:>7,} bytes ({size / 1024:.1f} KiB, "
            f"{size / (1 << 20):.2%} of 1 MiB), {held:,} ports held, longest value {longest} chars"
        )


if __name__ == "__main__":
    main()
