"""Run an engine's own port-selection code and report the ports it would bind.

Invoked as ``python -m tests.contract.probe`` by the contract tests, one
process per (engine version, pod): the request (JSON on stdin) names the
extracted release, the checks and the pod's parallelism; the process
environment is the env Berth delivers to that pod. The answer (JSON on
stdout) lists ``[what, port]`` pairs; the parent decides whether each port is
inside the pod's blocks. A hang shows up as the parent's time-out.

Only the engine module under test runs from source; everything it imports
from the engine or from heavy third parties is a stub (tests/contract/stubs.py).
Listeners are not opened: the engine's ``zmq_ctx``/socket helpers are replaced
by a recorder, so what is reported is the address the engine's own code
computed. ``get_open_port`` really binds probe sockets, as vLLM does.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.contract import probe_dynamo, probe_ray, probe_sglang, stubs

Found = list[tuple[str, int | None]]


class Bound(Exception):
    """Raised by the recording socket helper in place of a real bind."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].rstrip("/"))


def config(**fields: Any) -> Any:
    """A config object: the given fields are real, any other is a stub."""
    obj = stubs.stub_class("Config")
    real = type("RealConfig", (obj,), {"_is_stub": False})()
    for name, value in fields.items():
        object.__setattr__(real, name, value)
    return real


def load(*modules: str) -> list[types.ModuleType]:
    """Import modules :func:`install_vllm` (or its kin) declared real."""
    return [importlib.import_module(m) for m in modules]


def first_existing(src: Path, *modules: str) -> str:
    for module in modules:
        base = src / module.replace(".", "/")
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return module
    raise FileNotFoundError(f"none of {modules} in {src}")


def assigned_expr(path: Path, target: str, inside: str | None = None) -> list[ast.expr]:
    """Right-hand sides of ``target = ...`` (optionally inside function/class ``inside``)."""
    tree = ast.parse(path.read_text())
    scopes: list[ast.AST] = [tree]
    if inside is not None:
        scopes = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == inside
        ]
    found: list[ast.expr] = []
    for scope in scopes:
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(ast.unparse(t) == target for t in targets):
                    found.append(node.value)
    return found


def evaluate(expr: ast.expr, namespace: dict[str, Any]) -> Any:
    return eval(compile(ast.Expression(expr), "<engine>", "eval"), dict(namespace))


@contextmanager
def recording(module: types.ModuleType) -> Iterator[None]:
    """Replace the module's socket helpers: the first bind raises :class:`Bound`."""

    @contextmanager
    def zmq_ctx(socket_type: Any, addr: str) -> Iterator[None]:
        raise Bound(addr)
        yield

    def make_zmq_path(scheme: str, host: str, port: int | None = None) -> str:
        return f"{scheme}://{host}:{port}"

    saved = {n: getattr(module, n, None) for n in ("zmq_ctx", "make_zmq_path")}
    module.zmq_ctx = zmq_ctx  # type: ignore[attr-defined]
    module.make_zmq_path = make_zmq_path  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def call_listener(listener: Callable[..., Any], values: dict[str, Any]) -> int:
    """Call the engine's handshake listener with arguments chosen by parameter name."""
    kwargs = {name: values.get(name) for name in inspect.signature(listener).parameters}
    try:
        listener(**kwargs)
    except Bound as bound:
        return port_of(bound.path)
    raise AssertionError("the listener returned without binding")


# --------------------------------------------------------------------- vLLM


NIXL_MODULES = (
    "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_scheduler",
    "vllm.distributed.kv_transfer.kv_connector.v1.nixl_connector",
)
NETWORK_MODULES = ("vllm.utils.network_utils", "vllm.utils")


def install_vllm(src: Path) -> None:
    """Declare every vLLM module the checks run real, before any is imported."""
    real = [
        first_existing(src, *NIXL_MODULES),
        first_existing(src, *NETWORK_MODULES),
        "vllm.envs",
        "vllm.distributed.kv_events",
    ]
    if (src / "vllm/v1/utils.py").exists():
        real.append("vllm.v1.utils")
    stubs.install("vllm", real)


def vllm_parallel(req: dict[str, Any], local: int) -> Any:
    rank = req["first_rank"] + local
    return config(
        data_parallel_rank=rank,
        data_parallel_rank_local=local,
        data_parallel_index=rank,
        data_parallel_size=req["dp"],
        data_parallel_size_local=req["dp_local"],
        tensor_parallel_size=req["tp"],
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
        enable_elastic_ep=False,
    )


def vllm_nixl(src: Path, req: dict[str, Any]) -> Found:
    """NIXL side-channel listeners: vLLM's own port arithmetic and listener code."""
    module = load(first_existing(src, *NIXL_MODULES))[0]
    scheduler_cls = next(
        getattr(module, n)
        for n in ("NixlBaseConnectorScheduler", "NixlConnectorScheduler")
        if hasattr(module, n)
    )
    per_engine = hasattr(scheduler_cls, "_nixl_handshake_listener")
    listener = (
        scheduler_cls if per_engine else module.NixlConnectorWorker
    )._nixl_handshake_listener
    file = Path(module.__file__ or "")
    scheduler_port = assigned_expr(file, "self.side_channel_port", scheduler_cls.__name__)
    if not per_engine and scheduler_port:
        worker_port = assigned_expr(file, "self.side_channel_port", "NixlConnectorWorker")
        # The worker recomputes the base itself: it must be the scheduler's formula.
        assert [ast.dump(e) for e in worker_port] == [ast.dump(scheduler_port[0])], (
            "formulas differ"
        )
    found: Found = []
    for local in range(req["dp_local"]):
        parallel = vllm_parallel(req, local)
        vllm_config = config(parallel_config=parallel)
        base = None
        if scheduler_port:
            params = inspect.signature(scheduler_cls.__init__).parameters
            args = [vllm_config, "engine"] + [config()] * (len(params) - 3)
            base = scheduler_cls(*args).side_channel_port
        values = {
            "ready_event": threading.Event(),
            "stop_event": threading.Event(),
            "metadata": config(),
            "encoded_data": {},
            "base_port": base,
            "port": base,
        }
        with recording(module):
            ranks = [None] if per_engine else range(req["tp"])
            for tp_rank in ranks:
                values.update(rank=tp_rank, tp_rank=tp_rank)
                label = f"nixl dp{parallel.data_parallel_rank}" + (
                    "" if tp_rank is None else f" tp{tp_rank}"
                )
                found.append((label, call_listener(listener, values)))
    return found


def vllm_kv_events(src: Path, req: dict[str, Any]) -> Found:
    """KV-events publisher: the rank the scheduler passes and vLLM's own offset."""
    module = load("vllm.distributed.kv_events")[0]
    module.threading = types.SimpleNamespace(  # type: ignore[attr-defined]
        Thread=lambda *a, **k: types.SimpleNamespace(start=lambda: None),
        Event=threading.Event,
        Lock=threading.Lock,
    )
    scheduler = src / "vllm/v1/core/sched/scheduler.py"
    calls = [
        n
        for n in ast.walk(ast.parse(scheduler.read_text()))
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "EventPublisherFactory.create"
    ]
    assert len(calls) == 1, "expected one publisher in the scheduler"
    found: Found = []
    for local in range(req["dp_local"]):
        parallel = vllm_parallel(req, local)
        namespace = {
            "self": config(parallel_config=parallel),
            "vllm_config": config(parallel_config=parallel),
        }
        args = calls[0].args[1:2]
        rank = evaluate(args[0], namespace) if args else None
        params = inspect.signature(module.ZmqEventPublisher.__init__).parameters
        kwargs: dict[str, Any] = {"endpoint": f"tcp://*:{req['kv_base']}"}
        if rank is not None and "data_parallel_rank" in params:
            kwargs["data_parallel_rank"] = rank
        publisher = module.ZmqEventPublisher(**kwargs)
        found.append((f"kv-events dp{parallel.data_parallel_rank}", port_of(publisher._endpoint)))
    return found


def vllm_scan(src: Path, req: dict[str, Any]) -> Found:
    """Ports vLLM picks with get_open_port()/get_open_ports_list() under Berth's env."""
    module = load(first_existing(src, *NETWORK_MODULES))[0]
    found: Found = [("get_open_port", module.get_open_port()) for _ in range(3)]
    if req["dp"] > 1 and hasattr(module, "get_open_ports_list"):
        found += [("DP master ports", p) for p in module.get_open_ports_list(5)]
    return found


def vllm_dp_rpc(src: Path, req: dict[str, Any]) -> Found:
    """The engines' handshake socket: TCP on --data-parallel-rpc-port, or IPC."""
    utils_file = src / "vllm/v1/engine/utils.py"
    exprs = (
        assigned_expr(utils_file, "handshake_local_only", "launch_core_engines")
        if utils_file.exists()
        else []
    )
    if not exprs:
        return [("dp-rpc: not run (no launch_core_engines in this release)", None)]
    module = load("vllm.v1.utils")[0]
    local_only = evaluate(
        exprs[0],
        {
            "offline_mode": False,
            "local_engine_count": req["dp_local"],
            "dp_size": req["dp"],
            "parallel_config": config(enable_elastic_ep=False),
        },
    )
    rpc = int(req["env"].get("BERTH_DP_RPC_PORT", 0))
    address = module.get_engine_client_zmq_addr(local_only, "10.0.0.1", rpc)
    if address.startswith("ipc://"):
        return []
    return [("dp-rpc handshake", port_of(address))]


INSTALL: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "vllm": lambda src, req: install_vllm(src),
    "sglang": probe_sglang.install,
    "ai-dynamo": probe_dynamo.install,
    "ray": probe_ray.install,
}
CHECKS: dict[str, Callable[[Path, dict[str, Any]], Found]] = {
    "vllm.nixl": vllm_nixl,
    "vllm.kv_events": vllm_kv_events,
    "vllm.scan": vllm_scan,
    "vllm.dp_rpc": vllm_dp_rpc,
    **{f"sglang.{name}": check for name, check in probe_sglang.CHECKS.items()},
    **{f"ai-dynamo.{name}": check for name, check in probe_dynamo.CHECKS.items()},
    **{f"ray.{name}": check for name, check in probe_ray.CHECKS.items()},
}


def main() -> None:
    """Run ``req["checks"]``; each answers its ports or the error it raised."""
    req = json.load(sys.stdin)
    src = Path(req["src"])
    sys.path[:0] = [str(src), *req.get("pylib", [])]
    INSTALL[req["engine"]](src, req)
    answers: dict[str, Any] = {}
    for check in req["checks"]:
        try:
            answers[check] = {"ports": CHECKS[f"{req['engine']}.{check}"](src, req)}
        except Exception as error:  # reported to the parent, which fails the case
            answers[check] = {"error": f"{type(error).__name__}: {error}"}
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
