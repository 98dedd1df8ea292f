"""Processes the test bed starts, and a tiny stdlib client for its API server."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.pki import Pki


class ClusterError(RuntimeError):
    """The local test bed could not be started, reached or stopped."""


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while picking)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_start_ticks(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    """Collect our own exited child so it leaves no zombie (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec() -> None:
    """In the forked child, before exec: SIGKILL when our parent thread dies.

    SIGKILL, not SIGTERM: terminated together, etcd and the API server wait
    for each other's streams and neither exits. The cluster is throw-away in
    that case anyway. Only a prctl(2) call through a handle loaded before the
    fork: nothing that could deadlock in the child of a threaded parent.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int
    argv: list[str]

    def alive(self) -> bool:
        _reap(self.pid)
        return proc_start_ticks(self.pid) == self.start_ticks

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "argv": self.argv}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Proc:
        return cls(name, int(data["pid"]), int(data["start_ticks"]), list(data["argv"]))


def stop(procs: Sequence[Proc], grace: float) -> list[str]:
    """Stop one process group at a time, in the given order: SIGTERM, up to
    ``grace`` s, then SIGKILL. (All at once, the API server would wait for
    the etcd it just lost and take the whole grace period to exit.)"""
    stopped: list[str] = []
    for p in procs:
        if not p.alive():
            continue
        stopped.append(p.name)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            deadline = time.monotonic() + wait
            while p.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not p.alive():
                break
        if p.alive():
            raise ClusterError(f"{p.name} ({p.pid}) survived SIGKILL")
    return stopped


# --------------------------------------------------------------------------
# A tiny API client (stdlib), for start-up checks and node creation.


class Api:
    def __init__(self, server: str, pki: Pki, client: str = "admin") -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(pki.ca))
        self.ctx.load_cert_chain(str(pki.crt(client)), str(pki.key(client)))

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def readyz(self) -> bool:
        try:
            status, body = self.get("/readyz")
        except (OSError, ssl.SSLError):
            return False
        return status == 200 and str(body).strip() == "ok"


def https_ok(url: str, timeout: float = 2.0) -> bool:
    """A component's own /healthz (self-signed serving cert: not verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def healthz(port_name: str) -> Callable[[dict[str, int]], bool]:
    return lambda p: https_ok(f"https://127.0.0.1:{p[port_name]}/healthz")


def http_json(url: str, timeout: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


# --------------------------------------------------------------------------
# Starting and watching components


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def say_stderr(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def say_nothing(_msg: str) -> None:
    pass


# Popen objects of the components we started, so their exit status is collected.
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class Supervisor:
    """Spawns components into ``logs/<name>.log`` and records them in the state.

    The state dict is shared with its owner; ``save`` persists it after every
    spawn, so ``down`` finds whatever an interrupted ``up`` had started.
    """

    def __init__(
        self,
        cwd: Path,
        logs: Path,
        state: dict[str, Any],
        save: Callable[[], None],
        *,
        die_with_parent: bool,
        say: Callable[[str], None],
    ) -> None:
        self.cwd = cwd
        self.logs = logs
        self.state = state
        self.save = save
        self.die_with_parent = die_with_parent
        self.say = say

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        with self.log(name).open("ab") as log:
            log.write(f"# {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec if self.die_with_parent else None,  # noqa: PLW1509
            )
        ticks = None
        for _ in range(100):  # /proc entry appears with the fork
            ticks = proc_start_ticks(popen.pid)
            if ticks is not None or popen.poll() is not None:
                break
            time.sleep(0.01)
        proc = Proc(name, popen.pid, ticks or 0, argv)
        self.state.setdefault("processes", {})[name] = proc.to_json()
        self.save()
        CHILDREN[popen.pid] = popen
        return proc

    def wait(
        self, what: str, probe: Callable[[], bool], procs: Sequence[Proc], deadline: float
    ) -> None:
        while True:
            for p in procs:
                if not p.alive():
                    raise ClusterError(
                        f"{p.name} exited while waiting for {what}; "
                        f"last lines of {self.log(p.name)}:\n{tail(self.log(p.name))}"
                    )
            if probe():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}:\n{tail(self.log(p.name), 15)}" for p in procs)
                raise ClusterError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.1)

    def start(
        self,
        name: str,
        *,
        ports: Sequence[str],
        argv: Callable[[dict[str, int]], list[str]],
        ready: Callable[[dict[str, int]], bool],
        deadline: float,
        others: Sequence[Proc] = (),
    ) -> Proc:
        """Start a component on fresh free ports; if it lost a race for one of
        them (another process bound it first), pick new ones and retry."""
        for attempt in range(4):
            picked = dict(zip(ports, free_ports(len(ports)), strict=True))
            self.state.setdefault("ports", {}).update(picked)
            proc = self.spawn(name, argv(picked))
            try:
                self.wait(name, functools.partial(ready, picked), [proc, *others], deadline)
                return proc
            except ClusterError:
                lost_race = "address already in use" in tail(self.log(name), 40).lower()
                if not lost_race or attempt == 3 or proc.alive():
                    raise
                self.say(f"{name}: port taken, retrying on new ports")
        raise AssertionError("unreachable")

    def stop(self, procs: Sequence[Proc], grace: float) -> list[str]:
        stopped = stop(procs, grace)
        for p in procs:
            popen = CHILDREN.pop(p.pid, None)
            if popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=1)
        return stopped
