"""Workloads for the real nodes: engine deployments, and what is listening.

    python -m testbed.workloads examples/vllm-disagg.yaml --node real-0

prints the example's InferenceDeployment as it runs on a real node: each
container becomes the engine (testbed/csrc/engine.c), which binds every port
Berth delivers in its env; GPU resources, volumes and secrets go, the blocks
and roles stay as they are.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from testbed.images import ENGINE_IMAGE
from testbed.realnode import REAL_NODE_TOLERATION

Body = dict[str, Any]

# The engine binds the node's IP: listeners of two clusters side by side, each
# with its own node IP, never collide.
BIND_ADDRESS_ENV: Body = {
    "name": "ENGINE_BIND_ADDRESS",
    "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
}


def engine_container(spans: Mapping[str, int] | None = None, name: str = "engine") -> Body:
    """The engine; ``spans`` maps a port env var to its block size, so the
    engine binds the whole block, not just its first port."""
    env = [
        BIND_ADDRESS_ENV,
        *({"name": f"ENGINE_SPAN_{k}", "value": str(v)} for k, v in (spans or {}).items()),
    ]
    return {
        "name": name,
        "image": ENGINE_IMAGE,
        "imagePullPolicy": "Never",
        "env": env,
    }


def pin_to(pod_spec: Body, node: str) -> Body:
    """Only ``node`` (a real node, whose taint the pod tolerates)."""
    pod_spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    pod_spec["tolerations"] = [REAL_NODE_TOLERATION]
    pod_spec["terminationGracePeriodSeconds"] = 5
    return pod_spec


def engine_deployment(
    name: str, node: str, blocks: Sequence[tuple[str, int]], replicas: int = 1
) -> Body:
    """A custom-preset InferenceDeployment: one env var ``<BLOCK>_PORT`` per block."""
    env_of = {block: block.upper().replace("-", "_") + "_PORT" for block, _ in blocks}
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {
            "engine": {"preset": "custom"},
            "roles": [
                {
                    "name": "worker",
                    "replicas": replicas,
                    "ports": [
                        {"name": block, "size": size, "env": [{"name": env_of[block]}]}
                        for block, size in blocks
                    ],
                    "template": {
                        "spec": pin_to(
                            {
                                "containers": [
                                    engine_container(
                                        {env_of[b]: size for b, size in blocks if size > 1}
                                    )
                                ]
                            },
                            node,
                        )
                    },
                }
            ],
        },
    }


def on_real_node(deployment: Mapping[str, Any], node: str) -> Body:
    """``deployment`` with every container replaced by the engine, on ``node``."""
    out: Body = copy.deepcopy(dict(deployment))
    for role in out["spec"]["roles"]:
        spec = role.setdefault("template", {}).setdefault("spec", {})
        spec["containers"] = [engine_container(name=c["name"]) for c in spec["containers"]]
        spec.pop("volumes", None)
        pin_to(spec, node)
    return out


def listening_ports(address: str) -> set[int]:
    """TCP ports in LISTEN on ``address`` (or the wildcard) in this network
    namespace, the host's: hostNetwork pods bind there."""
    packed = "".join(f"{int(octet):02X}" for octet in reversed(address.split(".")))
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        ip, port = local.split(":")
        if state == "0A" and ip in (packed, "00000000"):
            found.add(int(port, 16))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.workloads", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--node", required=True)
    args = parser.parse_args(argv)
    for doc in yaml.safe_load_all(args.manifest.read_text()):
        if doc and doc.get("kind") == "InferenceDeployment":
            print(json.dumps(on_real_node(doc, args.node)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
