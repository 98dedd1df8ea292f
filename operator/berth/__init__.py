"""Berth: per-node port ranges for LLM inference pods."""
