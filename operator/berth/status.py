"""An InferenceDeployment's status, computed from what was observed: pure, no I/O.

The reconcile gathers :class:`Observed` facts and writes what
:func:`deployment_status` returns; conditions keep their lastTransitionTime
while their status holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from berth.allocator.ranges import PortRange
from berth.api import Condition, InferenceDeploymentStatus, RoleStatus

#: Longest Degraded message written (the API allows more; humans read less).
MAX_MESSAGE = 1000


@dataclass
class Observed:
    """What one reconcile saw of a deployment."""

    generation: int
    roles: list[RoleStatus]
    #: node -> blocks delivered to the live pods on it
    delivered: list[tuple[str, Mapping[str, PortRange]]] = field(default_factory=list)
    bound: int = 0
    #: Why pods wait for ports (one reason per waiting pod).
    waiting: list[str] = field(default_factory=list)
    #: The scheduler's message for each pod no node has berth.dev/ports for.
    unschedulable: list[str] = field(default_factory=list)
    #: Port conflicts involving this deployment's pods (docs/design.md, repair).
    conflicts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Ports the engines may bind that their presets cannot pin (engines/).
    warnings: list[str] = field(default_factory=list)
    #: Objects Berth needs whose names someone else's objects hold.
    clashes: list[str] = field(default_factory=list)


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Condition:
    return Condition(
        type=type_,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def summary(delivered: Sequence[tuple[str, Mapping[str, PortRange]]]) -> str:
    """``node-a: 20000-20011, node-b: 20000-20003``: the span each node uses."""
    spans: dict[str, tuple[int, int]] = {}
    for node, blocks in delivered:
        for span in blocks.values():
            low, high = spans.get(node, (span.start, span.end))
            spans[node] = (min(low, span.start), max(high, span.end))
    return ", ".join(f"{n}: {a}-{b}" for n, (a, b) in sorted(spans.items()))[:500]


def deployment_status(
    observed: Observed, previous: InferenceDeploymentStatus | None, now: datetime | None = None
) -> InferenceDeploymentStatus:
    generation = observed.generation
    desired = sum(r.desired for r in observed.roles)
    ready = sum(r.ready for r in observed.roles)
    allocated = sum(r.allocated for r in observed.roles)
    problems, waiting = observed.clashes + observed.problems, observed.waiting
    if waiting:
        ports_ok, ports_reason = False, "PortsExhausted"
        ports_msg = f"{len(waiting)} pod(s) waiting for ports: {waiting[0]}"
    elif observed.unschedulable:
        ports_ok, ports_reason = False, "InsufficientPorts"
        ports_msg = (
            f"{len(observed.unschedulable)} pod(s) wait for the scheduler: no node has "
            f"enough berth.dev/ports left ({observed.unschedulable[0]})"
        )[:MAX_MESSAGE]
    else:
        ports_ok = allocated >= observed.bound
        ports_reason = "Allocated" if ports_ok else "Pending"
        ports_msg = f"{allocated} of {desired} pods have their ports"
    all_ready = ready == desired and not problems and not waiting
    conditions = [
        _condition(
            "Ready",
            all_ready,
            "AllReady" if all_ready else "NotReady",
            f"{ready}/{desired} pods ready",
            generation,
        ),
        _condition(
            "Progressing",
            not all_ready and not problems,
            "Reconciling" if not all_ready else "Complete",
            f"{allocated}/{desired} allocated, {ready}/{desired} ready",
            generation,
        ),
        _condition("PortsAllocated", ports_ok, ports_reason, ports_msg, generation),
        _condition(
            "PortsPinned",
            not observed.warnings,
            "UnpinnedPorts" if observed.warnings else "AllPinned",
            degraded_message(observed.warnings)
            or "every port the engines bind is pinned inside their blocks",
            generation,
        ),
        _condition(
            "PortConflict",
            bool(observed.conflicts),
            "PortConflict" if observed.conflicts else "NoConflict",
            "; ".join(observed.conflicts)[:MAX_MESSAGE] or "no port held twice",
            generation,
        ),
        degraded_condition(
            problems, generation, "NameClash" if observed.clashes else "ReconcileError"
        ),
    ]
    by_name = {role.name: f"{role.ready}/{role.desired}" for role in observed.roles}
    return InferenceDeploymentStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous, conditions, now),
        roles=observed.roles,
        summary=summary(observed.delivered),
        prefill=by_name.get("prefill"),
        decode=by_name.get("decode"),
    )


def degraded_condition(
    problems: Sequence[str], generation: int, reason: str = "ReconcileError"
) -> Condition:
    return _condition(
        "Degraded",
        bool(problems),
        reason if problems else "AsExpected",
        degraded_message(problems) or "no problems",
        generation,
    )


def degraded_message(problems: Sequence[str]) -> str:
    """Problems as one condition message, cut to what humans read."""
    return "; ".join(problems)[:MAX_MESSAGE]


def merge_conditions(
    previous: InferenceDeploymentStatus | None,
    new: Sequence[Condition],
    now: datetime | None = None,
) -> list[Condition]:
    """Old conditions with ``new`` laid over them; a condition whose status did
    not change keeps its lastTransitionTime."""
    stamp = (now or datetime.now(UTC)).replace(microsecond=0)
    merged = {c.type: c for c in (previous.conditions or ())} if previous else {}
    for condition in new:
        before = merged.get(condition.type)
        same = before is not None and before.status == condition.status
        since = before.last_transition_time if same and before else None
        merged[condition.type] = condition.model_copy(
            update={"last_transition_time": since or stamp}
        )
    return list(merged.values())


def active_message(
    status: InferenceDeploymentStatus | None, type_: str, value: str = "True"
) -> str | None:
    """The message of a condition that has ``value`` now (to post an Event only once)."""
    condition = status.condition(type_) if status else None
    if condition is not None and condition.status == value:
        return condition.message
    return None
