"""Command-line tools: the per-node range map."""
