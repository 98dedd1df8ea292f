"""Operator settings from the environment, and the log formats they pick."""

from __future__ import annotations

import json
import logging

import pytest

from berth.allocator.ranges import PortRange
from berth.config import OperatorConfig
from berth.logs import configure_logging


def test_defaults_without_environment() -> None:
    config = OperatorConfig.from_env({})
    assert config.default_ranges == (PortRange(20000, 29999),)
    assert config.watch_namespaces == ()
    assert (config.log_level, config.log_format) == ("info", "text")


def test_every_setting_is_read() -> None:
    config = OperatorConfig.from_env(
        {
            "BERTH_NAMESPACE": "ops",
            "BERTH_DEFAULT_POOL": "21000-21999, 23000-23099",
            "BERTH_DEFAULT_RESERVED": "21000",
            "BERTH_SWEEP_INTERVAL": "5",
            "BERTH_METRICS_PORT": "9100",
            "BERTH_WATCH_NAMESPACES": "a,b",
            "BERTH_LOG_LEVEL": "DEBUG",
            "BERTH_LOG_FORMAT": "json",
        }
    )
    assert config.namespace == "ops"
    assert config.default_ranges == (PortRange(21000, 21999), PortRange(23000, 23099))
    assert config.default_reserved == (PortRange(21000, 21000),)
    assert (config.sweep_interval, config.metrics_port) == (5.0, 9100)
    assert config.watch_namespaces == ("a", "b")
    assert (config.log_level, config.log_format) == ("debug", "json")


@pytest.mark.parametrize(
    ("level", "format", "named"),
    [("loud", "text", "BERTH_LOG_LEVEL"), ("info", "xml", "BERTH_LOG_FORMAT")],
)
def test_bad_log_settings_stop_with_the_variable_named(level: str, format: str, named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        configure_logging(level, format)


def test_json_format_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("warning", "json")
        logging.getLogger("berth.test").info("hidden below the level")
        logging.getLogger("berth.test").warning("pool %s is full", "gpu-a")
        lines = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["message"] == "pool gpu-a is full"
    assert line["severity"] == "warn"
