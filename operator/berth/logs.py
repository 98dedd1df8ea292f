"""Where the operator's logs go: kopf's formatter on stderr, the audit on stdout."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import kopf

from berth.audit import configure_audit_stream

LOG_LEVELS = ("debug", "info", "warning")
LOG_FORMATS = {"text": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def configure_logging(level: str, format: str) -> None:
    """JSON lines for log pipelines, plain text for humans; the audit is always JSON."""
    _require("BERTH_LOG_LEVEL", level, LOG_LEVELS)
    _require("BERTH_LOG_FORMAT", format, LOG_FORMATS)
    # kopf's own formatter adds the object (namespace/name) to every line it logs.
    kopf.configure(debug=level == "debug", log_format=LOG_FORMATS[format])
    logging.getLogger().setLevel(level.upper())
    if level != "debug":
        # One INFO line per handled pod event is noise at thousands of pods.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    configure_audit_stream()


def _require(variable: str, value: str, allowed: Iterable[str]) -> None:
    if value not in allowed:
        raise SystemExit(f"{variable} must be one of {', '.join(allowed)}, not {value!r}")
