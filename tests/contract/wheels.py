"""Released engine wheels, fetched once and cached outside the repository.

``source("vllm", "0.11.1")`` runs ``pip download --no-deps`` of exactly that
release into ``$BERTH_CACHE/engines/wheels`` and extracts its Python files
into ``$BERTH_CACHE/engines/src/<dist>-<version>`` (then drops the wheel);
later calls reuse the sources.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("BERTH_CACHE", Path.home() / ".cache" / "berth")) / "engines"


def _wheel(dist: str, version: str) -> Path:
    wheels = CACHE / "wheels"
    prefix = f"{dist.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(f"{prefix}*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        subprocess.run(
            [*pip, "--only-binary=:all:", "--dest", str(wheels), f"{dist}=={version}"],
            check=True,
        )
        found = sorted(wheels.glob(f"{prefix}*.whl"))
    if not found:
        raise FileNotFoundError(f"pip downloaded no wheel named {prefix}*.whl")
    return found[0]


def source(dist: str, version: str) -> Path:
    """The extracted Python sources of ``dist==version`` (fetched on first use)."""
    dest = CACHE / "src" / f"{dist}-{version}"
    done = dest / ".complete"
    if done.exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            path = _wheel(dist, version)
            with zipfile.ZipFile(path) as wheel:
                for name in wheel.namelist():
                    if name.endswith(".py"):
                        wheel.extract(name, dest)
            done.touch()
            path.unlink()  # vLLM wheels are ~400 MB; only the sources are read
    return dest
