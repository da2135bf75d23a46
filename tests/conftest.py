from __future__ import annotations

import pytest

from tests.harness import SUMMARY_LINES, LocalCluster


@pytest.fixture
def cluster(tmp_path):
    """A LocalCluster, stopped (every process) at the end of the test; logs printed on failure."""
    local = LocalCluster(tmp_path)
    yield local
    local.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "cluster" in item.funcargs:
        local = item.funcargs["cluster"]
        daemons = ([local.coordinator] if local.coordinator else []) + list(local.agents.values())
        for daemon in daemons:
            try:
                tail = daemon.output()[-3000:]
            except OSError:
                continue
            report.sections.append((f"{daemon.name} log (tail)", tail))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)
