"""Run the real operator (``python -m berth``) as a child process.

Integration tests drive the operator the way users run it, so they can also
SIGKILL it at any point and start it again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OperatorProcess:
    """One operator process; ``log`` collects every run's output in one file."""

    def __init__(
        self,
        kubeconfig: str,
        log: Path,
        namespace: str = "berth-system",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.namespace = namespace
        self.extra_env = env or {}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: TextIO | None = None
        self.metrics_port = 0
        self.run_offset = 0  # where this run's output starts in ``log``

    def start(self) -> OperatorProcess:
        self.metrics_port = int(self.extra_env.get("BERTH_METRICS_PORT") or free_port())
        self.run_offset = self.log.stat().st_size if self.log.exists() else 0
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "BERTH_NAMESPACE": self.namespace,
            "BERTH_METRICS_PORT": str(self.metrics_port),
            "BERTH_SWEEP_INTERVAL": "5",
            **self.extra_env,
        }
        self._out = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "berth", *self.args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last writes, as in a node crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def audit_lines(self, this_run: bool = False) -> list[dict[str, Any]]:
        """Every run's audit lines, or only those of the current run."""
        return list(audit_lines(self.log, self.run_offset if this_run else 0))

    def metrics(self) -> dict[str, float]:
        """The running process's Prometheus metrics (``name{labels}`` -> value)."""
        return scrape(self.metrics_port)

    def metric(self, name: str) -> float:
        """One metric, 0 while the process is not serving metrics yet."""
        try:
            return self.metrics().get(name, 0.0)
        except OSError:
            return 0.0

    def peak_rss_mb(self) -> float:
        """The running process's peak resident set (VmHWM), for the benchmark."""
        assert self.proc is not None, "the operator is not running"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def scrape(port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def audit_lines(log: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    # Only whole lines: a SIGKILLed process may leave half of one.
    for line in text[: text.rfind("\n") + 1].splitlines():
        if line.startswith("{") and '"audit"' in line:
            yield json.loads(line)


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.25, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")
