"""Binaries the tests drive, found where hack/build-tools.sh puts them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_helm() -> str | None:
    """helm on PATH, else the newest one in the build cache."""
    found = shutil.which("helm")
    if found is None:
        cache_dir = Path(os.environ.get("BERTH_CACHE", Path.home() / ".cache" / "berth"))
        candidates = sorted(cache_dir.glob("bin/helm-*/helm"))
        found = str(candidates[-1]) if candidates else None
    return found
