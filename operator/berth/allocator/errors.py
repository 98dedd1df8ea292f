"""Typed allocator failures whose ``str()`` reads well in a Kubernetes Event."""

from __future__ import annotations

from functools import partial

from berth.allocator.ranges import PortRange


class PoolExhausted(Exception):
    """No free run fits a block: the pod waits until ports are released.

    ``largest_free`` and ``free`` describe the ports this request could use:
    the pool's free ports minus the call's ``avoid`` ports and minus the
    blocks already placed for the same request, so the figures explain the
    failure rather than contradict it.
    """

    def __init__(
        self,
        owner: str,
        block: str,
        *,
        requested: int,
        align: int,
        largest_free: int,
        free: int,
        pool_size: int,
    ) -> None:
        self.owner = owner
        self.block = block
        self.requested = requested
        self.align = align
        self.largest_free = largest_free
        self.free = free
        self.pool_size = pool_size
        super().__init__(self._message())

    def _message(self) -> str:
        plural = "port" if self.requested == 1 else "contiguous ports"
        aligned = f" (align {self.align})" if self.align > 1 else ""
        why = f"the largest free run is {self.largest_free:,}"
        if self.largest_free >= self.requested:
            why = f"no free run holds them at a multiple of {self.align}; {why}"
        return (
            f"block '{self.block}' needs {self.requested:,} {plural}{aligned} but {why}"
            f" ({self.free:,} free of {self.pool_size:,} in pool)"
        )

    def __reduce__(self) -> tuple[partial[PoolExhausted], tuple[()]]:
        """Pickle by keywords (the default would replay only the message)."""
        rebuild = partial(
            type(self),
            self.owner,
            self.block,
            requested=self.requested,
            align=self.align,
            largest_free=self.largest_free,
            free=self.free,
            pool_size=self.pool_size,
        )
        return rebuild, ()


class AllocationConflict(Exception):
    """An assignment to adopt overlaps ports another owner already holds.

    Seen only when rebuilding from a corrupt or foreign record: two records
    claiming one port must stop the rebuild, never be silently merged (I1, docs/design.md).
    """

    def __init__(self, owner: str, block: str, ports: PortRange | None, holder: str) -> None:
        self.owner = owner
        self.block = block
        self.ports = ports
        self.holder = holder
        super().__init__(self._message())

    def _message(self) -> str:
        if self.ports is None:
            return f"owner {self.owner} already holds a different assignment"
        if self.holder == self.owner:
            return f"block '{self.block}' of owner {self.owner} at {self.ports} overlaps its own"
        return (
            f"block '{self.block}' of owner {self.owner} at {self.ports}"
            f" overlaps ports held by owner {self.holder}"
        )

    def __reduce__(self) -> tuple[type[AllocationConflict], tuple[str, str, PortRange | None, str]]:
        return type(self), (self.owner, self.block, self.ports, self.holder)
