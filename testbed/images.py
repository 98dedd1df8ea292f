"""Container images for the real nodes, built here from Debian packages.

There is no registry: each image is written as an OCI image layout tarball
(one gzip layer, a config, a manifest, and an ``index.json`` whose
``io.containerd.image.name`` annotation names it) and imported into a node's
containerd with ``ctr images import``. Built tarballs are cached under
``$BERTH_CACHE/images``, keyed by a hash of everything that goes into them.

* ``engine``: a static C program (csrc/engine.c) that binds every port its
  env names and fails loudly on EADDRINUSE, plus busybox-static for a shell.
* ``pause``: the pod sandbox process (csrc/pause.c); containerd's config
  names it as its sandbox image.
* ``operator``: Debian's python3.11 unpacked from its packages, the wheels
  pinned in requirements.lock and the project installed into the venv
  /opt/berth, as the Dockerfile (the release path) does. Same user and
  entrypoint; tests/unit/test_images.py keeps the two in step.

Image names have no registry host: the kubelet looks up what a pod names,
and a name with a dotted first component is taken as is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.procs import ClusterError
from testbed.toolchain import ROOT, Toolchain

HERE = Path(__file__).resolve().parent
ENGINE_IMAGE = "berth.local/engine:1"
PAUSE_IMAGE = "berth.local/pause:3.10"
OPERATOR_REPOSITORY = "berth.local/berth"

# The operator image's runtime, as in the Dockerfile.
OPERATOR_VENV = "/opt/berth"
OPERATOR_USER = "65532:65532"
OPERATOR_ENTRYPOINT = ["python", "-m", "berth", "--liveness=http://0.0.0.0:8081/healthz"]
OPERATOR_ENV = {
    "PATH": f"{OPERATOR_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "BERTH_LOG_FORMAT": "json",
    "HOME": "/tmp",
    # uid 65532 has no passwd entry; kopf's getpass.getuser() reads this first.
    "USER": "berth",
}
# Debian packages of the operator's Python; their dependencies come along,
# except the ones only package maintenance scripts need.
OPERATOR_DEBS = ("python3.11-minimal", "libpython3.11-stdlib")
DEB_SKIP = re.compile(
    r"^(perl.*|libperl.*|debconf|cdebconf|dpkg|install-info|tar|libdebian-installer.*|"
    r"libnewt.*|libslang.*|libtextwrap.*|mailcap|mime-support|readline-common|gcc-.*-base)$"
)
# Files of those packages a container never reads.
ROOTFS_DROP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian")


def cache_dir() -> Path:
    path = Toolchain.from_env().cache / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar_dir(rootfs: Path) -> bytes:
    """The rootfs as an uncompressed tar, reproducible: sorted, owned by root,
    no timestamps."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    cmd: list[str] = field(default_factory=list)


def write_oci_tar(name: str, rootfs: Path, config: ImageConfig, out: Path) -> Path:
    """An OCI image layout tarball of ``rootfs`` as one layer, named ``name``."""
    layer_tar = _tar_dir(rootfs)
    layer = gzip.compress(layer_tar, mtime=0)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd or None,
            "Env": [f"{k}={v}" for k, v in config.env.items()],
            "User": config.user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }
    config_blob = json.dumps(image_config, sort_keys=True).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config_blob),
                "size": len(config_blob),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index,
        **{f"blobs/sha256/{_digest(b).split(':')[1]}": b for b in (layer, config_blob, manifest)},
    }
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for arcname, data in files.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return out


def _key(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cached(stem: str, key: str, build: Callable[[Path, Path], None]) -> Path:
    """``$cache/images/<stem>-<key>.tar``, made by ``build(rootfs, out)`` if missing."""
    out = cache_dir() / f"{stem}-{key}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix=f"berth-{stem}-") as tmp:
        build(Path(tmp) / "rootfs", out)
    for stale in out.parent.glob(f"{stem}-*.tar"):  # earlier builds of this image
        if stale != out:
            stale.unlink()
    return out


def _run(argv: Sequence[str], **kw: object) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return str(result.stdout)


def _static_binary(source: Path, out: Path) -> None:
    if shutil.which("gcc") is None:
        raise ClusterError(
            "gcc (with libc6-dev) is needed to build the test images (hack/setup.sh)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(out), str(source)])


BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "cat", "ls", "sleep", "ps", "env", "kill")


def engine_image() -> Path:
    source = HERE / "csrc" / "engine.c"
    if not BUSYBOX.exists():
        raise ClusterError("busybox-static is needed for the engine image (hack/setup.sh)")
    key = _key(source.read_bytes(), BUSYBOX.read_bytes(), ENGINE_IMAGE, *BUSYBOX_APPLETS)

    def build(rootfs: Path, out: Path) -> None:
        _static_binary(source, rootfs / "engine")
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "tmp").mkdir(mode=0o1777)
        write_oci_tar(ENGINE_IMAGE, rootfs, ImageConfig(["/engine"]), out)

    return _cached("engine", key, build)


def pause_image() -> Path:
    source = HERE / "csrc" / "pause.c"
    key = _key(source.read_bytes(), PAUSE_IMAGE)

    def build(rootfs: Path, out: Path) -> None:
        _static_binary(source, rootfs / "pause")
        write_oci_tar(PAUSE_IMAGE, rootfs, ImageConfig(["/pause"]), out)

    return _cached("pause", key, build)


# --------------------------------------------------------------------------
# The operator image


def deb_closure(roots: Iterable[str]) -> list[str]:
    """The roots and what they depend on (recursively), minus DEB_SKIP."""
    out = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *roots,
        ]
    )
    names = {line for line in out.splitlines() if line and line[0] not in " <"}
    return sorted(n for n in names if not DEB_SKIP.match(n))


def deb_versions(packages: Iterable[str]) -> dict[str, str]:
    """The candidate version apt would download, per package."""
    versions = {}
    for pkg in packages:
        policy = _run(["apt-cache", "policy", pkg])
        m = re.search(r"Candidate:\s*(\S+)", policy)
        if not m or m.group(1) == "(none)":
            raise ClusterError(f"apt has no candidate for {pkg} (apt-get update?)")
        versions[pkg] = m.group(1)
    return versions


def _download_debs(versions: Mapping[str, str]) -> list[Path]:
    """The packages' .deb files, from apt (cached under $cache/images/debs)."""
    debs = cache_dir() / "debs"
    debs.mkdir(exist_ok=True)

    def found(pkg: str, version: str) -> Path | None:
        quoted = version.replace(":", "%3a")
        hits = sorted(debs.glob(f"{pkg}_{quoted}_*.deb"))
        return hits[0] if hits else None

    wanted = [f"{p}={v}" for p, v in versions.items() if found(p, v) is None]
    if wanted:
        _run(["apt-get", "download", "-q", *wanted], cwd=debs)
    paths = []
    for pkg, version in versions.items():
        path = found(pkg, version)
        if path is None:
            raise ClusterError(f"apt-get download did not fetch {pkg}={version}")
        paths.append(path)
    return paths


def _project_files() -> list[Path]:
    files = [ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "requirements.lock"]
    files += sorted(
        p for p in (ROOT / "operator").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    return files


def operator_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def operator_image_name() -> str:
    return f"{OPERATOR_REPOSITORY}:{operator_version()}"


def _pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    _run([sys.executable, "-m", "pip", "install", "-q", *args], env=env)


def operator_image() -> Path:
    """The operator image: Debian's python3.11, the locked wheels, the project."""
    versions = deb_versions(deb_closure(OPERATOR_DEBS))
    name = operator_image_name()
    key = _key(
        json.dumps(versions, sort_keys=True),
        name,
        Path(__file__).read_bytes(),
        *(
            f"{p.relative_to(ROOT)}\0" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in _project_files()
        ),
    )

    def build(rootfs: Path, out: Path) -> None:
        rootfs.mkdir(parents=True)
        for deb in _download_debs(versions):
            _run(["dpkg-deb", "--extract", str(deb), str(rootfs)])
        for drop in ROOTFS_DROP:
            shutil.rmtree(rootfs / drop, ignore_errors=True)
        python = "python3.11"
        if not (rootfs / "usr/bin" / python).exists():
            raise ClusterError(f"the Debian packages did not provide /usr/bin/{python}")
        # A venv by hand (nothing runs inside the rootfs): what `python -m venv
        # --without-pip /opt/berth` makes.
        venv = rootfs / OPERATOR_VENV.lstrip("/")
        (venv / "bin").mkdir(parents=True)
        for link in ("python", "python3", python):
            (venv / "bin" / link).symlink_to(f"/usr/bin/{python}")
        version = versions["python3.11-minimal"].split("-")[0]
        (venv / "pyvenv.cfg").write_text(
            f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {version}\n"
        )
        site = venv / "lib" / python / "site-packages"
        site.mkdir(parents=True)
        # As the Dockerfile: the locked wheels without dependency resolution,
        # then the project itself without dependencies.
        _pip(
            "--only-binary=:all:",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            "--requirement",
            str(ROOT / "requirements.lock"),
        )
        _pip("--no-deps", "--no-compile", "--target", str(site), str(ROOT))
        (rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
        write_oci_tar(
            name,
            rootfs,
            ImageConfig(OPERATOR_ENTRYPOINT, env=OPERATOR_ENV, user=OPERATOR_USER),
            out,
        )

    return _cached("operator", key, build)


def node_images() -> list[Path]:
    """What every real node gets at start-up."""
    return [pause_image(), engine_image()]
