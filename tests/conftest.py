"""Shared by every suite: tests under tests/integration/ need a real API server
and get the ``integration`` marker (``pytest -m "not integration"`` skips them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("BERTH_KUBECONFIG"):
        return f"integration cluster: BERTH_KUBECONFIG={os.environ['BERTH_KUBECONFIG']}"
    if os.environ.get("BERTH_CLUSTER_DIR"):
        return f"integration cluster: local control plane kept in {os.environ['BERTH_CLUSTER_DIR']}"
    return "integration cluster: a local control plane started for the session (when needed)"
