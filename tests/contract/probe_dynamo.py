"""NVIDIA Dynamo's own Python port code, run in the probe process (see probe.py).

Real, from the ai-dynamo release: ``dynamo/vllm/args.py`` (KV-events config,
NIXL host), ``dynamo/vllm/envs.py`` and, from 1.x,
``dynamo/vllm/instrumented_scheduler.py`` (forward-pass metrics publisher);
0.6.1's ``dynamo/vllm/ports.py`` and ``configure_ports`` for the
``--dynamo-port-min/max`` recipe. vLLM, zmq, torch and Dynamo's Rust runtime
(``dynamo._core``, ``dynamo.runtime``) are stubs: the ports the Rust runtime
reads from env (``DYN_SYSTEM_PORT``, ``DYN_TCP_RPC_PORT``) are checked by name
in its compiled library only (matrix.py, wheels.binary_names).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any

from tests.contract import stubs

Found = list[tuple[str, int | None]]


class _Bound(Exception):
    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.endpoint = endpoint


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].rstrip("/"))


def install(src: Path, req: dict[str, Any]) -> None:
    """Dynamo's vLLM modules real; vLLM's ``kv_events`` real from the vLLM inside."""
    real = ["dynamo.vllm.args", "dynamo.vllm.envs", "dynamo.vllm.ports"]
    if (src / "dynamo/vllm/instrumented_scheduler.py").exists():
        real.append("dynamo.vllm.instrumented_scheduler")
    stubs.install("dynamo", [m for m in real if (src / f"{m.replace('.', '/')}.py").exists()])
    # A decorator factory taking a class: a stub would return the class itself.
    config_dump = __import__("dynamo.common.config_dump", fromlist=["register_encoder"])
    config_dump.register_encoder = lambda cls: lambda function: function
    if req.get("vllm_src"):  # consulted first: vLLM's modules are not Dynamo's stubs
        sys.path.insert(0, req["vllm_src"])
        stubs.install("vllm", ["vllm.distributed.kv_events"], allow=["dynamo"])


def _args(src: Path) -> types.ModuleType:
    return __import__("dynamo.vllm.args", fromlist=["args"])


def _vllm_offset(endpoint: str, rank: int) -> str:
    """vLLM's own ``offset_endpoint_port`` (the vLLM of the Dynamo image)."""
    module = __import__("vllm.distributed.kv_events", fromlist=["ZmqEventPublisher"])
    offset: str = module.ZmqEventPublisher.offset_endpoint_port(endpoint, rank)
    return offset


def _kv_events(src: Path, req: dict[str, Any], user_config: bool) -> Found:
    args = _args(src)
    args.KVEventsConfig = types.SimpleNamespace  # records what Dynamo builds
    found: Found = []
    for local in range(req["dp_local"]):
        rank = req["first_rank"] + local
        given = (
            types.SimpleNamespace(enable_kv_cache_events=True, endpoint=req["kv_endpoint"])
            if user_config
            else None
        )
        engine = types.SimpleNamespace(
            enable_prefix_caching=True,
            enable_lora=False,
            kv_events_config=given,
            data_parallel_rank=rank,
        )
        config = types.SimpleNamespace(
            engine_args=engine, is_decode_worker=False, disaggregation_mode="agg"
        )
        # 0.7: (config); 1.0: (dynamo_config, engine_config); 1.1+: (engine_config)
        by_name = {"config": config, "dynamo_config": config, "engine_config": engine}
        params = inspect.signature(args.create_kv_events_config).parameters
        made = args.create_kv_events_config(*[by_name[name] for name in params])
        if made is None:
            if given is None:
                return []  # 1.x builds no default config any more
            raise AssertionError("Dynamo dropped the user's --kv-events-config")
        found.append((f"kv-events dp{rank}", port_of(_vllm_offset(made.endpoint, rank))))
    return found


def kv_events(src: Path, req: dict[str, Any]) -> Found:
    """Berth's ``--kv-events-config``: Dynamo passes it on, vLLM adds the rank."""
    return _kv_events(src, req, user_config=True)


def kv_events_alt(src: Path, req: dict[str, Any]) -> Found:
    """No flag: Dynamo 0.7 builds ``tcp://*:{DYN_VLLM_KV_EVENT_PORT - dp_rank}``.

    An alternative to :func:`kv_events` (same block); run for one DP rank per
    pod only, since more share one port (a preset warning, and
    test_dynamo_0_7_kv_event_port_is_shared_by_dp_ranks).
    """
    if req["dp_local"] > 1 and not req.get("force"):
        return []
    return _kv_events(src, req, user_config=False)


def nixl_env(src: Path, req: dict[str, Any]) -> Found:
    """Dynamo keeps Berth's NIXL host and never writes the NIXL port."""
    args = _args(src)
    before = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST")
    ensure = getattr(args, "ensure_side_channel_host", None)
    if ensure is not None:
        ensure()
    if os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST") != before:
        raise AssertionError("Dynamo overwrote VLLM_NIXL_SIDE_CHANNEL_HOST")
    for path in sorted((src / "dynamo/vllm").rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Store)
                and "VLLM_NIXL_SIDE_CHANNEL_PORT" in ast.unparse(node.slice)
            ):
                raise AssertionError(f"{path.name}:{node.lineno} writes the NIXL port")
    return []


def fpm(src: Path, req: dict[str, Any]) -> Found:
    """The forward-pass metrics publisher: InstrumentedScheduler's own __init__."""
    path = src / "dynamo/vllm/instrumented_scheduler.py"
    if not path.exists():
        return []  # 0.7: no forward-pass metrics publisher
    module = __import__("dynamo.vllm.instrumented_scheduler", fromlist=["InstrumentedScheduler"])

    def record(endpoint: str, **_: Any) -> None:
        raise _Bound(endpoint)

    module._FpmPublisherThread = record  # type: ignore[attr-defined]
    found: Found = []
    for local in range(req["dp_local"]):
        rank = req["first_rank"] + local
        parallel = types.SimpleNamespace(
            data_parallel_index=rank,
            data_parallel_rank=0,  # external DP resets it in every child
            data_parallel_size=req["dp"],
            data_parallel_master_ip="127.0.0.1",
        )
        vllm_config = types.SimpleNamespace(parallel_config=parallel, additional_config={})
        scheduler = object.__new__(module.InstrumentedScheduler)
        try:
            module.InstrumentedScheduler.__init__(
                scheduler,
                vllm_config=vllm_config,
                kv_cache_config=None,
                structured_output_manager=None,
                block_size=16,
            )
        except _Bound as bound:
            found.append((f"fpm dp{rank}", port_of(bound.endpoint)))
            continue
        raise AssertionError("InstrumentedScheduler bound no publisher")
    return found


def port_range(src: Path, req: dict[str, Any]) -> Found:
    """0.4-0.6: ``configure_ports`` of every DP rank with the recipe's range.

    ``--dynamo-port-min/max`` become ``DynamoPortRange`` (``ports.py``, real);
    Dynamo's Rust runtime picks blocks inside ``[min, max]`` and is not in the
    wheel, so the recorder hands out the lowest and then the highest block
    that fits: every port Dynamo could get is seen.
    """
    args = _args(src)
    ports = __import__("dynamo.vllm.ports", fromlist=["DynamoPortRange"])
    low, high = req["dynamo_range"]
    found: Found = []
    for edge in ("low", "high"):
        for local in range(req["dp_local"]):
            rank = req["first_rank"] + local
            found += _configure_ports(args, ports, low, high, edge=edge, rank=rank, tp=req["tp"])
    return found


def _configure_ports(
    args: Any, ports: Any, low: int, high: int, *, edge: str, rank: int, tp: int
) -> Found:
    calls: list[tuple[int, int]] = []

    async def allocate_port_block(
        namespace: str, first: int, last: int, size: int, context: str
    ) -> list[int]:
        calls.append((first, last))
        start = first if edge == "low" else last - size + 1
        return list(range(start, start + size))

    engine = types.SimpleNamespace(
        enable_prefix_caching=True, data_parallel_rank=rank, tensor_parallel_size=tp
    )
    config = types.SimpleNamespace(
        engine_args=engine,
        component="backend",
        namespace="dynamo",
        port_range=ports.DynamoPortRange(min=low, max=high),
        connector_list=["nixl"],
        kv_port=None,
    )
    runtime = types.SimpleNamespace(allocate_port_block=allocate_port_block)
    asyncio.run(args.configure_ports(runtime, config))
    found: Found = [(f"{edge} dp{rank}: dynamo range bound", p) for c in calls for p in c]
    found.append((f"{edge} dp{rank}: kv-events", config.kv_port))
    base = int(os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    # vLLM 0.10.x: base + dp_rank * tp + tp_rank (nixl_connector.py; the vLLM suite).
    found += [(f"{edge} dp{rank}: nixl tp{t}", base + rank * tp + t) for t in range(tp)]
    return found


CHECKS = {
    "kv_events": kv_events,
    "kv_events_alt": kv_events_alt,
    "nixl_env": nixl_env,
    "fpm": fpm,
    "port_range": port_range,
}
