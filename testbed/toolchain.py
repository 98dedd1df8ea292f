"""Where the pinned, cached binaries live: hack/env.sh is the single source of versions."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import ClusterError

ROOT = Path(__file__).resolve().parents[1]


def _env_sh_defaults(path: Path = ROOT / "hack" / "env.sh") -> dict[str, str]:
    """``export NAME=${NAME:-value}`` lines of env.sh, $HOME expanded."""
    out: dict[str, str] = {}
    pattern = re.compile(r"^export\s+(\w+)=\$\{\1:-([^}]*)\}\s*$")
    for line in path.read_text().splitlines():
        m = pattern.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).replace("$HOME", str(Path.home()))
    return out


@dataclass(frozen=True)
class Toolchain:
    """Where the cached binaries of the pinned versions live."""

    cache: Path
    k8s_version: str
    etcd_version: str
    kwok_version: str
    helm_version: str

    @classmethod
    def from_env(cls) -> Toolchain:
        """hack/env.sh's defaults, overridden by the same environment variables."""
        defaults = _env_sh_defaults()

        def get(name: str) -> str:
            value = os.environ.get(name) or defaults.get(name)
            if not value:
                raise ClusterError(f"{name} is neither in the environment nor in hack/env.sh")
            return value

        return cls(
            cache=Path(get("BERTH_CACHE")).expanduser(),
            k8s_version=get("K8S_VERSION"),
            etcd_version=get("ETCD_VERSION"),
            kwok_version=get("KWOK_VERSION"),
            helm_version=get("HELM_VERSION"),
        )

    @property
    def bin(self) -> Path:
        return self.cache / "bin"

    def _k8s(self, name: str) -> Path:
        return self.bin / f"kubernetes-{self.k8s_version}" / name

    @property
    def etcd(self) -> Path:
        return self.bin / f"etcd-{self.etcd_version}" / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self._k8s("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self._k8s("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        return self._k8s("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        return self._k8s("kubectl")

    @property
    def kubelet(self) -> Path:
        return self._k8s("kubelet")

    @property
    def kwok(self) -> Path:
        return self.bin / f"kwok-{self.kwok_version}" / "kwok"

    @property
    def kwok_stages(self) -> list[Path]:
        return sorted((self.bin / f"kwok-{self.kwok_version}" / "stage").glob("*.yaml"))

    @property
    def helm(self) -> Path:
        return self.bin / f"helm-{self.helm_version}" / "helm"

    def versions(self) -> dict[str, str]:
        return {
            "kubernetes": self.k8s_version,
            "etcd": self.etcd_version,
            "kwok": self.kwok_version,
            "helm": self.helm_version,
        }

    def check(self, *, real_nodes: bool = False) -> None:
        binaries = [
            *([self.kubelet] if real_nodes else []),
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.kwok,
        ]
        missing = [str(p) for p in binaries if not os.access(p, os.X_OK)]
        if not self.kwok_stages:
            missing.append(str(self.kwok.parent / "stage/*.yaml"))
        if missing:
            raise ClusterError(
                "missing control-plane binaries (run hack/setup.sh or hack/build-tools.sh): "
                + ", ".join(missing)
            )
