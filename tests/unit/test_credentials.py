"""Credentials: kopf's readers, shared by kopf and Berth's client."""

from __future__ import annotations

import base64
from pathlib import Path

import kopf
import pytest
import yaml

from berth import credentials


def kubeconfig(tmp_path: Path, user: dict[str, object]) -> Path:
    path = tmp_path / "config"
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [
                    {
                        "name": "k",
                        "cluster": {
                            "server": "https://10.0.0.1:6443",
                            "certificate-authority-data": ca,
                        },
                    }
                ],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


@pytest.fixture(autouse=True)
def no_service_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(credentials, "TOKEN_FILE", tmp_path / "absent-token")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: None)


async def test_a_token_kubeconfig_is_read_without_a_client_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, {"token": "abc"})))

    async def refused(**_: object) -> None:
        raise AssertionError("the client library was asked")

    monkeypatch.setattr(kopf, "login_via_async_client", refused)
    info = await credentials.connection_info()
    assert info.server == "https://10.0.0.1:6443"
    assert credentials.Token(info).headers() == {"Authorization": "Bearer abc"}


async def test_an_exec_plugin_user_goes_to_the_client_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "get-token"}}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, user)))
    asked: list[str] = []

    async def library(**_: object) -> kopf.ConnectionInfo:
        asked.append("yes")
        return kopf.ConnectionInfo(server="https://10.0.0.1:6443", token="from-exec")

    monkeypatch.setattr(kopf, "login_via_async_client", library)
    assert (await credentials.connection_info()).token == "from-exec" and asked


def test_a_service_account_token_is_re_read_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    monkeypatch.setattr(credentials, "TOKEN_FILE", token)
    clock = [1000.0]
    monkeypatch.setattr(credentials.time, "monotonic", lambda: clock[0])
    reader = credentials.Token(kopf.ConnectionInfo(server="https://x", token="first"))
    token.write_text("rotated")  # the kubelet rewrote the projected token
    assert reader.headers() == {"Authorization": "Bearer first"}
    clock[0] += credentials.TOKEN_REREAD_SECONDS + 1
    assert reader.headers() == {"Authorization": "Bearer rotated"}
