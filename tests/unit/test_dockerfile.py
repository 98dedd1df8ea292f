"""The container image's recipe: the Dockerfile lints clean and its lock is sound.

No container engine runs here, so the image is never built in CI; hadolint
(installed by hack/setup.sh through the test extras) checks the Dockerfile,
and the tests below check what the build would install.

Regenerate requirements.lock from the current venv with:
    python tests/unit/test_dockerfile.py --write-lock
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
LOCK_HEADER = """\
# Runtime dependencies of the operator image, pinned (no test or dev tools).
# The Dockerfile installs exactly these wheels (--no-deps --only-binary),
# then the project itself with --no-deps, then runs `pip check`.
# Regenerate from the project's venv: python tests/unit/test_dockerfile.py --write-lock
"""


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """Every distribution the roots pull in, as installed here: name -> version."""
    found: dict[str, str] = {}
    stack = [r.name for r in roots]
    while stack:
        name = canonicalize_name(stack.pop())
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return found


def read_lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"requirements.lock: not a plain pin: {raw!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def write_lock() -> None:
    closure = installed_closure(runtime_requirements())
    lines = [f"{name}=={version}" for name, version in sorted(closure.items())]
    LOCK.write_text(LOCK_HEADER + "\n".join(lines) + "\n")


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is missing: hack/setup.sh installs it with the test extras")
    return found


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs (a silent no-op would pass the test above)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\nCMD python -m berth\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line and not line.startswith((" ", "#"))
    ]
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one pinned ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base[1]), base[1]
    final = text[text.rindex("\nFROM ") :]
    assert "COPY --from=build /opt/berth /opt/berth" in final
    assert "pip install" not in final and "apt-get" not in final, "no tools in the final stage"
    assert re.search(r"^USER 65532:65532$", final, re.M), "non-root numeric user"
    assert re.search(
        r'^ENTRYPOINT \["python", "-m", "berth", "--liveness=http://0\.0\.0\.0:8081/healthz"\]$',
        final,
        re.M,
    )
    assert "--only-binary=:all: --no-deps --requirement requirements.lock" in " ".join(
        text.replace("\\\n", " ").split()
    )
    assert re.search(r"pip (--python \S+ )?check", text), "the build checks the installed set"


def test_dockerignore_sends_only_the_build_inputs() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M))
    sources = {part.rstrip("/") for line in copied for part in line.split()}
    assert sources <= allowed, f"COPY sources ignored by .dockerignore: {sources - allowed}"


def test_lock_pins_every_runtime_dependency_compatibly() -> None:
    pins = read_lock()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock lacks {req.name}"
        assert req.specifier.contains(Version(pins[name])), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {req}"
        )


def test_lock_is_closed_and_consistent() -> None:
    """Every requirement of every pinned package is pinned, at a version it accepts.

    Checked with the metadata of the installed distributions wherever the
    installed version is the pinned one (offline); the image build's
    `pip check` covers the rest.
    """
    pins = read_lock()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if canonicalize_name(dist.version) != canonicalize_name(version):
            continue
        checked += 1
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name}=={version} needs {req}: not in requirements.lock"
            assert req.specifier.contains(Version(pins[dep]), prereleases=True), (
                f"{name}=={version} needs {req}, the lock pins {dep}=={pins[dep]}"
            )
    assert checked >= len(pins) // 2, "most pins should match the venv: regenerate the lock"


def test_lock_holds_no_test_or_dev_tools() -> None:
    pins = set(read_lock())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {
        canonicalize_name(Requirement(text).name)
        for group in project.get("optional-dependencies", {}).values()
        for text in group
    }
    assert pins & extras == set(), f"test/dev tools in the image: {sorted(pins & extras)}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-lock"]:
        write_lock()
        print(f"wrote {LOCK}")
    else:
        sys.exit(f"usage: {sys.argv[0]} --write-lock")
