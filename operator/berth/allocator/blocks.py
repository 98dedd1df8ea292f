"""What a pod asks for (BlockRequest) and what it holds (Assignment)."""

from __future__ import annotations

from dataclasses import dataclass

from berth.allocator.ranges import MAX_PORT, PortRange

# Characters that would break the "name=range,name=range" record format.
_FORBIDDEN = frozenset(",= \t\r\n")


def check_block_name(name: str) -> None:
    """Reject names the compact record format could not carry back."""
    if not name or not _FORBIDDEN.isdisjoint(name):
        raise ValueError(f"invalid block name {name!r}: empty, or has ',', '=' or whitespace")


@dataclass(frozen=True, slots=True)
class BlockRequest:
    """One named block of ``size`` contiguous ports; its start is a multiple of ``align``."""

    name: str
    size: int
    align: int = 1

    def __post_init__(self) -> None:
        check_block_name(self.name)
        if not 1 <= self.size <= MAX_PORT:
            raise ValueError(f"block {self.name!r}: size {self.size} is not in 1..{MAX_PORT}")
        if not 1 <= self.align <= MAX_PORT:
            raise ValueError(f"block {self.name!r}: align {self.align} is not in 1..{MAX_PORT}")


@dataclass(frozen=True, slots=True)
class Assignment:
    """The blocks one owner holds, in request order.

    Treat ``blocks`` as read-only: the pool hands out the very object it
    keeps, which is what makes a repeated allocate return it unchanged.
    """

    owner: str
    blocks: dict[str, PortRange]

    def ports(self) -> int:
        """How many ports the owner holds in total."""
        return sum(r.end - r.start + 1 for r in self.blocks.values())

    @property
    def first_port(self) -> int | None:
        """Lowest port held (None for an empty assignment); the listing order."""
        return min((r.start for r in self.blocks.values()), default=None)

    def encode(self) -> str:
        """Compact, human-readable record: ``"http=20000,nixl=20001-20008"``."""
        return ",".join(f"{name}={r}" for name, r in self.blocks.items())

    @classmethod
    def decode(cls, owner: str, text: str) -> Assignment:
        """Inverse of :meth:`encode`; raises ValueError on anything else."""
        blocks: dict[str, PortRange] = {}
        if not text:
            return cls(owner, blocks)
        for item in text.split(","):
            name, sep, ports = item.partition("=")
            if not sep:
                raise ValueError(f"owner {owner}: record item {item!r} is not name=ports")
            check_block_name(name)
            if name in blocks:
                raise ValueError(f"owner {owner}: block {name!r} appears twice")
            blocks[name] = PortRange.parse(ports)
        return cls(owner, blocks)
