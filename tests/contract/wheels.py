"""Released engine wheels, fetched once and cached outside the repository.

``source("vllm", "0.11.1")`` runs ``pip download --no-deps`` of exactly that
release into ``$BERTH_CACHE/engines/wheels`` and extracts its Python files
into ``$BERTH_CACHE/engines/src/<dist>-<version>`` (then drops the wheel);
later calls reuse the sources.
"""

from __future__ import annotations

import fcntl
import json
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


def source(dist: str, version: str, under: tuple[str, ...] = ()) -> Path:
    """The extracted Python sources of ``dist==version`` (fetched on first use).

    ``under`` keeps only the files below those package paths (Ray's wheel holds
    thousands of modules; the suite reads a handful).
    """
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
                    if name.endswith(".py") and (not under or name.startswith(under)):
                        wheel.extract(name, dest)
            done.touch()
            path.unlink()  # vLLM and Ray wheels are huge; only these sources are read
    return dest


#: Small third-party packages the engines' port code needs for real (SGLang's
#: ServerArgs is a msgspec record from 0.5.22); installed once, outside the venv.
PYLIB_REQUIREMENTS = ("msgspec==0.22.0",)


def pylib() -> Path:
    """A directory with :data:`PYLIB_REQUIREMENTS`, for the probe's ``sys.path``."""
    dest = CACHE / "pylib" / "-".join(PYLIB_REQUIREMENTS)
    done = dest / ".complete"
    if done.exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
            subprocess.run(
                [*pip, "--only-binary=:all:", "--target", str(dest), *PYLIB_REQUIREMENTS],
                check=True,
            )
            done.touch()
    return dest


def binary_names(dist: str, version: str, names: tuple[str, ...]) -> dict[str, bool]:
    """Which of ``names`` occur in the compiled libraries of ``dist==version``.

    For env vars read only by compiled code (Dynamo's Rust runtime): their
    presence by name is all the suite can check. Cached as JSON; the wheel is
    dropped.
    """
    dest = CACHE / "names" / f"{dist}-{version}.json"
    if dest.exists():
        known: dict[str, bool] = json.loads(dest.read_text())
        if set(names) <= set(known):
            return {n: known[n] for n in names}
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = _wheel(dist, version)
        found = dict.fromkeys(names, False)
        with zipfile.ZipFile(path) as wheel:
            for member in wheel.namelist():
                if member.endswith(".so") or ".so." in member:
                    data = wheel.read(member)
                    found.update({n: True for n in names if n.encode() in data})
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(found))
        path.unlink()
    return found
