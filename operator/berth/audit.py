"""The range audit: one JSON line per allocate, release, reclaim, exhaustion, repair or conflict.

Lines go to the ``berth.audit`` logger as ready-made JSON so that any log
pipeline can replay them; ``tests`` rebuild the final ledger from them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from berth.allocator.ranges import PortRange
from berth.ledger.records import Holder

Action = Literal["allocate", "release", "reclaim", "exhausted", "repair", "conflict"]

logger = logging.getLogger("berth.audit")


def record(
    action: Action,
    holder: Holder,
    *,
    reason: str,
    node: str,
    blocks: Mapping[str, PortRange] | None = None,
    pool: str = "",
) -> None:
    line = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "audit": action,
        "reason": reason,
        "node": node,
        "namespace": holder.namespace,
        "pod": holder.pod,
        "uid": holder.uid,
        "deployment": holder.deployment,
        "role": holder.role,
        "blocks": {name: str(rng) for name, rng in (blocks or {}).items()},
        "pool": pool,
    }
    logger.info(json.dumps(line, separators=(",", ":")))


def configure_audit_stream() -> None:
    """Audit lines are bare JSON on stdout, whatever format kopf logs in."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
