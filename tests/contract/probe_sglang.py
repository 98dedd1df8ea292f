"""SGLang's own port code, run in the probe process (see probe.py).

Real, from the release: ``server_args.py`` (argparse flags, defaults,
``PortArgs.init_new``), its pure helpers (``arg_groups/``,
``runtime_context.py``, ``utils/network.py`` or ``utils/common.py``,
``environ.py``), ``managers/data_parallel_controller.py`` and
``disaggregation/kv_events.py``. Stubbed: torch, CUDA, zmq and every other
module. ``ServerArgs`` is built by SGLang's own parser from the args Berth's
env renders; resolution (``__post_init__``/``resolve_once``) needs the model
and a GPU and is not run, so :func:`unassigned` proves it never writes a port
field.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.contract import stubs

Found = list[tuple[str, int | None]]

#: ServerArgs fields holding a port Berth pins (or the address carrying one).
PORT_FIELDS = (
    "port",
    "nccl_port",
    "dist_init_addr",
    "disaggregation_bootstrap_port",
    "kv_events_config",
)
#: Installed pure libraries SGLang's config code runs with (msgspec: wheels.pylib).
THIRD_PARTY = ("msgspec",)
#: pyzmq's ``bind_to_random_port`` range (min_port, max_port defaults).
ZMQ_RANDOM = (49152, 65536)


def _exists(src: Path, module: str) -> bool:
    base = src / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def install(src: Path, req: dict[str, Any]) -> None:
    """Declare SGLang's pure port modules real; everything else is a stub."""
    helpers = (
        ["sglang.srt.utils"]  # 0.4.9: one utils.py
        if (src / "sglang/srt/utils.py").exists()
        else ["sglang.srt.utils.network"]
        if _exists(src, "sglang.srt.utils.network")
        else ["sglang.srt.utils.common"]
    )
    real = [
        "sglang.srt.server_args",
        "sglang.srt.arg_groups.",
        "sglang.srt.runtime_context",
        "sglang.srt.environ",
        "sglang.srt.managers.data_parallel_controller",
        "sglang.srt.disaggregation.kv_events",
        *helpers,
    ]
    stubs.install("sglang", [m for m in real if m.endswith(".") or _exists(src, m)], THIRD_PARTY)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].rstrip("/"))


def server_args(req: dict[str, Any]) -> Any:
    """ServerArgs from SGLang's own parser (no resolution: see :func:`unassigned`)."""
    module = __import__("sglang.srt.server_args", fromlist=["ServerArgs"])
    parser = argparse.ArgumentParser()
    module.ServerArgs.add_cli_args(parser)
    namespace = parser.parse_args(req["args"])
    cls = module.ServerArgs
    post_init = cls.__dict__.get("__post_init__")
    if post_init is not None and "resolve_once" not in cls.__dict__:
        cls.__post_init__ = lambda self: None  # 0.4.9-0.5.21: model and GPU checks
    try:
        return cls.from_cli_args(namespace)
    finally:
        if post_init is not None:
            cls.__post_init__ = post_init


def _python_files(src: Path) -> Iterator[Path]:
    srt = src / "sglang/srt"
    yield srt / "server_args.py"
    yield from sorted((srt / "arg_groups").rglob("*.py")) if (srt / "arg_groups").exists() else ()


def unassigned(src: Path, req: dict[str, Any]) -> Found:
    """No resolution code writes a port field: the parsed values are the bound ones."""
    writes = []
    for path in _python_files(src):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in PORT_FIELDS:
                    writes.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    if writes:
        raise AssertionError(f"resolution writes port fields: {writes}")
    return []


def http(src: Path, req: dict[str, Any]) -> Found:
    """``--port`` (HTTP server; followers of a multi-node server bind it for health)."""
    args = server_args(req)
    found: Found = [("http", args.port)]
    if req.get("bootstrap"):
        found.append(("bootstrap", args.disaggregation_bootstrap_port))
    return found


def _tcp_ports(port_args: Any) -> Found:
    found: Found = [("nccl", port_args.nccl_port)]
    for name, value in sorted(vars(port_args).items()):
        if isinstance(value, str) and value.startswith("tcp://"):
            found.append((name, port_of(value)))
    return found


def port_args(src: Path, req: dict[str, Any]) -> Found:
    """``PortArgs.init_new``: nccl and, with DP attention, the dist-init cluster.

    Only the node holding rank 0 binds the cluster (tokenizer, detokenizer,
    RPC, metrics, the DP controller's input); the others connect to it.
    """
    module = __import__("sglang.srt.server_args", fromlist=["PortArgs"])
    args = server_args(req)
    main = module.PortArgs.init_new(args)
    found = _tcp_ports(main)
    if req["dp_attention"] and not any(n.endswith("_ipc_name") for n, _ in found):
        raise AssertionError("DP attention given, but PortArgs took the IPC branch")
    if not req["dp_attention"] and len(found) > 1:
        raise AssertionError("no DP attention, but PortArgs took the TCP branch")
    if req["dp_attention"]:
        _, dist_init = args.dist_init_addr.rsplit(":", 1)
        found.append(("dist-init (torch TCPStore)", int(dist_init)))
    if not req["leader"]:
        return [("nccl", main.nccl_port)]
    return found + rust_server(module, args, req)


def rust_server(module: types.ModuleType, args: Any, req: dict[str, Any]) -> Found:
    """With SGLANG_RUST_SERVER (0.5.22+) each rank's input is ``port_base + 6 + rank``."""
    source = inspect.getsource(module.PortArgs.init_new)
    if not req["dp_attention"] or "is_rust_server" not in source:
        return []
    os.environ["SGLANG_RUST_SERVER"] = "1"
    try:
        ranks = [module.PortArgs.init_new(args, rank) for rank in range(req["dp"])]
    finally:
        del os.environ["SGLANG_RUST_SERVER"]
    return [
        (f"rust-server input dp{rank}", port_of(a.scheduler_input_ipc_name))
        for rank, a in enumerate(ranks)
    ]


class _Recorded(Exception):
    pass


def _fake_context(bound: list[tuple[str, int | None]]) -> Any:
    """A zmq context whose sockets record ``bind_to_random_port`` calls."""

    def socket(*_: Any) -> Any:
        def bind_to_random_port(addr: str, min_port: int = 0, max_port: int = 0) -> int:
            low, high = (min_port or ZMQ_RANDOM[0], max_port or ZMQ_RANDOM[1])
            bound.append((f"zmq random {addr} in {low}-{high - 1}", None))
            return low + len(bound) - 1

        return types.SimpleNamespace(
            bind_to_random_port=bind_to_random_port, setsockopt=lambda *a: None
        )

    return types.SimpleNamespace(socket=socket)


def _context_getters(module: types.ModuleType, args: Any) -> None:
    """0.5.22+: the controller reads the published config; publish it from ``args``."""
    parallel = types.SimpleNamespace(
        dist_init_addr=args.dist_init_addr,
        node_rank=args.node_rank,
        nnodes=args.nnodes,
        num_dp_ranks=getattr(args, "attn_dp_size", 1) * args.dp_size,
    )
    serving = types.SimpleNamespace(host=args.host, port=args.port)
    module.get_parallel = lambda: parallel  # type: ignore[attr-defined]
    module.get_serving = lambda: serving  # type: ignore[attr-defined]
    module.get_exec = lambda: types.SimpleNamespace(  # type: ignore[attr-defined]
        moe=types.SimpleNamespace(is_ep_scale_joiner=False, elastic_ep_backend=None)
    )


def dp_controller(src: Path, req: dict[str, Any]) -> Found:
    """The DP controller with DP attention: per-rank scheduler inputs and the handshake.

    Runs the controller's own ``launch_dp_attention_schedulers`` up to the
    scheduler launch (replaced by a recorder that calls ``PortArgs.init_new``
    per rank, as ``launch_tensor_parallel_group`` does) and its
    ``_broadcast_worker_ports`` up to the socket (a recorder).
    """
    if not req["dp_attention"]:
        return []
    module = __import__(
        "sglang.srt.managers.data_parallel_controller", fromlist=["DataParallelController"]
    )
    server = __import__("sglang.srt.server_args", fromlist=["PortArgs"])
    args = server_args(req)
    _context_getters(module, args)
    cls = module.DataParallelController
    found: Found = []
    bound: list[tuple[str, int | None]] = []
    this = object.__new__(cls)
    this.context = _fake_context(bound)
    this.workers = [None] * req["dp"]
    this.server_args = args

    def endpoint(kind: str) -> Any:
        def record(endpoint: str, *rest: Any) -> Any:
            found.append((f"DP-attention handshake ({kind})", port_of(endpoint)))
            raise _Recorded

        return record

    this._broadcast_ports_as_server = endpoint("bind")
    this._receive_ports_as_client = endpoint("connect")
    main = server.PortArgs.init_new(args)
    params = inspect.signature(cls.launch_dp_attention_schedulers).parameters
    if "_broadcast_worker_ports" not in vars(cls):  # 0.4.9: ranks at port_base + 5 + r
        for rank in range(req["dp"]):
            rank_args = server.PortArgs.init_new(args, rank)
            found.append((f"scheduler input dp{rank}", port_of(rank_args.scheduler_input_ipc_name)))
        return found if req["leader"] else []
    assert len(params) == 3, "launch_dp_attention_schedulers changed its signature"
    with contextlib.suppress(_Recorded):
        cls.launch_dp_attention_schedulers(this, args, main)
    if not req["leader"]:  # a follower binds no controller socket, it connects
        return []
    # Worker sockets come from bind_to_random_port: never inside a block.
    return [(what, None) for what, _ in bound] + [(w, p) for w, p in found if "bind" in w]


def kv_events(src: Path, req: dict[str, Any]) -> Found:
    """The KV-events publishers of the pod's ranks: SGLang's own offset rule.

    The rank is the attention-DP rank (scheduler ``init_kv_events``); 0.5.22+
    picks it with ``select_kv_publisher_dp_rank`` (pure DP: the replica rank).
    """
    module = __import__("sglang.srt.disaggregation.kv_events", fromlist=["ZmqEventPublisher"])
    args = server_args(req)
    endpoint = json.loads(args.kv_events_config)["endpoint"]  # KVEventsConfig.from_cli
    found: Found = []
    for local in range(req["dp_local"]):
        rank = req["first_rank"] + local
        if not req["dp_attention"]:
            attn_rank, dp_rank = 0, rank
        else:
            attn_rank, dp_rank = rank, None
        if hasattr(module, "select_kv_publisher_dp_rank"):
            attn_size = req["dp"] if req["dp_attention"] else 1
            publisher_rank = module.select_kv_publisher_dp_rank(attn_size, attn_rank, dp_rank)
        else:
            publisher_rank = attn_rank
        offset = module.ZmqEventPublisher.offset_endpoint_port(endpoint, publisher_rank)
        found.append((f"kv-events dp{rank}", port_of(offset)))
    return found


CHECKS = {
    "unassigned": unassigned,
    "http": http,
    "port_args": port_args,
    "dp_controller": dp_controller,
    "kv_events": kv_events,
}
