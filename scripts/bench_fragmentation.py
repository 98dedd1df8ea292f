"""How often a pod that fits a node by count still finds no contiguous blocks there.

The scheduler counts ``berth.dev/ports``; Berth's allocator needs each block
contiguous. This simulates one node under churn with the real
:class:`~berth.allocator.Allocator`: pods of mixed shapes (the engine
presets' own plans, plus custom roles with large blocks) arrive faster than
they leave, so the node sits at its advertised figure; a pod is admitted
when its total fits the count the node advertises (as the scheduler does),
then allocated first-fit. A failure is an admitted pod the allocator
refuses: it would wait bound to the node with ``PortsExhausted``.

Each scenario runs with the bare count (pool size) and with what
berth.capacity advertises (stranded free runs subtracted, written at once
only when the node is tight, else at the next sweep), and prints the
failure rate, the mean fill by count, and the node status writes made
outside sweeps per allocation.
Pure CPU, no cluster: ``python -m scripts.bench_fragmentation`` (about a
minute; ``--events`` trades time for precision).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from berth.allocator import Allocator, BlockRequest, PoolExhausted
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeploymentSpec
from berth.capacity import servable_ports, tight
from berth.engines import resolve_role
from berth.pools import Pool

Shape = tuple[BlockRequest, ...]


def preset_shape(preset: str, **role: int) -> Shape:
    """The blocks a pod of this preset and parallelism asks for."""
    body = {
        "engine": {"preset": preset},
        "roles": [
            {
                "name": "w",
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                **role,
            }
        ],
    }
    spec = InferenceDeploymentSpec.model_validate(body)
    plan = resolve_role(spec, spec.roles[0])
    return tuple(BlockRequest(b.name, b.size, b.align) for b in plan.blocks)


def custom_shape(*sizes: int) -> Shape:
    return tuple(BlockRequest(f"b{i}", size) for i, size in enumerate(sizes))


def preset_shapes() -> list[Shape]:
    parallelism = [
        {"tensorParallelSize": 1},
        {"tensorParallelSize": 8},
        {"dataParallelSize": 2},
        {"dataParallelSize": 4},
        {"dataParallelSize": 8},
        {"tensorParallelSize": 2, "dataParallelSize": 4},
    ]
    return [
        preset_shape(preset, **role)
        for preset in ("vllm", "dynamo-vllm", "sglang")
        for role in parallelism
    ]


@dataclass(frozen=True)
class Scenario:
    name: str
    pool: int
    shapes: Sequence[Shape]


def scenarios() -> list[Scenario]:
    presets = preset_shapes()
    large = [
        custom_shape(1, 64),
        custom_shape(1, 8, 128),
        custom_shape(2, 256),
        custom_shape(1, 32, 32),
        custom_shape(512),
    ]
    return [
        Scenario("presets, 128-port pool", 128, presets),
        Scenario("presets, 512-port pool", 512, presets),
        Scenario("presets + blocks of 32-512, 3000-port pool", 3000, presets + large),
        Scenario("blocks of 32-512 only, 3000-port pool", 3000, large),
    ]


@dataclass
class Result:
    admitted: int = 0
    failed: int = 0
    allocated: int = 0
    #: Node status writes made at once (tight node), outside sweeps.
    writes: int = 0
    #: Mean fill by count when a pod was admitted: the node ran full.
    fill_sum: float = 0.0

    def add(self, other: Result) -> None:
        for name in ("admitted", "failed", "allocated", "writes", "fill_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def rate(self) -> float:
        return self.failed / self.admitted if self.admitted else 0.0


#: Policies: the figure the node advertises, and when it is written.
#: "count": the pool's size, written once (no stranded runs subtracted);
#: "servable": berth.capacity's figure, written as the operator does (at
#: once when the node is tight, else at the next sweep).
POLICIES = ("count", "servable")


def simulate(scenario: Scenario, policy: str, events: int, sweep: int, seed: int) -> Result:
    """One node; arrivals twice as often as departures, so it runs at its count."""
    rng = random.Random(seed)
    pool = Pool("bench", (PortRange(20000, 20000 + scenario.pool - 1),))
    allocator = Allocator(pool.ranges)
    largest_block = largest_pod = 1
    requested = 0
    live: list[tuple[str, int]] = []
    result = Result()

    def servable() -> int:
        if policy == "count":
            return pool.size
        held = [span for a in allocator.assignments() for span in a.blocks.values()]
        return servable_ports(pool, held, (), largest_block)

    advertised = servable()
    for event in range(events):
        if live and rng.random() < 1 / 3:
            owner, total = live.pop(rng.randrange(len(live)))
            allocator.release(owner)
            requested -= total
        else:
            shape = rng.choice(scenario.shapes)
            total = sum(r.size for r in shape)
            if requested + total > advertised:
                continue  # the scheduler places it elsewhere
            result.admitted += 1
            result.fill_sum += requested / scenario.pool
            owner = f"pod-{event}"
            try:
                allocator.allocate(owner, shape)
            except PoolExhausted:
                result.failed += 1  # would wait bound: fits by count, not by contiguity
                continue
            result.allocated += 1
            live.append((owner, total))
            requested += total
            largest_pod = max(largest_pod, total)
            largest_block = max([largest_block, *(r.size for r in shape)])
        want = servable()
        used = pool.size - allocator.free
        if event % sweep == 0:
            advertised = want
        elif want != advertised and tight(advertised, want, used, largest_pod):
            advertised = want
            result.writes += 1
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000, help="arrivals+departures")
    parser.add_argument("--sweep", type=int, default=120, help="events between sweeps")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.monotonic()
    print(
        f"{'scenario':<44} {'policy':<9} {'admitted':>8} {'failed':>7} {'rate':>7} "
        f"{'fill':>5} writes/allocation"
    )
    for scenario in scenarios():
        for policy in POLICIES:
            total = Result()
            for seed in range(args.seeds):
                total.add(simulate(scenario, policy, args.events, args.sweep, seed))
            fill = total.fill_sum / max(total.admitted, 1)
            writes = total.writes / max(total.allocated, 1)
            print(
                f"{scenario.name:<44} {policy:<9} {total.admitted:>8} {total.failed:>7} "
                f"{total.rate:>7.3%} {fill:>5.2f} {writes:.3f}"
            )
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
