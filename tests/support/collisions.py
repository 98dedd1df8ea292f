"""Port collisions on a real node, by where the engines get their ports.

Shared by scripts/bench_collisions.py and tests/integration/test_collisions.py.
In every mode ``engines`` engines of ``ports`` ports each start at once as
hostNetwork pods on one real node, in deployments of ``group`` ranks:

* ``probe``: plain pods, ``ENGINE_PORTS=probe``: each engine picks its ports
  itself (bind port 0 on the node IP, read the port, close), waits its
  start-up delay, then binds them.
* ``fixed``: plain pods, ``ENGINE_PORTS=fixed``: rank r of every deployment
  binds ``base + r * ports`` on, from the same default base.
* ``berth``: InferenceDeployments of ``group`` replicas (custom preset, one
  block of ``ports`` ports); the operator must be running (``berth_running``).

Each engine waits a random start-up delay (``ENGINE_STARTUP_MS=LO-HI``)
between choosing its ports and binding them. Every pod has ``restartPolicy:
Never``, so a pod is one start, and ``terminationMessagePolicy:
FallbackToLogsOnError``, so a container that exits non-zero carries the tail
of its log in its status. A start failed with EADDRINUSE when its container
exited non-zero and that message (or, if the kubelet left none, its log)
names EADDRINUSE; it succeeded when its log says ``engine: ready``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from testbed.workloads import engine_container, engine_deployment, pin_to
from tests.support.operator_process import OperatorProcess, wait_for
from tests.support.scenarios import OPERATOR_NAMESPACE, ensure_namespace, install_crds

Body = dict[str, Any]
MODES = ("probe", "fixed", "berth")
ROUND_LABEL = "collisions.berth.dev/round"
GROUP, VERSION, PLURAL = "berth.dev", "v1alpha1", "inferencedeployments"
LISTENING = re.compile(r"^engine: listening on [0-9.]+:(\d+) ", re.M)
IN_USE = re.compile(r"engine: EADDRINUSE: port (\d+) ")


@dataclass(frozen=True)
class Shape:
    engines: int = 16
    ports: int = 8
    group: int = 4  # ranks (fixed) or replicas (berth) per deployment
    startup_ms: str = "200-2000"  # ENGINE_STARTUP_MS: a random delay in this range
    fixed_base: int = 29500

    @property
    def deployments(self) -> int:
        return -(-self.engines // self.group)

    def ranks(self, deployment: int) -> int:
        return min(self.group, self.engines - deployment * self.group)


@dataclass
class Outcome:
    """One round of one mode."""

    mode: str
    starts: int = 0
    ready: int = 0
    eaddrinuse: int = 0
    other: list[str] = field(default_factory=list)  # other failures, starts never decided
    ports: dict[str, list[int]] = field(default_factory=dict)  # ready pod -> its listeners
    in_use: list[int] = field(default_factory=list)  # the port each EADDRINUSE start failed on
    seconds: float = 0.0  # first create -> every start decided

    def in_use_by_the_round(self) -> int:
        """How many EADDRINUSE starts failed on a port an engine of the same
        round listens on (the others: a port something else held then)."""
        held = {p for ports in self.ports.values() for p in ports}
        return sum(1 for p in self.in_use if p in held)


@dataclass
class Kube:
    """kubectl on a kubeconfig, as the integration tests' ``cluster`` offers it."""

    kubeconfig: str
    kubectl_path: str = "kubectl"

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done


@contextlib.contextmanager
def berth_running(
    cluster: Any, node: str, pool: tuple[int, int], log: Path
) -> Iterator[OperatorProcess]:
    """The operator, out of cluster, with ``node``'s own NodePortPool ``pool``."""
    install_crds(cluster)
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    name = f"collisions-{node}"
    body = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "NodePortPool",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "ranges": [{"start": pool[0], "end": pool[1]}],
            "priority": 1000,
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    operator = OperatorProcess(cluster.kubeconfig, log).start()
    try:
        yield operator
    finally:
        operator.stop()
        cluster.kubectl("delete", "nodeportpool", name, "--ignore-not-found")


def ephemeral_range() -> tuple[int, int]:
    """This host's ip_local_port_range (the real node's: it is this host)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


class Collisions:
    """Runs rounds of one mode at a time in ``namespace`` on ``node``."""

    def __init__(self, api: k8s.ApiClient, namespace: str, node: str, shape: Shape) -> None:
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.namespace, self.node, self.shape = namespace, node, shape

    def run(self, mode: str, round_: int = 0, timeout: float = 180) -> Outcome:
        """Start every engine of ``mode`` at once, wait until each start
        succeeded or failed, then delete them and wait until they are gone."""
        label = f"{mode}-{round_}"
        started = time.monotonic()
        if mode == "berth":
            for d in range(self.shape.deployments):
                body = self._deployment(f"{label}-d{d}", label, d)
                self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body
                )
        else:
            for d in range(self.shape.deployments):
                for rank in range(self.shape.ranks(d)):
                    pod = self._pod(f"{label}-d{d}-{rank}", label, mode, rank)
                    self.core.create_namespaced_pod(self.namespace, pod)
        try:
            outcome = self._wait(mode, label, started, timeout)
        finally:
            self._delete(mode, label)
        return outcome

    # --- the engines of each mode

    def _engine(self, env: dict[str, str], spans: dict[str, int] | None = None) -> Body:
        container = engine_container(spans)
        container["env"] += [
            {"name": k, "value": v}
            for k, v in {**env, "ENGINE_STARTUP_MS": self.shape.startup_ms}.items()
        ]
        container["terminationMessagePolicy"] = "FallbackToLogsOnError"
        return container

    def _pod(self, name: str, label: str, mode: str, rank: int) -> Body:
        env = {"ENGINE_PORTS": mode, "ENGINE_PORT_COUNT": str(self.shape.ports)}
        if mode == "fixed":
            env |= {"ENGINE_FIXED_BASE": str(self.shape.fixed_base), "ENGINE_RANK": str(rank)}
        spec = {"hostNetwork": True, "restartPolicy": "Never", "containers": [self._engine(env)]}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {ROUND_LABEL: label}},
            "spec": pin_to(spec, self.node),
        }

    def _deployment(self, name: str, label: str, index: int) -> Body:
        body = engine_deployment(
            name, self.node, [("engines", self.shape.ports)], replicas=self.shape.ranks(index)
        )
        body["metadata"]["labels"] = {ROUND_LABEL: label}
        template = body["spec"]["roles"][0]["template"]
        template["metadata"] = {"labels": {ROUND_LABEL: label}}
        template["spec"]["restartPolicy"] = "Never"
        template["spec"]["containers"] = [
            self._engine({}, {"ENGINES_PORT": self.shape.ports} if self.shape.ports > 1 else None)
        ]
        return body

    # --- watching the starts

    def _log(self, name: str, previous: bool = False) -> str:
        try:
            return str(self.core.read_namespaced_pod_log(name, self.namespace, previous=previous))
        except k8s.ApiException:
            return ""

    def _judge(self, pod: Any) -> tuple[str, str]:
        """("ready" | "eaddrinuse" | "other" | "", detail) for one pod."""
        name = pod.metadata.name
        statuses = pod.status.container_statuses or []
        if statuses and statuses[0].restart_count:  # a pod whose restartPolicy was not Never
            ended = statuses[0].last_state.terminated
            text = (ended.message if ended else None) or self._log(name, previous=True)
            verdict = "eaddrinuse" if "EADDRINUSE" in text else "other"
            return verdict, f"{name}: restarted, {text[-300:]}"
        state = statuses[0].state if statuses else None
        if state is not None and state.terminated is not None:
            ended = state.terminated
            text = ended.message or self._log(name)
            if ended.exit_code != 0 and "EADDRINUSE" in text:
                return "eaddrinuse", text
            return "other", f"{name}: exit {ended.exit_code} ({ended.reason}): {text[-300:]}"
        if state is not None and state.running is not None:
            log = self._log(name)
            if "engine: ready" in log:
                return "ready", log
        elif pod.status.phase in ("Failed", "Succeeded"):
            return "other", f"{name}: {pod.status.phase} ({pod.status.reason})"
        return "", ""

    def _pods(self, label: str) -> list[Any]:
        return list(
            self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{ROUND_LABEL}={label}"
            ).items
        )

    def _wait(self, mode: str, label: str, started: float, timeout: float) -> Outcome:
        decided: dict[str, tuple[str, str, str]] = {}  # pod UID -> (name, verdict, detail)

        def every_start_decided() -> bool:
            pods = self._pods(label)
            for pod in pods:
                if pod.metadata.uid not in decided:
                    verdict, detail = self._judge(pod)
                    if verdict:
                        decided[pod.metadata.uid] = (pod.metadata.name, verdict, detail)
            ready = sum(1 for _, verdict, _ in decided.values() if verdict == "ready")
            all_seen = len(pods) >= self.shape.engines and all(
                p.metadata.uid in decided for p in pods
            )
            # Berth replaces a pod that ended: its deployments are done when
            # every engine they want runs.
            return all_seen and (mode != "berth" or ready == self.shape.engines)

        with contextlib.suppress(AssertionError):  # starts never decided are reported so
            wait_for(every_start_decided, timeout=timeout, interval=0.5, what=f"{label} starts")
        outcome = Outcome(mode, seconds=time.monotonic() - started)
        for name, verdict, detail in decided.values():
            if verdict == "ready":
                outcome.ready += 1
                outcome.ports[name] = [int(p) for p in LISTENING.findall(detail)]
            elif verdict == "eaddrinuse":
                outcome.eaddrinuse += 1
                outcome.in_use += [int(p) for p in IN_USE.findall(detail)[:1]]
            else:
                outcome.other.append(detail)
        undecided = [p.metadata.name for p in self._pods(label) if p.metadata.uid not in decided]
        outcome.other += [f"{name}: not decided in {timeout:.0f} s" for name in undecided]
        outcome.starts = len(decided) + len(undecided)
        return outcome

    def _delete(self, mode: str, label: str) -> None:
        selector = f"{ROUND_LABEL}={label}"
        if mode == "berth":
            self.custom.delete_collection_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=selector
            )
        self.core.delete_collection_namespaced_pod(self.namespace, label_selector=selector)
        wait_for(
            lambda: not self._pods(label),
            timeout=180,
            interval=0.5,
            what=f"the pods of {label} to be gone",
        )
