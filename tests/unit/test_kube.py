"""REST paths Berth's client builds, and the resource each one is counted under."""

from __future__ import annotations

import pytest

from berth.kube import path, resource_of


@pytest.mark.parametrize(
    ("url", "resource"),
    [
        (path("configmaps", namespace="ml", name="llama-port-map"), "configmaps"),
        (path("pods") + "?labelSelector=app", "pods"),
        (path("nodes"), "nodes"),
        (path("namespaces", name="ml"), "namespaces"),
        (
            path(
                "inferencedeployments",
                namespace="ml",
                name="llama",
                group="berth.dev",
                version="v1alpha1",
                subresource="status",
            ),
            "inferencedeployments/status",
        ),
        (path("nodeportpools", group="berth.dev", version="v1alpha1"), "nodeportpools"),
    ],
)
def test_resource_of_a_path(url: str, resource: str) -> None:
    assert resource_of(url) == resource


def test_names_are_quoted_into_paths() -> None:
    assert path("pods", namespace="ml", name="a b") == "/api/v1/namespaces/ml/pods/a%20b"
