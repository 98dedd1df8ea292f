"""Invariants I1-I3 (docs/design.md), judged from what the pods received.

Berth's own books (the ledgers) are not the truth a test can trust: a ledger
that lost a pod would agree with itself. These checks read what each pod was
*given*: its ``berth.dev/ports`` annotation and the values its containers'
``configMapKeyRef`` env vars resolve to, resolved the way the kubelet does.
Foreign host ports (``hostPort``, and ``containerPort`` of hostNetwork pods
Berth does not manage) count too. The ledgers get a separate assertion: they
must agree with what was delivered.

Nothing here imports Berth: the formats are parsed by this module's own small
parsers, so a bug in Berth's codecs cannot hide a bug in Berth.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Body = Mapping[str, Any]
Span = tuple[int, int]  # inclusive first and last port

MANAGED_BY = ("app.kubernetes.io/managed-by", "berth")
PORTS_ANNOTATION = "berth.dev/ports"
PLAN_ANNOTATION = "berth.dev/port-plan"
LEDGER_LABEL = "berth.dev/ledger"
LEDGER_NODE_ANNOTATION = "berth.dev/node"
LEDGER_NAMESPACE = "berth-system"
TERMINAL_PHASES = ("Succeeded", "Failed")


class InvariantViolation(AssertionError):
    """What the checker found; an AssertionError so ``wait_for`` loops can retry it."""

    def __init__(self, violations: Iterable[str]) -> None:
        self.violations = list(violations)
        super().__init__("\n".join(self.violations))


# --- parsers of Berth's formats (independent of berth.*) -----------------------


def parse_span(text: str) -> Span:
    """``"20000"`` or ``"20001-20008"``."""
    first, _, last = text.strip().partition("-")
    start = int(first)
    end = int(last) if last else start
    if not 1 <= start <= end <= 65535:
        raise ValueError(f"not a port range: {text!r}")
    return start, end


def parse_ports_annotation(text: str) -> dict[str, Span]:
    """``{"http":"20000","nixl":"20001-20008"}`` -> block -> span."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{PORTS_ANNOTATION} is not an object: {text!r}")
    return {str(name): parse_span(str(value)) for name, value in data.items()}


@dataclass(frozen=True)
class PlanBlock:
    name: str
    size: int
    # env var -> ports subtracted per rank ("rankBase"), or None for "start"
    env: dict[str, int | None]


@dataclass(frozen=True)
class Plan:
    """The ``berth.dev/port-plan`` annotation: how env values map to blocks."""

    first_rank: int
    blocks: tuple[PlanBlock, ...]

    def block_of(self, env: str) -> tuple[PlanBlock, int | None] | None:
        for block in self.blocks:
            if env in block.env:
                return block, block.env[env]
        return None


def parse_plan(text: str) -> Plan:
    data = json.loads(text)
    blocks = tuple(
        PlanBlock(
            str(b["name"]),
            int(b["size"]),
            {str(n): (int(p) if kind == "rankBase" else None) for n, kind, p in b["env"]},
        )
        for b in data["blocks"]
    )
    return Plan(int(data["firstRank"]), blocks)


@dataclass(frozen=True)
class LedgerEntry:
    namespace: str
    pod: str
    blocks: dict[str, Span]


@dataclass(frozen=True)
class Ledger:
    """``berth-ledger.<node>``: ``pool`` plus ``<uid>: "<ns> <pod> <dep> <role> a=1,b=2-3"``."""

    node: str
    entries: dict[str, LedgerEntry]


def parse_ledger(cm: Body) -> Ledger:
    node = cm["metadata"]["annotations"][LEDGER_NODE_ANNOTATION]
    entries: dict[str, LedgerEntry] = {}
    for key, line in (cm.get("data") or {}).items():
        if key == "pool":
            continue
        namespace, pod, _deployment, _role, record = line.split(" ", 4)
        blocks: dict[str, Span] = {}
        for item in filter(None, record.split(",")):
            name, sep, ports = item.partition("=")
            if not sep or name in blocks:
                raise ValueError(f"ledger {node}, {key}: bad record {record!r}")
            blocks[name] = parse_span(ports)
        entries[key] = LedgerEntry(namespace, pod, blocks)
    return Ledger(node, entries)


# --- what a pod received ------------------------------------------------------


def is_berth(pod: Body) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return labels.get(MANAGED_BY[0]) == MANAGED_BY[1]


def is_live(pod: Body) -> bool:
    """Bound and not finished: its processes may hold ports on its node."""
    return bool(pod.get("spec", {}).get("nodeName")) and (
        pod.get("status", {}).get("phase") not in TERMINAL_PHASES
    )


def pod_label(pod: Body) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{meta['name']} ({meta['uid'][:8]})"


def _containers(pod: Body) -> list[Body]:
    spec = pod.get("spec", {})
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def resolve_env(
    pod: Body, container: Body, configmaps: Mapping[tuple[str, str], Body]
) -> tuple[dict[str, str], list[str]]:
    """The container's configMapKeyRef env as the kubelet resolves it.

    As in kubelet's makeEnvironmentVariables: ``envFrom`` first, then ``env``
    in order, a later entry overriding an earlier one of the same name; a
    missing ConfigMap or key is an error (the container does not start)
    unless the reference is optional, in which case the variable is unset.
    Returns (name -> value, errors).
    """
    namespace = pod["metadata"]["namespace"]
    values: dict[str, str] = {}
    errors: list[str] = []
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is None:
            continue
        cm = configmaps.get((namespace, ref["name"]))
        if cm is None:
            if not ref.get("optional"):
                errors.append(f"configmap {ref['name']} missing")
            continue
        prefix = source.get("prefix", "")
        values.update({prefix + k: v for k, v in (cm.get("data") or {}).items()})
    for env in container.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
        if ref is None:
            values.pop(env["name"], None)  # a literal or another source: not a CM value
            continue
        data = (configmaps.get((namespace, ref["name"])) or {}).get("data")
        if data is None or ref["key"] not in data:
            values.pop(env["name"], None)
            if not ref.get("optional"):
                errors.append(f"{env['name']}: {ref['name']}[{ref['key']}] missing")
            continue
        values[env["name"]] = data[ref["key"]]
    return values, errors


def referenced_configmaps(pod: Body) -> set[str]:
    names = set()
    for container in _containers(pod):
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                names.add(source["configMapRef"]["name"])
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if ref is not None:
                names.add(ref["name"])
    return names


@dataclass
class Delivery:
    """One Berth pod's ports as received: by annotation and by its env."""

    annotation: dict[str, Span] | None
    env_blocks: dict[str, Span]  # block -> span implied by the env values
    env_values: dict[str, str]  # container/VAR -> value (for I3)
    env_errors: list[str]
    problems: list[str]  # unreadable formats, disagreement between the two
    configmap_owned: bool  # every referenced ConfigMap is owned by this pod UID

    def claims(self) -> set[tuple[Span, str]]:
        """(span, how) the pod's processes may bind."""
        spans = {(s, f"annotation {n}") for n, s in (self.annotation or {}).items()}
        spans |= {(s, f"env {n}") for n, s in self.env_blocks.items()}
        return spans


def delivery(pod: Body, configmaps: Mapping[tuple[str, str], Body]) -> Delivery:
    meta = pod["metadata"]
    annotations = meta.get("annotations") or {}
    problems: list[str] = []
    annotation = None
    if PORTS_ANNOTATION in annotations:
        try:
            annotation = parse_ports_annotation(annotations[PORTS_ANNOTATION])
        except (ValueError, TypeError) as error:
            problems.append(f"unreadable {PORTS_ANNOTATION}: {error}")
    plan = None
    try:
        plan = parse_plan(annotations[PLAN_ANNOTATION])
    except (KeyError, ValueError, TypeError) as error:
        problems.append(f"unreadable {PLAN_ANNOTATION}: {error!r}")
    env_blocks: dict[str, Span] = {}
    env_values: dict[str, str] = {}
    env_errors: list[str] = []
    for container in _containers(pod):
        values, errors = resolve_env(pod, container, configmaps)
        env_errors += [f"{container['name']}: {e}" for e in errors]
        for name, value in values.items():
            found = plan.block_of(name) if plan else None
            if found is None:
                continue
            block, per_rank = found
            env_values[f"{container['name']}/{name}"] = value
            try:
                start = int(value) + (plan.first_rank * per_rank if plan and per_rank else 0)
                span = parse_span(f"{start}-{start + block.size - 1}")
            except ValueError:
                problems.append(f"{container['name']}/{name}={value!r} is not a port")
                continue
            if env_blocks.setdefault(block.name, span) != span:
                problems.append(
                    f"env gives block {block.name} both {env_blocks[block.name]} and {span}"
                )
    owned = all(
        any(ref.get("uid") == meta["uid"] for ref in cm["metadata"].get("ownerReferences") or [])
        for name in referenced_configmaps(pod)
        if (cm := configmaps.get((meta["namespace"], name))) is not None
    )
    if annotation is not None and owned:
        for name, span in env_blocks.items():
            given = annotation.get(name)
            if given is None or given[0] != span[0]:
                problems.append(f"env puts block {name} at {span}, the annotation at {given}")
    return Delivery(annotation, env_blocks, env_values, env_errors, problems, owned)


def foreign_claims(pod: Body) -> set[tuple[Span, str]]:
    """Host ports of a pod Berth does not manage (hostNetwork: hostPort = containerPort)."""
    host_network = bool(pod.get("spec", {}).get("hostNetwork"))
    claims = set()
    for container in _containers(pod):
        for port in container.get("ports") or []:
            number = port.get("hostPort") or (port.get("containerPort") if host_network else None)
            if number:
                claims.add(((int(number), int(number)), f"host port of {container['name']}"))
    return claims


# --- the cluster as the pods see it -------------------------------------------


@dataclass
class ClusterState:
    """Pods and ConfigMaps (raw API dicts) and the invariants over them."""

    pods: dict[str, Body] = field(default_factory=dict)  # uid -> pod
    configmaps: dict[tuple[str, str], Body] = field(default_factory=dict)
    # The nodes that exist, when known: a pod bound to a deleted node runs
    # nowhere (the pod garbage collector removes it later).
    node_names: set[str] | None = None

    @classmethod
    def of(
        cls, pods: Iterable[Body], configmaps: Iterable[Body], nodes: Iterable[str] | None = None
    ) -> ClusterState:
        state = cls(node_names=set(nodes) if nodes is not None else None)
        for pod in pods:
            state.pods[pod["metadata"]["uid"]] = pod
        for cm in configmaps:
            state.configmaps[key_of(cm)] = cm
        return state

    def live(self, pod: Body) -> bool:
        return is_live(pod) and (
            self.node_names is None or pod["spec"]["nodeName"] in self.node_names
        )

    def live_on(self, node: str) -> list[Body]:
        return [p for p in self.pods.values() if self.live(p) and p["spec"]["nodeName"] == node]

    def nodes(self) -> set[str]:
        return {p["spec"]["nodeName"] for p in self.pods.values() if self.live(p)}

    def pods_using(self, namespace: str, configmap: str) -> list[Body]:
        return [
            p
            for p in self.pods.values()
            if p["metadata"]["namespace"] == namespace and configmap in referenced_configmaps(p)
        ]

    def node_violations(self, node: str) -> list[str]:
        """I1 on one node, plus pods whose two deliveries disagree."""
        claims: list[tuple[int, int, str, bool, str]] = []
        problems = []
        for pod in self.live_on(node):
            uid = pod["metadata"]["uid"]
            if is_berth(pod):
                got = delivery(pod, self.configmaps)
                problems += [f"{pod_label(pod)}: {p}" for p in got.problems]
                spans = got.claims()
            else:
                spans = foreign_claims(pod)
            label = pod_label(pod) if is_berth(pod) else f"foreign {pod_label(pod)}"
            claims += [(s, e, uid, is_berth(pod), f"{label} {how}") for (s, e), how in spans]
        claims.sort()
        active: list[tuple[int, str, bool, str]] = []
        for start, end, uid, berth, what in claims:
            active = [a for a in active if a[0] >= start]
            for a_end, a_uid, a_berth, a_what in active:
                if a_uid != uid and (berth or a_berth):
                    problems.append(
                        f"I1 on {node}: {a_what} and {what} share ports {start}-{min(end, a_end)}"
                    )
            active.append((end, uid, berth, what))
        return problems

    def overlap_violations(self) -> list[str]:
        return [v for node in sorted(self.nodes()) for v in self.node_violations(node)]

    def delivery_violations(self, namespaces: Iterable[str] | None = None) -> list[str]:
        """I2, the pods' side: every live Berth pod has every block, by both routes."""
        wanted = set(namespaces) if namespaces is not None else None
        problems = []
        for pod in self.pods.values():
            meta = pod["metadata"]
            if not (is_berth(pod) and self.live(pod)) or meta.get("deletionTimestamp"):
                continue
            if wanted is not None and meta["namespace"] not in wanted:
                continue
            got = delivery(pod, self.configmaps)
            plan_blocks = {b.name for b in parse_plan(meta["annotations"][PLAN_ANNOTATION]).blocks}
            if got.annotation is None or set(got.annotation) != plan_blocks:
                problems.append(
                    f"I2: {pod_label(pod)} has ports {got.annotation}, plan {plan_blocks}"
                )
            problems += [f"I2: {pod_label(pod)}: {e}" for e in got.env_errors]
        return problems

    def ledgers(self) -> list[tuple[Body, Ledger | None, str]]:
        out: list[tuple[Body, Ledger | None, str]] = []
        for (namespace, _), cm in sorted(self.configmaps.items()):
            labels = cm["metadata"].get("labels") or {}
            if namespace != LEDGER_NAMESPACE or labels.get(LEDGER_LABEL) != "true":
                continue
            try:
                out.append((cm, parse_ledger(cm), ""))
            except (KeyError, ValueError) as error:
                out.append((cm, None, f"unreadable ledger {cm['metadata']['name']}: {error!r}"))
        return out

    def ledger_violations(self, strict: bool) -> list[str]:
        """The ledgers agree with what was delivered.

        Always: no ledger is unreadable, and no entry claims ports another
        live pod on that node received. ``strict`` (a quiet cluster): every
        ledger entry is exactly a live pod's delivered ports, and every
        delivered live pod is in its node's ledger.
        """
        problems = []
        delivered: dict[str, dict[str, tuple[Body, dict[str, Span]]]] = defaultdict(dict)
        for pod in self.pods.values():
            annotations = pod["metadata"].get("annotations") or {}
            # Bound to a deleted node still counts: the pod object (and its
            # processes, if the machine lives) is there until the pod GC acts.
            if is_berth(pod) and is_live(pod) and PORTS_ANNOTATION in annotations:
                try:
                    blocks = parse_ports_annotation(annotations[PORTS_ANNOTATION])
                except ValueError:
                    continue  # reported by node_violations
                delivered[pod["spec"]["nodeName"]][pod["metadata"]["uid"]] = (pod, blocks)
        ledger_nodes = set()
        for _, ledger, error in self.ledgers():
            if ledger is None:
                problems.append(error)
                continue
            ledger_nodes.add(ledger.node)
            given = delivered.get(ledger.node, {})
            for uid, entry in ledger.entries.items():
                for other, (pod, blocks) in given.items():
                    if other != uid and any(
                        _overlap(a, b) for a in entry.blocks.values() for b in blocks.values()
                    ):
                        problems.append(
                            f"ledger {ledger.node}: {entry.namespace}/{entry.pod} ({uid[:8]}) "
                            f"holds ports delivered to {pod_label(pod)}"
                        )
                if strict and (uid not in given or given[uid][1] != entry.blocks):
                    have = given[uid][1] if uid in given else "no live pod with ports"
                    problems.append(
                        f"ledger {ledger.node}: {entry.namespace}/{entry.pod} ({uid[:8]}) "
                        f"holds {entry.blocks}, delivered: {have}"
                    )
            if strict:
                for uid, (pod, _) in given.items():
                    if uid not in ledger.entries:
                        problems.append(f"ledger {ledger.node} lacks {pod_label(pod)}")
        if strict:
            for node in set(delivered) - ledger_nodes - self._deleted_nodes(delivered):
                problems.append(
                    f"no ledger for {node}, where {len(delivered[node])} pods hold ports"
                )
        return problems

    def _deleted_nodes(self, nodes: Iterable[str]) -> set[str]:
        """Nodes known to be gone: their ledgers go with them (owner references)."""
        return set() if self.node_names is None else set(nodes) - self.node_names


def _overlap(a: Span, b: Span) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def key_of(cm: Body) -> tuple[str, str]:
    return cm["metadata"]["namespace"], cm["metadata"]["name"]


# --- I3 across a whole test ---------------------------------------------------


class StableTracker:
    """I3: the first delivery each pod UID was seen with never changes."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], Any] = {}
        self.violations: list[str] = []

    def observe(self, state: ClusterState, pod: Body) -> None:
        if not is_berth(pod):
            return
        got = delivery(pod, state.configmaps)
        if got.annotation is None:
            return  # not delivered yet: the annotation is written last
        uid = pod["metadata"]["uid"]
        self._same(pod, (uid, "annotation"), got.annotation)
        # The env a container starts with; only once the ConfigMap is this pod's own
        # (a recreated pod's name may still resolve to its predecessor's for a moment).
        if got.configmap_owned and not got.env_errors:
            self._same(pod, (uid, "env"), got.env_values)

    def _same(self, pod: Body, key: tuple[str, str], value: Any) -> None:
        first = self.first.setdefault(key, value)
        if first != value:
            self.violations.append(f"I3: {pod_label(pod)} {key[1]} changed from {first} to {value}")

    def observe_all(self, state: ClusterState) -> None:
        for pod in list(state.pods.values()):
            self.observe(state, pod)


# --- snapshots through kubectl -------------------------------------------------


def snapshot(cluster: Any) -> ClusterState:
    """Every pod and ConfigMap of the cluster, and the nodes that exist.

    ConfigMaps are listed before pods: Berth writes a pod's ConfigMap only
    after the previous holder of those ports is gone, so a ConfigMap in the
    first list never meets that previous holder in the second.
    """
    nodes = [n["metadata"]["name"] for n in cluster.json("get", "nodes")["items"]]
    cms = cluster.json("get", "configmaps", "-A")["items"]
    pods = cluster.json("get", "pods", "-A")["items"]
    return ClusterState.of(pods, cms, nodes)


def check_cluster(
    cluster: Any,
    quiet: bool = True,
    tracker: StableTracker | None = None,
    namespaces: Iterable[str] | None = None,
) -> ClusterState:
    """I1 and the ledgers always; I2 (and strict ledgers) when ``quiet``; I3 with ``tracker``.

    Raises InvariantViolation listing everything found.
    """
    state = snapshot(cluster)
    problems = state.overlap_violations() + state.ledger_violations(strict=quiet)
    if quiet:
        problems += state.delivery_violations(namespaces)
    if tracker is not None:
        tracker.observe_all(state)
        problems += tracker.violations
    if problems:
        raise InvariantViolation(problems)
    return state


def berth_pods(cluster: Any) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-A", "-l", f"{MANAGED_BY[0]}={MANAGED_BY[1]}", "-o", "json"
    ).stdout
    pods: list[dict[str, Any]] = json.loads(out)["items"]
    return pods


def ledger_holders(
    cluster: Any, namespace: str | None = None
) -> dict[str, dict[str, dict[str, Span]]]:
    """node -> uid -> blocks, from the ledgers (for tests about the ledger itself)."""
    view: dict[str, dict[str, dict[str, Span]]] = {}
    for _, ledger, error in snapshot_ledgers(cluster):
        assert ledger is not None, error
        view[ledger.node] = {
            uid: e.blocks
            for uid, e in ledger.entries.items()
            if namespace is None or e.namespace == namespace
        }
    return view


def snapshot_ledgers(cluster: Any) -> list[tuple[Body, Ledger | None, str]]:
    out = cluster.kubectl(
        "get", "configmaps", "-n", LEDGER_NAMESPACE, "-l", f"{LEDGER_LABEL}=true", "-o", "json"
    ).stdout
    return ClusterState.of([], json.loads(out)["items"]).ledgers()
