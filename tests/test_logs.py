"""The daemons' loggers (gpuorch/logs.py), each case in its own interpreter: structlog's configuration is global."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.harness import REPO


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )


def test_a_logger_made_before_logging_is_configured_follows_the_configuration_and_keeps_its_methods_after():
    done = run(
        """
        from gpuorch.logs import configure_logging, get_logger
        log = get_logger("coordinator.jobs")  # at import time, as modules do
        configure_logging("info", "json")
        log.debug("not shown")
        log.info("shown", job="j-1")
        log.info("shown again", job="j-2")
        print("kept" if "info" in vars(log) and "debug" in vars(log) else "not kept")
        """
    )
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(event["event"], event["job"], event["level"]) for event in events] == [
        ("shown", "j-1", "info"),
        ("shown again", "j-2", "info"),
    ]
    assert done.stdout.strip() == "kept"


def test_a_logger_used_before_logging_is_configured_keeps_nothing_and_then_follows_the_configuration():
    done = run(
        """
        import structlog
        from gpuorch.logs import configure_logging, get_logger
        log = get_logger("agent")
        log.info("before", n=1)  # structlog's defaults: printed to stdout, not kept
        print("kept" if "info" in vars(log) else "not kept")
        configure_logging("warning", "json")
        log.info("filtered")
        log.warning("after", n=2)
        """
    )
    assert "before" in done.stdout and "not kept" in done.stdout
    assert [json.loads(line)["event"] for line in done.stderr.splitlines()] == ["after"]
