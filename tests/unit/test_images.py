"""The operator image the test bed builds from Debian packages (testbed.images)
installs what the Dockerfile, the release path, installs: the same pinned
wheels and the project, run the same way. Building it needs apt and pip's
index (about a minute cold; cached under $BERTH_CACHE/images)."""

from __future__ import annotations

import json
import re
import tarfile
from typing import Any

from packaging.utils import canonicalize_name
from testbed import images
from tests.unit.test_dockerfile import DOCKERFILE, read_lock


def dockerfile_final_stage() -> str:
    text = DOCKERFILE.read_text()
    return text[text.rindex("\nFROM ") :]


def test_same_entrypoint_user_and_env_as_the_dockerfile() -> None:
    final = dockerfile_final_stage()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M)
    assert entrypoint and json.loads(entrypoint[1]) == images.OPERATOR_ENTRYPOINT
    assert re.search(rf"^USER {images.OPERATOR_USER}$", final, re.M)
    env_block = re.search(r"^ENV ((?:.*\\\n)*.*)$", final, re.M)
    assert env_block
    env = dict(pair.split("=", 1) for pair in env_block[1].replace("\\\n", " ").split())
    assert env.pop("PATH") == f"{images.OPERATOR_VENV}/bin:$PATH"
    assert images.OPERATOR_ENV["PATH"].startswith(f"{images.OPERATOR_VENV}/bin:")
    assert env == {k: v for k, v in images.OPERATOR_ENV.items() if k != "PATH"}


def _blob(outer: tarfile.TarFile, digest: str) -> Any:
    member = outer.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    assert member is not None
    return member


def test_the_built_image_installs_exactly_the_lock_and_the_project() -> None:
    with tarfile.open(images.operator_image()) as outer:
        index = json.load(_blob_file(outer, "index.json"))
        manifest = json.load(_blob(outer, index["manifests"][0]["digest"]))
        config = json.load(_blob(outer, manifest["config"]["digest"]))
        with tarfile.open(fileobj=_blob(outer, manifest["layers"][0]["digest"]), mode="r:gz") as fs:
            names = fs.getnames()
    site = re.escape(f"{images.OPERATOR_VENV.lstrip('/')}/lib/python3.11/site-packages/")
    installed = {}
    for name in names:
        m = re.fullmatch(site + r"([^/]+)-([^-/]+)\.dist-info", name)
        if m:
            installed[canonicalize_name(m[1])] = m[2]
    assert installed == {**read_lock(), "berth": images.operator_version()}
    assert config["config"]["User"] == images.OPERATOR_USER
    assert config["config"]["Entrypoint"] == images.OPERATOR_ENTRYPOINT
    assert "usr/bin/python3.11" in names
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == (
        images.operator_image_name()
    )


def _blob_file(outer: tarfile.TarFile, name: str) -> Any:
    member = outer.extractfile(name)
    assert member is not None
    return member
