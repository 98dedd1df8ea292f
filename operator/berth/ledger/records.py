"""A node's ledger as ConfigMap data: one key per holder, readable by humans.

Layout (``data`` of ConfigMap ``berth-ledger.<node>``)::

    pool:   "default 20000-29999 reserved=22000-22009"
    <uid>:  "<namespace> <pod> <deployment> <role> http=20000,nixl=20001-20008"

Pod UIDs never collide with ``pool``, and every value is a short line, so a
node holding hundreds of pods stays a few tens of KiB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from berth.allocator import AllocationConflict, Allocator, Assignment
from berth.allocator.ranges import PortRange
from berth.pools import Pool

POOL_KEY = "pool"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds an assignment: enough to find the pod and to audit it."""

    namespace: str
    pod: str
    uid: str
    deployment: str = ""
    role: str = ""


def encode_pool(pool: Pool) -> str:
    ranges = ",".join(map(str, pool.ranges))
    reserved = ",".join(map(str, pool.reserved))
    return f"{pool.name} {ranges} reserved={reserved}"


def decode_pool(text: str) -> Pool:
    name, ranges, reserved = text.split(" ")
    return Pool(name, _parse_ranges(ranges), _parse_ranges(reserved.removeprefix("reserved=")))


def _parse_ranges(text: str) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(part) for part in text.split(",") if part)


Held = tuple[Holder, Assignment]


@dataclass
class Repair:
    """What folding the delivered assignments into a ledger changed, and why."""

    #: Delivered to a live pod, missing from the ledger: now recorded.
    adopted: list[Held] = field(default_factory=list)
    #: Ledger entries that disagreed with what their pod was delivered (the old entry).
    replaced: list[Held] = field(default_factory=list)
    #: Entries of pods not yet delivered that overlapped a delivered assignment:
    #: their pods get new ports.
    evicted: list[Held] = field(default_factory=list)
    #: Delivered assignments that overlap another delivered one: (pod, its
    #: blocks, the UID holding the ports). Left out of the ledger; never
    #: handed to anyone else (the caller avoids them).
    conflicts: list[tuple[Holder, Assignment, str]] = field(default_factory=list)
    #: The stored ledger was unusable (garbage, or not Berth's): why.
    damage: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.adopted or self.replaced or self.evicted or self.damage)


@dataclass
class NodeLedger:
    """One node's allocations plus who holds them; the allocator stays pure."""

    node: str
    pool: Pool
    allocator: Allocator
    holders: dict[str, Holder]
    resource_version: str | None = None
    node_uid: str | None = None  # the Node that owns (and garbage-collects) the ledger
    #: Read from the API server (or found missing) and not yet checked against
    #: the ports live pods were delivered.
    unverified: bool = False
    #: Why the stored ledger could not be used, until a repair replaces it.
    damage: str = ""

    @classmethod
    def empty(cls, node: str, pool: Pool) -> NodeLedger:
        return cls(node, pool, Allocator(pool.ranges, pool.reserved), {})

    def encode(self) -> dict[str, str]:
        data = {POOL_KEY: encode_pool(self.pool)}
        for uid, text in self.allocator.encode().items():
            h = self.holders[uid]
            data[uid] = f"{h.namespace} {h.pod} {h.deployment or '-'} {h.role or '-'} {text}"
        return data

    @classmethod
    def decode(
        cls, node: str, data: Mapping[str, str], resource_version: str | None = None
    ) -> NodeLedger:
        pool = decode_pool(data[POOL_KEY])
        holders: dict[str, Holder] = {}
        records: dict[str, str] = {}
        for uid, line in data.items():
            if uid == POOL_KEY:
                continue
            namespace, pod, deployment, role, blocks = line.split(" ", 4)
            holders[uid] = Holder(namespace, pod, uid, deployment.strip("-"), role.strip("-"))
            records[uid] = blocks
        allocator = Allocator.decode(pool.ranges, pool.reserved, records)
        return cls(node, pool, allocator, holders, resource_version)

    @property
    def used(self) -> int:
        """Ports held on the node."""
        return sum(a.ports() for a in self.allocator.assignments())

    def adopt_delivered(self, delivered: Sequence[Held]) -> Repair:
        """Make the ledger agree with the ports live pods were delivered.

        Delivered ports are facts (I3 in docs/design.md): a pod's processes
        listen on them whatever the ledger says, so the ledger yields, never
        the pod. Only when two delivered assignments overlap (a hand edit or a
        bug) can both not be recorded; that is reported, not resolved.
        """
        repair = Repair(damage=self.damage)
        self.damage = ""
        delivered_uids = {holder.uid for holder, _ in delivered}
        for holder, assignment in delivered:
            held = self.allocator.get(holder.uid)
            if held == assignment:
                continue
            if held is not None:
                self.allocator.release(holder.uid)
                repair.replaced.append((self.holders.pop(holder.uid, holder), held))
            while True:
                try:
                    self.allocator.adopt(assignment)
                except AllocationConflict as conflict:
                    other = conflict.holder
                    if other in delivered_uids or other == holder.uid or other not in self:
                        repair.conflicts.append((holder, assignment, other))
                        break
                    evicted = self.allocator.release(other)
                    if evicted is not None:
                        repair.evicted.append((self.holders.pop(other), evicted))
                    continue
                self.holders[holder.uid] = holder
                repair.adopted.append((holder, assignment))
                break
        return repair

    def __contains__(self, uid: object) -> bool:
        return uid in self.holders

    def held(self) -> list[tuple[Holder, Assignment]]:
        return [(self.holders[a.owner], a) for a in self.allocator.assignments()]
