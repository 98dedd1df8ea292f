"""Ray Serve LLM's own NIXL port offset, then vLLM's own listeners (see probe.py).

Real: Ray's ``ray/llm/_internal/serve/engines/vllm/kv_transfer/nixl.py`` and
``base.py`` (``NixlConnectorBackend.setup``, ``_compute_port_offset``), and the
vLLM modules of the vLLM probe (``vllm.envs``, the NIXL scheduler and
listener). Stubbed: the rest of Ray (``serve.get_replica_context`` answers the
replica's rank, as Serve would), torch, zmq. Each replica of the recipe runs
``setup()`` in a clean env; the ``VLLM_NIXL_SIDE_CHANNEL_PORT`` it leaves is
what that replica's vLLM reads, and the vLLM probe reports what vLLM binds.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

from tests.contract import stubs

Found = list[tuple[str, int | None]]
NIXL = "ray.llm._internal.serve.engines.vllm.kv_transfer.nixl"
BASE = "ray.llm._internal.serve.engines.vllm.kv_transfer.base"


def _vllm() -> Any:
    """tests/contract/probe.py, which imports this module (so not at the top)."""
    return importlib.import_module("tests.contract.probe")


def install(src: Path, req: dict[str, Any]) -> None:
    probe = _vllm()
    sys.path.insert(1, req["vllm_src"])
    probe.install_vllm(Path(req["vllm_src"]))
    stubs.install("ray", [NIXL, BASE], allow=["vllm"])  # consulted first


def nixl(src: Path, req: dict[str, Any]) -> Found:
    """Every replica of the role: Ray's port, then the ports its vLLM binds."""
    module = __import__(NIXL, fromlist=["NixlConnectorBackend"])
    base = __import__(BASE, fromlist=["serve"])
    found: Found = []
    tp, pp, replicas = req["tp"], req["pp"], req["ray_replicas"]
    for replica in range(replicas):
        os.environ.pop("VLLM_NIXL_SIDE_CHANNEL_PORT", None)
        rank = types.SimpleNamespace(rank=types.SimpleNamespace(rank=replica))
        base.serve = types.SimpleNamespace(get_replica_context=lambda rank=rank: rank)
        engine_kwargs: dict[str, Any] = {"kv_transfer_config": {}}
        if req["ray_dp"]:
            engine_kwargs["data_parallel_rank"] = replica
        llm_config = types.SimpleNamespace(
            experimental_configs={"NIXL_SIDE_CHANNEL_PORT_BASE": int(req["ray_base"])},
            engine_kwargs=engine_kwargs,
            # vllm_models.py: num_devices = tensor_parallel_degree * pipeline_parallel_degree
            get_engine_config=lambda: types.SimpleNamespace(num_devices=tp * pp),
        )
        backend = module.NixlConnectorBackend(llm_config)
        module.NixlConnectorBackend.setup(backend)
        # The replica's vLLM: one engine, DP rank `replica` of `replicas` in the DP case.
        dp_rank, dp = (replica, replicas) if req["ray_dp"] else (0, 1)
        engine = {"tp": tp, "dp": dp, "dp_local": 1, "first_rank": dp_rank}
        for what, port in _vllm().vllm_nixl(Path(req["vllm_src"]), engine):
            found.append((f"replica {replica}: {what}", port))
    return found


CHECKS = {"nixl": nixl}
