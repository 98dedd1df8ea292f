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
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.contract import wheels

from berth.allocator import Assignment
from berth.allocator.ranges import PortRange
from berth.api import InferenceDeploymentSpec, RoleSpec
from berth.engines import PresetError, parse_version, resolve_role
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
#: ai-dynamo release -> the vLLM it pins (the wheels' Requires-Dist), which is
#: what ``engine.version`` names for the dynamo-vllm preset.
DYNAMO_VLLM = {"0.7.1": "0.11.0", "1.0.0": "0.16.0", "1.6.1": "0.31.0"}
DYNAMO_CHECKS = ("kv_events", "kv_events_alt", "nixl_env", "fpm")
SGLANG_VERSIONS = ("0.4.9", "0.5.8", "0.5.22", "0.5.23")
SGLANG_CHECKS = ("unassigned", "http", "port_args", "dp_controller", "kv_events")
#: From here SGLang's DP attention is ``--attn-dp-size`` (``--enable-dp-attention``
#: is left for resolution to translate, which the probe does not run).
SGLANG_ATTN_DP_SIZE = (0, 5, 22)


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
class Engine:
    """One preset's engine: the wheel, the versions run and the probe's checks."""

    preset: str
    dist: str
    versions: tuple[str, ...]
    checks: tuple[str, ...]
    #: What the probe needs besides the common fields (see ``request``).
    extra: Callable[[Case, RoleSpec, int, dict[str, str]], dict[str, Any]]
    #: ``engine.version`` the preset gets, when it is not the wheel's version.
    preset_versions: Mapping[str, str] = field(default_factory=dict)
    #: What of the engine's port code is not run, for the table (by version).
    narrowed: Callable[[str], str] = lambda version: "-"

    def preset_version(self, version: str) -> str:
        return self.preset_versions.get(version, version)

    def label(self, version: str) -> str:
        inside = self.preset_versions.get(version)
        return f"{version} (vLLM {inside})" if inside else version


@dataclass(frozen=True)
class Case:
    engine: str
    version: str
    topology: Topology

    @property
    def id(self) -> str:
        return f"{self.engine}-{self.version}-{self.topology.name}"


def render(args: list[str], env: dict[str, str]) -> list[str]:
    """``$(NAME)`` references expanded as the kubelet does (unknown names stay)."""
    reference = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
    return [reference.sub(lambda m: env.get(m[1], m[0]), a) for a in args]


def vllm_extra(case: Case, role: RoleSpec, index: int, env: dict[str, str]) -> dict[str, Any]:
    return {"kv_base": int(env.get("BERTH_KV_EVENTS_PORT", 0))}


def sglang_args(version: str, role: RoleSpec, index: int) -> list[str]:
    """The args docs/api.md gives for SGLang, for one pod of the role.

    DP means DP attention over ``tp * dp`` GPUs (``--tp-size``); a group that
    spans pods is one SGLang server over ``--nnodes`` pods, every pod pointing
    ``--dist-init-addr`` at the leader's block (the group env).
    """
    tp, dp = role.tensor_parallel_size, role.data_parallel_size
    nnodes = dp // role.dp_local
    spans = nnodes > 1
    dist = (
        "$(BERTH_DIST_INIT_ADDRESS):$(BERTH_DIST_INIT_LEADER_PORT)"
        if spans
        else "$(POD_IP):$(BERTH_DIST_INIT_PORT)"
    )
    kv = '{"publisher":"zmq","endpoint":"tcp://*:$(BERTH_KV_EVENTS_PORT)"}'
    args = ["--model-path", "m", "--port", "$(BERTH_HTTP_PORT)"]
    args += ["--nccl-port", "$(BERTH_NCCL_PORT)", "--dist-init-addr", dist]
    args += ["--tp-size", str(tp * dp), "--kv-events-config", kv]
    args += ["--disaggregation-bootstrap-port", "$(BERTH_BOOTSTRAP_PORT)"]
    if dp > 1:
        new = parse_version(version) >= SGLANG_ATTN_DP_SIZE
        legacy = ["--dp-size", str(dp), "--enable-dp-attention"]
        args += ["--attn-dp-size", str(dp)] if new else legacy
    if spans:
        args += ["--nnodes", str(nnodes), "--node-rank", str(index % nnodes)]
    return args


def sglang_extra(case: Case, role: RoleSpec, index: int, env: dict[str, str]) -> dict[str, Any]:
    return {
        "args": render(sglang_args(case.version, role, index), env),
        "dp_attention": role.data_parallel_size > 1,
        "bootstrap": True,
    }


def dynamo_extra(case: Case, role: RoleSpec, index: int, env: dict[str, str]) -> dict[str, Any]:
    vllm = DYNAMO_VLLM[case.version]
    return {
        "kv_endpoint": f"tcp://*:{env['BERTH_KV_EVENTS_PORT']}",
        "vllm_src": str(wheels.source("vllm", vllm)),
    }


ENGINES: dict[str, Engine] = {
    e.preset: e
    for e in (
        Engine(
            "vllm",
            "vllm",
            (*VLLM_VERSIONS, VLLM_NEWEST),
            VLLM_CHECKS,
            vllm_extra,
            narrowed=lambda v: (
                "dp-rpc: no launch_core_engines" if parse_version(v) < (0, 9, 2) else "-"
            ),
        ),
        Engine(
            "sglang",
            "sglang",
            SGLANG_VERSIONS,
            SGLANG_CHECKS,
            sglang_extra,
            narrowed=lambda v: "ServerArgs resolution (model, GPU): writes no port field",
        ),
        Engine(
            "dynamo-vllm",
            "ai-dynamo",
            tuple(DYNAMO_VLLM),
            DYNAMO_CHECKS,
            dynamo_extra,
            DYNAMO_VLLM,
            narrowed=lambda v: "Rust runtime env: by name (third table)",
        ),
    )
}


def cases() -> list[Case]:
    return [
        Case(engine.preset, version, topology)
        for engine in ENGINES.values()
        for version in engine.versions
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


def run_probe(
    engine: str, src: Path, request: dict[str, Any], env: dict[str, str], timeout: float = TIMEOUT
) -> Any:
    """Run the probe; ``None`` means it did not return within the time-out (a hang)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.contract.probe"],
            input=json.dumps(
                {"engine": engine, "src": str(src), "pylib": [str(wheels.pylib())], **request}
            ),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}", **env},
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def check(case: Case) -> Outcome:
    engine = ENGINES[case.engine]
    spec = role_spec(case.engine, engine.preset_version(case.version), case.topology)
    role_spec_ = spec.roles[0]
    try:
        role = resolve_role(spec, role_spec_)
    except PresetError as error:
        return Outcome("refused", str(error))
    src = wheels.source(engine.dist, case.version)
    problems: list[str] = []
    pods = layout(role, case.topology.replicas)
    for index, blocks in enumerate(pods):
        first_rank = first_global_rank(role_spec_, index)
        plan = PortPlan(role, first_rank)
        env = plan.env(Assignment(f"pod-{index}", blocks))
        env.update(role.static_env)
        env.update({name: POD_IP for name in (*role.bind_address_env, "POD_IP")})
        if role.group_env:
            leader = index - index % (role_spec_.data_parallel_size // role_spec_.dp_local)
            env.update(plan.group_env(Assignment("leader", pods[leader]), POD_IP))
        request = {
            "checks": list(engine.checks),
            "tp": role_spec_.tensor_parallel_size,
            "dp": role_spec_.data_parallel_size,
            "dp_local": role_spec_.dp_local,
            "first_rank": first_rank,
            "leader": first_rank == 0,
            "env": env,
            **engine.extra(case, role_spec_, index, env),
        }
        answers = run_probe(engine.dist, src, request, env)
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
            # get_open_port only probes; an *_alt check is another way to configure
            # the same listener; every other listener must be unique.
            if check_name != "scan" and not check_name.endswith("_alt"):
                if port in listeners:
                    problems.append(f"{what} and {listeners[port]} both bind {port}")
                listeners[port] = what
    return problems


@dataclass(frozen=True)
class Recipe:
    """A recipe of docs/api.md: one custom block, the system's own code fills it."""

    system: str
    version: str
    title: str
    #: The recipe's block size for this case, as docs/api.md states it.
    size: int
    request: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.system}-{self.version}-{self.title}".replace(" ", "-")


#: Ray release whose recipe docs/api.md gives, and the vLLM releases it is run with.
RAY = "2.60.0"
RAY_VLLM = ("0.10.2", "0.33.0")
DYNAMO_RANGE = "0.6.1"
#: docs/api.md's Dynamo range recipe: block size and the shell that derives the max.
DYNAMO_RANGE_SIZE = 64
DYNAMO_RANGE_MAX = "echo $((BERTH_DYNAMO_PORT_MIN+63))"


#: Env of the dynamo-vllm preset that only Dynamo's Rust runtime reads (the
#: ai-dynamo-runtime wheel): checked by name in its compiled library.
DYNAMO_RUST_ENV = ("DYN_SYSTEM_PORT", "DYN_TCP_RPC_PORT")


def rust_env(version: str) -> dict[str, bool]:
    return wheels.binary_names("ai-dynamo-runtime", version, DYNAMO_RUST_ENV)


def ray_block(replicas: int, devices: int, dp: bool) -> int:
    """docs/api.md: replicas x tp*pp ports, one more per replica with Ray's DP."""
    return replicas * (devices + 1 if dp else devices)


def recipes() -> list[Recipe]:
    found = []
    for vllm in RAY_VLLM:
        for dp in (False, True):
            replicas, tp = 4, 2
            found.append(
                Recipe(
                    "ray",
                    RAY,
                    f"vLLM {vllm}, {replicas} replicas x TP {tp}" + (", DP" if dp else ""),
                    ray_block(replicas, tp, dp),
                    {"vllm": vllm, "tp": tp, "pp": 1, "ray_replicas": replicas, "ray_dp": dp},
                )
            )
    found.append(
        Recipe(
            "ai-dynamo",
            DYNAMO_RANGE,
            "--dynamo-port-min/max, 2 DP ranks x TP 4",
            DYNAMO_RANGE_SIZE,
            {"tp": 4, "dp_local": 2, "first_rank": 0},
        )
    )
    return found


def check_recipe(recipe: Recipe) -> Outcome:
    """Every port the system's code hands out lies in the recipe's one block."""
    start = POOL_START + 7  # any start: nothing may depend on alignment
    span = PortRange(start, start + recipe.size - 1)
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": POD_IP}
    if recipe.system == "ray":
        request = {
            **recipe.request,
            "checks": ["nixl"],
            "ray_base": start,
            "vllm_src": str(wheels.source("vllm", recipe.request["vllm"])),
        }
        src = wheels.source("ray", recipe.version, ("ray/llm/",))
    else:
        shell = subprocess.run(
            ["sh", "-c", DYNAMO_RANGE_MAX],
            env={"BERTH_DYNAMO_PORT_MIN": str(start)},
            capture_output=True,
            text=True,
            check=True,
        )
        request = {
            **recipe.request,
            "checks": ["port_range"],
            "dynamo_range": [start, int(shell.stdout)],
        }
        src = wheels.source("ai-dynamo", recipe.version)
    answers = run_probe(recipe.system, src, request, env)
    if answers is None:
        return Outcome("fail", "the code did not return (hang)")
    problems = [f"{c}: {a['error']}" for c, a in answers.items() if "error" in a]
    ports = [(w, p) for a in answers.values() for w, p in a.get("ports", [])]
    problems += [f"{w} binds {p}, outside {span}" for w, p in ports if p is None or p not in span]
    if not ports:
        problems.append("no port reported")
    return Outcome("fail", "; ".join(problems)) if problems else Outcome("pass")


def table(outcomes: dict[str, Outcome]) -> str:
    """The markdown table of docs/api.md, from every case's outcome."""
    head = "| engine | version | " + " | ".join(t.title for t in TOPOLOGIES) + " | not run |"
    lines = [head, "|" + " --- |" * (3 + len(TOPOLOGIES))]
    versions = dict.fromkeys((c.engine, c.version) for c in cases())
    for engine, version in versions:
        cells = [outcomes[Case(engine, version, t).id].cell() for t in TOPOLOGIES]
        label = ENGINES[engine].label(version)
        narrowed = ENGINES[engine].narrowed(version)
        lines.append(f"| {engine} | {label} | " + " | ".join(cells) + f" | {narrowed} |")
    lines += ["", "| recipe | version | case | block | result |", "| --- | --- | --- | --- | --- |"]
    for recipe in recipes():
        cell = outcomes[recipe.id].cell()
        lines.append(
            f"| {recipe.system} | {recipe.version} | {recipe.title} | {recipe.size} | {cell} |"
        )
    lines += ["", "| engine | version | env read by compiled code only | found by name |"]
    lines.append("| --- | --- | --- | --- |")
    for version in DYNAMO_VLLM:
        names = rust_env(version)
        found = (
            "yes"
            if all(names.values())
            else "**MISSING** " + ", ".join(n for n, ok in names.items() if not ok)
        )
        lines.append(f"| dynamo-vllm | {version} | {', '.join(names)} | {found} |")
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
    outcomes = {c.id: check(c) for c in cases()} | {r.id: check_recipe(r) for r in recipes()}
    for case_id, outcome in outcomes.items():
        print(f"{case_id}: {outcome.status} {outcome.detail}")
    if "--write-table" in argv:
        write_table(table(outcomes))
    return 0 if all(o.status != "fail" for o in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
