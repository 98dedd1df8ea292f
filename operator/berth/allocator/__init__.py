"""Pure port allocator: per-node pools of contiguous blocks, no I/O."""

from berth.allocator.allocator import Allocator
from berth.allocator.blocks import Assignment, BlockRequest
from berth.allocator.errors import AllocationConflict, PoolExhausted
from berth.allocator.ranges import PortRange

__all__ = [
    "AllocationConflict",
    "Allocator",
    "Assignment",
    "BlockRequest",
    "PoolExhausted",
    "PortRange",
]
