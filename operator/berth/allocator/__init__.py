"""Pure port allocator: per-node pools of contiguous blocks, no I/O."""
