"""Durable allocation state in the API server, written with compare-and-swap."""
