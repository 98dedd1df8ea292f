"""Inclusive port ranges, the unit every layer speaks."""

from __future__ import annotations

from dataclasses import dataclass

MIN_PORT = 1
MAX_PORT = 65535


@dataclass(frozen=True, order=True, slots=True)
class PortRange:
    """Ports ``start`` to ``end``, both included (how humans write ranges)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not MIN_PORT <= self.start <= self.end <= MAX_PORT:
            raise ValueError(f"invalid port range {self.start}-{self.end}")

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def overlaps(self, other: PortRange) -> bool:
        return self.start <= other.end and other.start <= self.end

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Parse ``"20000-29999"`` or a single port ``"8000"``."""
        first, _, last = text.strip().partition("-")
        try:
            start = int(first)
            end = int(last) if last else start
        except ValueError:
            raise ValueError(f"not a port range: {text!r}") from None
        return cls(start, end)
