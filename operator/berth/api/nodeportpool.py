"""The NodePortPool API (cluster-scoped, ``berth.dev/v1alpha1``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from berth.allocator.ranges import PortRange
from berth.api.common import ApiModel, Port, ResourceObject, StatusModel, cel, validations

#: Ports below this need privileges (and belong to system services).
PRIVILEGED_END = 1023
#: Kubernetes' default Service NodePort range.
NODEPORT_RANGE = PortRange(30000, 32767)
#: Ports others pick at random: Linux's default ephemeral range
#: (net.ipv4.ip_local_port_range 32768-60999, shared by the host and every
#: hostNetwork pod: connect() and bind(0) take ports from it), and the range
#: pyzmq's bind_to_random_port uses (49152-65535; SGLang's DP workers bind there).
EPHEMERAL_RANGE = PortRange(32768, 65535)

MAX_RANGES = 16
MAX_RESERVED = 64

_PRIVILEGED_MESSAGE = (
    "ranges must not include ports below 1024 (privileged, used by system services); "
    "set allowUnsafeRanges: true to allow it"
)
_NODEPORT_MESSAGE = (
    "ranges must not overlap the Kubernetes NodePort range 30000-32767; "
    "set allowUnsafeRanges: true to allow it"
)
_EPHEMERAL_MESSAGE = (
    "ranges must stay below 32768: the Linux ephemeral port range 32768-60999 goes to "
    "outgoing connections and ZeroMQ's random ports (SGLang) take 49152-65535; set "
    "allowUnsafeRanges: true if the nodes use a different ip_local_port_range"
)
_OVERLAP_MESSAGE = "ranges must not overlap each other"
_RESERVED_MESSAGE = "every reserved port or range must lie inside one of the ranges"
_ORDER_MESSAGE = "start must be less than or equal to end"
_VALUES_MESSAGE = (
    "values must be non-empty for operators In and NotIn, and empty for Exists and DoesNotExist"
)


class LabelSelectorRequirement(ApiModel):
    """A node label requirement."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.operator in ['In', 'NotIn'] ? "
                "(has(self.values) && size(self.values) > 0) : "
                "(!has(self.values) || size(self.values) == 0)",
                _VALUES_MESSAGE,
                field_path=".values",
            )
        )
    )

    key: Annotated[str, Field(min_length=1, max_length=317)]
    """Label key."""

    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""

    values: Annotated[list[Annotated[str, Field(max_length=63)]] | None, Field(max_length=64)] = (
        None
    )
    """Label values (In and NotIn only)."""

    @model_validator(mode="after")
    def _check(self) -> LabelSelectorRequirement:
        needs_values = self.operator in ("In", "NotIn")
        if needs_values != bool(self.values):
            raise ValueError(_VALUES_MESSAGE)
        return self

    def matches(self, labels: dict[str, str] | Any) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        inside = present and labels[self.key] in (self.values or ())
        return inside if self.operator == "In" else not inside


class NodeSelector(ApiModel):
    """Which nodes a pool covers (a label selector; empty selects every node)."""

    match_labels: dict[str, str] | None = None
    """Labels a node must have, with these values."""

    match_expressions: Annotated[list[LabelSelectorRequirement] | None, Field(max_length=16)] = None
    """Further requirements; all must hold."""

    def matches(self, labels: dict[str, str] | Any) -> bool:
        for key, value in (self.match_labels or {}).items():
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.match_expressions or ())


class PoolRange(ApiModel):
    """An inclusive port range, e.g. start 20000, end 29999."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.start <= self.end", _ORDER_MESSAGE, field_path=".end")
        )
    )

    start: Port
    """First port."""

    end: Port
    """Last port (included)."""

    @model_validator(mode="after")
    def _check(self) -> PoolRange:
        if self.start > self.end:
            raise ValueError(_ORDER_MESSAGE)
        return self

    def to_range(self) -> PortRange:
        return PortRange(self.start, self.end)


class ReservedPorts(ApiModel):
    """A port (start only) or inclusive range Berth never hands out."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.end) || self.start <= self.end", _ORDER_MESSAGE, field_path=".end")
        )
    )

    start: Port
    """The port, or the first port of the range."""

    end: Port | None = None
    """Last port of the range (included). Omitted: just start."""

    @model_validator(mode="after")
    def _check(self) -> ReservedPorts:
        if self.end is not None and self.start > self.end:
            raise ValueError(_ORDER_MESSAGE)
        return self

    def to_range(self) -> PortRange:
        return PortRange(self.start, self.end if self.end is not None else self.start)


class NodePortPoolSpec(ApiModel):
    """Port ranges Berth may hand out on the nodes the selector covers."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.ranges.all(a, a.start > a.end || self.ranges.exists_one(b, "
                "b.start <= b.end && a.start <= b.end && b.start <= a.end))",
                _OVERLAP_MESSAGE,
                field_path=".ranges",
            ),
            cel(
                "self.allowUnsafeRanges || self.ranges.all(r, r.start > 1023)",
                _PRIVILEGED_MESSAGE,
                field_path=".ranges",
            ),
            cel(
                "self.allowUnsafeRanges || self.ranges.all(r, r.end < 30000 || r.start > 32767)",
                _NODEPORT_MESSAGE,
                field_path=".ranges",
            ),
            cel(
                "self.allowUnsafeRanges || self.ranges.all(r, r.end < 32768)",
                _EPHEMERAL_MESSAGE,
                field_path=".ranges",
            ),
            cel(
                "!has(self.reserved) || self.reserved.all(p, self.ranges.exists(r, "
                "r.start <= p.start && (has(p.end) ? p.end : p.start) <= r.end))",
                _RESERVED_MESSAGE,
                field_path=".reserved",
            ),
        )
    )

    node_selector: NodeSelector | None = None
    """Nodes this pool covers (label selector). Omitted or empty: every node."""

    ranges: Annotated[list[PoolRange], Field(min_length=1, max_length=MAX_RANGES)]
    """Port ranges to hand out, non-overlapping. Keep them below 32768 (the node's
    ephemeral range, then ZeroMQ's random ports) and away from the NodePort range
    (30000-32767)."""

    reserved: Annotated[list[ReservedPorts] | None, Field(max_length=MAX_RESERVED)] = None
    """Ports or ranges inside ranges that Berth must never hand out (e.g. a node agent's
    port)."""

    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    """When several pools select a node, the highest priority wins (ties: the name that
    sorts first)."""

    allow_unsafe_ranges: bool = False
    """Allow ranges below 1024, overlapping the NodePort range (30000-32767) or at
    32768 and above (ephemeral and random ports), e.g. on nodes whose
    ip_local_port_range differs."""

    @model_validator(mode="after")
    def _check(self) -> NodePortPoolSpec:
        ranges = [r.to_range() for r in self.ranges]
        for i, a in enumerate(ranges):
            if any(a.overlaps(b) for b in ranges[i + 1 :]):
                raise ValueError(_OVERLAP_MESSAGE)
        if not self.allow_unsafe_ranges:
            for r in ranges:
                if r.start <= PRIVILEGED_END:
                    raise ValueError(_PRIVILEGED_MESSAGE)
                if r.overlaps(NODEPORT_RANGE):
                    raise ValueError(_NODEPORT_MESSAGE)
                if r.overlaps(EPHEMERAL_RANGE):
                    raise ValueError(_EPHEMERAL_MESSAGE)
        for p in self.reserved or ():
            span = p.to_range()
            if not any(r.start <= span.start and span.end <= r.end for r in ranges):
                raise ValueError(_RESERVED_MESSAGE)
        return self


class NodePortPoolStatus(StatusModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = None
    """metadata.generation the status reflects."""

    nodes: int | None = None
    """Nodes this pool currently covers."""

    ports: int | None = None
    """Ports each covered node offers (ranges minus reserved)."""

    used: int | None = None
    """Ports currently allocated from this pool, over all its nodes."""

    ephemeral_overlap: list[str] | None = None
    """Nodes whose ephemeral port range (net.ipv4.ip_local_port_range, reported by the
    node agent) overlaps this pool outside net.ipv4.ip_local_reserved_ports: outgoing
    connections there can take pool ports. Each also gets an EphemeralPortOverlap Event."""


class NodePortPool(ResourceObject):
    """Port ranges Berth hands out on a group of nodes (cluster-scoped).

    Nodes no pool selects use the operator's default pool (20000-29999).
    """

    kind: str = "NodePortPool"
    spec: NodePortPoolSpec
    status: NodePortPoolStatus | None = None
