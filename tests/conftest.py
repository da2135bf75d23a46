from __future__ import annotations

import os
import sys

# Before anything imports grpc: the test process forks only to exec (pexpect's pty.fork for gpuctl
# run/attach), and gRPC's fork handler, which restarts its poller in the child, makes such a child
# abort before its exec now and then (see tests/test_fork_safety.py). The daemons never fork.
if "grpc" in sys.modules:
    raise RuntimeError("grpc was imported before tests/conftest.py could turn its fork support off")
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import pytest

from tests.harness import SUMMARY_LINES, LocalCluster
from tests.postgres_server import PostgresServer, PostgresUnavailable


@pytest.fixture
def cluster(tmp_path):
    """A LocalCluster, stopped (every process) at the end of the test; logs printed on failure."""
    local = LocalCluster(tmp_path)
    yield local
    local.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server (tests/postgres_server.py) for the whole session, removed at the end.

    Fails, never skips, where PostgreSQL is missing: the message says how to install it."""
    try:
        server = PostgresServer.start(fsync=False)
    except PostgresUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a fresh, empty database on the session's PostgreSQL server, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.ensure_running()  # a test that stops the server may fail before it starts it again
    postgres_server.drop_database(url)


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
