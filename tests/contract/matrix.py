"""The contract matrix: engine versions x pod topologies, and the table in docs/api.md.

For each case Berth resolves the preset (``resolve_role``), lays the pods'
blocks out side by side on one node, computes each pod's env (``PortPlan``)
and runs the engine's own port code in a probe process with that env
(tests/contract/probe.py). A case passes when every port the engine would
bind lies inside that pod's blocks (or, for vLLM's ``bind(0)`` fallback, in
the kernel's ephemeral range, which no pool overlaps), no two listeners of a
pod share a port, and the probe returns within the time-out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.contract import wheels

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeploymentSpec
from berth.engines import PresetError, resolve_role
from berth.plan import PortPlan, RolePlan, first_global_rank

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
TABLE_BEGIN = "<!-- contract-table:begin (hack/contract.sh --write-table) -->"
TABLE_END = "<!-- contract-table:end -->"
TIMEOUT = float(os.environ.get("BERTH_CONTRACT_TIMEOUT", "30"))
POOL_START = 20000
#: The address Berth's downward-API env would carry.
POD_IP = "10.0.0.1"

VLLM_VERSIONS = ("0.9.0", "0.9.1", "0.9.2", "0.10.2", "0.11.0", "0.11.1", "0.17.1", "0.18.0")
VLLM_NEWEST = "0.33.0"
VLLM_CHECKS = ("nixl", "kv_events", "scan", "dp_rpc")


@dataclass(frozen=True)
class Topology:
    name: str
    title: str
    role: dict[str, int]

    @property
    def replicas(self) -> int:
        return self.role.get("replicas", 1)


TOPOLOGIES = (
    Topology("tp", "TP 4", {"tensorParallelSize": 4}),
    Topology("tp-dp", "TP 2 x DP 4, one pod", {"tensorParallelSize": 2, "dataParallelSize": 4}),
    Topology(
        "dp-spans",
        "DP 4 over 2 pods (2 each)",
        {"tensorParallelSize": 2, "dataParallelSize": 4, "dataParallelSizeLocal": 2, "replicas": 2},
    ),
    Topology(
        "two-engines",
        "2 pods (TP 1 x DP 2) on one node",
        {"tensorParallelSize": 1, "dataParallelSize": 2, "replicas": 2},
    ),
)


@dataclass(frozen=True)
class Case:
    engine: str
    version: str
    topology: Topology

    @property
    def id(self) -> str:
        return f"{self.engine}-{self.version}-{self.topology.name}"


def cases() -> list[Case]:
    return [
        Case("vllm", version, topology)
        for version in (*VLLM_VERSIONS, VLLM_NEWEST)
        for topology in TOPOLOGIES
    ]


@dataclass(frozen=True)
class Outcome:
    """``status`` is pass, refused (a PresetError) or fail; ``detail`` says why."""

    status: str
    detail: str = ""

    def cell(self) -> str:
        return {"pass": "pass", "refused": "refused", "fail": "**FAIL**"}[self.status]


def role_spec(preset: str, version: str, topology: Topology) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "engine": {"preset": preset, "version": version},
            "roles": [
                {
                    "name": "worker",
                    **topology.role,
                    "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                }
            ],
        }
    )


def layout(role: RolePlan, replicas: int) -> list[dict[str, PortRange]]:
    """Every pod's blocks, packed side by side from the pool's start on one node."""
    pods, cursor = [], POOL_START
    for _ in range(replicas):
        blocks = {}
        for block in role.blocks:
            cursor += -cursor % block.align
            blocks[block.name] = PortRange(cursor, cursor + block.size - 1)
            cursor += block.size
        pods.append(blocks)
    return pods


def ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def run_probe(engine: str, src: Path, request: dict[str, Any], env: dict[str, str]) -> Any:
    """Run the probe; ``None`` means it did not return within the time-out (a hang)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.contract.probe"],
            input=json.dumps({"engine": engine, "src": str(src), **request}),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}", **env},
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def check(case: Case) -> Outcome:
    spec = role_spec(case.engine, case.version, case.topology)
    role_spec_ = spec.roles[0]
    try:
        role = resolve_role(spec, role_spec_)
    except PresetError as error:
        return Outcome("refused", str(error))
    src = wheels.source(case.engine, case.version)
    problems: list[str] = []
    for index, blocks in enumerate(layout(role, case.topology.replicas)):
        first_rank = first_global_rank(role_spec_, index)
        plan = PortPlan(role, first_rank)
        env = plan.env(Assignment(f"pod-{index}", blocks))
        env.update(role.static_env)
        env.update({name: POD_IP for name in role.bind_address_env})
        request = {
            "checks": list(VLLM_CHECKS),
            "tp": role_spec_.tensor_parallel_size,
            "dp": role_spec_.data_parallel_size,
            "dp_local": role_spec_.dp_local,
            "first_rank": first_rank,
            "kv_base": int(env.get("BERTH_KV_EVENTS_PORT", 0)),
            "leader": first_rank == 0,
            "env": env,
        }
        answers = run_probe(case.engine, src, request, env)
        if answers is None:
            return Outcome("fail", f"pod {index}: the engine's code did not return (hang)")
        problems += [f"pod {index}: {p}" for p in judge(answers, blocks, request)]
    return Outcome("fail", "; ".join(problems)) if problems else Outcome("pass")


def judge(
    answers: dict[str, Any], blocks: dict[str, PortRange], request: dict[str, Any]
) -> list[str]:
    """What is wrong with the ports one pod's engine would bind."""
    problems: list[str] = []
    listeners: dict[int, str] = {}
    floor = ephemeral_floor()
    for check_name, answer in answers.items():
        if "error" in answer:
            problems.append(f"{check_name}: {answer['error']}")
            continue
        for what, port in answer["ports"]:
            if port is None:
                continue
            if check_name == "dp_rpc" and not request["leader"]:
                continue  # a follower connects to the leader's port, it binds none
            inside = [name for name, span in blocks.items() if span.start <= port <= span.end]
            if check_name == "scan" and "VLLM_PORT" not in request["env"]:
                if port < floor:
                    problems.append(f"{what}: bind(0) gave {port}, below the ephemeral range")
                continue
            if not inside:
                problems.append(f"{what} binds {port}, outside the pod's blocks")
            if check_name != "scan":  # get_open_port only probes; listeners must be unique
                if port in listeners:
                    problems.append(f"{what} and {listeners[port]} both bind {port}")
                listeners[port] = what
    return problems


def table(outcomes: dict[str, Outcome]) -> str:
    """The markdown table of docs/api.md, from every case's outcome."""
    head = "| engine | version | " + " | ".join(t.title for t in TOPOLOGIES) + " |"
    lines = [head, "|" + " --- |" * (2 + len(TOPOLOGIES))]
    versions = dict.fromkeys((c.engine, c.version) for c in cases())
    for engine, version in versions:
        cells = [outcomes[Case(engine, version, t).id].cell() for t in TOPOLOGIES]
        lines.append(f"| {engine} | {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def current_table() -> str:
    text = API_DOC.read_text()
    start = text.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1
    return text[start : text.index(TABLE_END)]


def write_table(rendered: str) -> None:
    text = API_DOC.read_text()
    start = text.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1
    API_DOC.write_text(text[:start] + rendered + text[text.index(TABLE_END) :])


def main(argv: list[str]) -> int:
    """``--write-table``: run every case and rewrite the table in docs/api.md."""
    outcomes = {c.id: check(c) for c in cases()}
    for case_id, outcome in outcomes.items():
        print(f"{case_id}: {outcome.status} {outcome.detail}")
    if "--write-table" in argv:
        write_table(table(outcomes))
    return 0 if all(o.status != "fail" for o in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
