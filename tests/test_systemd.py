"""The systemd units, their example configs, and the sd_notify protocol of both daemons.

The units are checked with the real `systemd-analyze` (verify, and the offline
security score); the notify protocol with the real daemon processes talking to a
real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gpuorch
from agent.settings import AgentSettings
from coordinator.control.leadership import EXIT_STEPPED_DOWN
from coordinator.settings import CoordinatorSettings
from gpuorch import sdnotify
from gpuorch.settings import load_settings
from gpuorch.v1 import cluster_pb2
from tests.harness import REPO, Daemon, free_port

SYSTEMD = REPO / "systemd"
UNITS = {"coordinator": SYSTEMD / "gpuorch-coordinator.service", "agent": SYSTEMD / "gpuorch-agent.service"}
CONFIGS = {"coordinator": (SYSTEMD / "coordinator.toml", CoordinatorSettings), "agent": (SYSTEMD / "agent.toml", AgentSettings)}
MAX_EXPOSURE = {"coordinator": 2.0, "agent": 5.0}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")

WATCHDOG_USEC = 400_000
"""What the tests give the daemons: they must ping every 0.2 s."""


# --- the unit files -------------------------------------------------------------------------------


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given in the unit (systemd allows repeating keys)."""
    directives: dict[str, list[str]] = {}
    for raw_line in path.read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def verifiable_copy(unit: Path, directory: Path) -> Path:
    """A copy of `unit` whose ExecStart= binary exists on this machine.

    `systemd-analyze verify` fails a unit whose ExecStart= program does not exist,
    and the units name /usr/local/bin/gpuorch-*, where a package install puts the
    console scripts. The copy points at the same console script in this
    environment (next to the running Python, e.g. .venv/bin), or at a stub
    executable where there is none. Nothing else is changed.
    """
    text = unit.read_text()
    (program,) = re.findall(r"^ExecStart=(\S+)", text, flags=re.MULTILINE)
    local = Path(sys.executable).parent / Path(program).name
    if not os.access(local, os.X_OK):
        local = directory / Path(program).name
        local.write_text("#!/bin/sh\nexit 0\n")
        local.chmod(0o755)
    copy = directory / unit.name
    copy.write_text(text.replace(f"ExecStart={program}", f"ExecStart={local}"))
    return copy


def verify_findings(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about `unit` (empty when it is clean).

    verify exits 0 even for unknown keys or bad values, printing them as warnings,
    so any line about our unit counts. Lines about other units of this host
    (pulled in through After=/Wants=) are not ours to judge and are left out.
    """
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line or str(unit.parent) in line]
    if result.returncode != 0 and not findings:
        findings.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return findings


def exposure(unit: Path) -> float:
    """The overall exposure level `systemd-analyze security --offline=true` gives `unit` (0 best, 10 worst)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
    )
    if "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert match, f"no exposure level in the output of systemd-analyze security:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("daemon", sorted(UNITS))
def test_unit_verifies_cleanly(daemon, tmp_path):
    assert verify_findings(verifiable_copy(UNITS[daemon], tmp_path)) == []


@needs_systemd_analyze
def test_verify_reports_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key and a bad value are reported."""
    unit = verifiable_copy(UNITS["agent"], tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=process", "KilMode=process").replace("Type=notify", "Type=notfy"))
    findings = verify_findings(unit)
    assert any("KilMode" in line for line in findings) and any("notfy" in line for line in findings), findings


@needs_systemd_analyze
@pytest.mark.parametrize("daemon", sorted(UNITS))
def test_unit_exposure_is_low(daemon):
    assert exposure(UNITS[daemon]) <= MAX_EXPOSURE[daemon]


@needs_systemd_analyze
def test_an_unsandboxed_unit_scores_high(tmp_path):
    """The check above can fail: a unit with no sandboxing is far above both limits."""
    unit = tmp_path / "plain.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(unit) > max(MAX_EXPOSURE.values())


def test_a_coordinator_that_stepped_down_is_restarted_as_a_standby():
    unit = unit_directives(UNITS["coordinator"])
    assert unit["RestartForceExitStatus"] == [str(EXIT_STEPPED_DOWN)]
    assert str(EXIT_STEPPED_DOWN) not in " ".join(unit["RestartPreventExitStatus"]).split()


@pytest.mark.parametrize("daemon", sorted(UNITS))
def test_unit_runs_the_daemon_as_a_notify_service_with_a_watchdog(daemon):
    unit = unit_directives(UNITS[daemon])
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30"]
    assert unit["Restart"] == ["on-failure"] and unit["RestartSec"] == ["2"]
    assert unit["ExecStart"] == [f"/usr/local/bin/gpuorch-{daemon} --config /etc/gpuorch/{daemon}.toml"]
    assert unit["StateDirectory"] == [f"gpuorch/{daemon}"]
    # The coordinator gives in-flight calls 5 s (Coordinator.stop), then flushes the store.
    assert int(unit["TimeoutStopSec"][0]) >= 15
    config, settings_class = CONFIGS[daemon]
    state_dir = load_settings(settings_class, config_file=config, env={}).state_dir
    assert state_dir == f"/var/lib/{unit['StateDirectory'][0]}", "the config's state_dir must be the unit's StateDirectory="


def test_agent_unit_leaves_ranks_running_on_stop_and_restart():
    agent = unit_directives(UNITS["agent"])
    assert agent["KillMode"] == ["process"]
    assert agent["OOMPolicy"] == ["continue"]  # a rank's OOM kill must not stop the agent
    assert "DynamicUser" not in agent and "User" not in agent  # root: it starts ranks as their owners
    coordinator = unit_directives(UNITS["coordinator"])
    assert coordinator["DynamicUser"] == ["yes"] and coordinator["CapabilityBoundingSet"] == [""]


# --- the example configs --------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", sorted(CONFIGS))
def test_example_config_loads(daemon):
    path, cls = CONFIGS[daemon]
    settings = load_settings(cls, config_file=path, env={})
    settings.validate()
    assert settings.log_format == "json"


@pytest.mark.parametrize("daemon", sorted(CONFIGS))
def test_commented_settings_in_example_config_are_real_settings(daemon, tmp_path):
    """Every `# key = value` line, uncommented, is a known setting with a valid value."""
    path, cls = CONFIGS[daemon]
    text = path.read_text()
    commented = re.findall(r"^# ?([a-z_]+ = .+)$", text, flags=re.MULTILINE)
    assert len(commented) >= 5
    uncommented = tmp_path / path.name
    uncommented.write_text(text + "\n" + "\n".join(commented) + "\n")
    load_settings(cls, config_file=uncommented, env={}).validate()


# --- sd_notify ------------------------------------------------------------------------------------


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket that records what a daemon sends to it.

    A thread drains it as systemd does, so the sender never finds it full and each
    datagram's arrival time is the time it was sent.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []
        """(arrival time.monotonic(), KEY -> VALUE) of every datagram, in order."""
        self._arrived = threading.Condition()
        self._read = 0
        self._reader = threading.Thread(target=self._drain, name="notify-socket", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._arrived:
                self.messages.append((time.monotonic(), fields))
                self._arrived.notify_all()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)

    def wait_for(
        self, key: str, value: str = "1", timeout: float = 15.0, process: subprocess.Popen | None = None
    ) -> dict[str, str]:
        """Returns the next datagram (after those already waited for) with KEY=VALUE.

        Fails after `timeout` seconds, or as soon as `process` has exited.
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                while self._read < len(self.messages):
                    _, fields = self.messages[self._read]
                    self._read += 1
                    if fields.get(key) == value:
                        return fields
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"the daemon exited ({process.returncode}) before sending {key}={value}")
                if time.monotonic() >= deadline:
                    raise AssertionError(
                        f"no {key}={value} within {timeout}s; received {[fields for _, fields in self.messages]}"
                    )
                self._arrived.wait(min(0.1, max(deadline - time.monotonic(), 0)))

    def pings_since(self, since: float) -> list[float]:
        with self._arrived:
            return [arrival for arrival, fields in self.messages if arrival >= since and fields.get("WATCHDOG") == "1"]


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    listener = NotifySocket(str(path))
    yield listener
    listener.close()


@pytest.fixture
def abstract_notify_socket():
    listener = NotifySocket(f"@gpuorch-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def notify_env(listener: NotifySocket) -> dict[str, str]:
    # WATCHDOG_PID empty: the daemon's pid is not known before it starts (and one inherited from
    # a test runner under systemd must not leak in).
    return {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": ""}


def assert_watchdog_pings(listener: NotifySocket, seconds: float = 1.0) -> None:
    start = time.monotonic()
    time.sleep(seconds)
    pings = listener.pings_since(start)
    expected = seconds / (WATCHDOG_USEC / 2 / 1e6)
    assert len(pings) >= expected / 2, f"{len(pings)} WATCHDOG=1 in {seconds}s, expected about {expected:.0f}"
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert 0.1 <= statistics.median(gaps) <= 0.35, f"watchdog pings {gaps} apart, expected 0.2 s"


def health(address: str, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_notify_is_a_no_op_without_a_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False and sdnotify.watchdog() is False and sdnotify.stopping() is False


def test_notify_sends_to_a_path_and_an_abstract_socket(monkeypatch, notify_socket, abstract_notify_socket):
    for listener in (notify_socket, abstract_notify_socket):
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        assert sdnotify.ready("serving on here")
        assert listener.wait_for("READY", timeout=2) == {"READY": "1", "STATUS": "serving on here"}
        assert sdnotify.stopping()
        listener.wait_for("STOPPING", timeout=2)


def test_a_vanished_notify_socket_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.watchdog() is False


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("400000", None, 0.2),
        ("30000000", None, 15.0),
        ("400000", "own", 0.2),
        ("400000", "other", None),  # inherited from a parent: not ours to ping
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, interval):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", {"own": str(os.getpid()), "other": "1"}.get(pid or ""))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_interval() == interval


async def test_watchdog_pings_stop_while_the_event_loop_is_stuck(monkeypatch, abstract_notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    task = sdnotify.start_watchdog()
    assert task is not None
    await asyncio.sleep(0.3)
    time.sleep(0.5)  # noqa: ASYNC251 - the point: a blocking call on the loop
    await asyncio.sleep(0.3)
    task.cancel()
    pings = abstract_notify_socket.pings_since(0)
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert len(pings) >= 5 and max(gaps) >= 0.45 and statistics.median(gaps) < 0.1, gaps


def start_coordinator(root: Path, port: int, env: dict[str, str], run: tuple[str, ...] = ("-m", "coordinator.main")) -> Daemon:
    argv = [
        sys.executable, *run,
        "--listen", f"127.0.0.1:{port}",
        "--state-dir", str(root / "coordinator"),
        "--log-format", "json",
    ]  # fmt: skip
    return Daemon("coordinator", argv, root / "coordinator.log", env=env).start()


def start_agent(root: Path, coordinator: str, node_id: str, env: dict[str, str]) -> Daemon:
    argv = [
        sys.executable, "-m", "agent.main",
        "--coordinator", coordinator,
        "--node-id", node_id,
        "--simulate-gpus", "2",
        "--state-dir", str(root / f"agent-{node_id}"),
        "--log-format", "json",
    ]  # fmt: skip
    return Daemon(node_id, argv, root / f"agent-{node_id}.log", env=env).start()


def test_coordinator_notify_protocol(tmp_path, notify_socket):
    port = free_port()
    address = f"127.0.0.1:{port}"
    coordinator = start_coordinator(tmp_path, port, notify_env(notify_socket))
    try:
        ready = notify_socket.wait_for("READY", process=coordinator.process)
        # READY=1 only once the gRPC server serves: it must answer right now, without retrying.
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        assert ready["STATUS"] == f"serving on {address}"

        assert_watchdog_pings(notify_socket)

        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=15)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopped_at = time.monotonic()
            coordinator.signal(signal.SIGTERM)
            notify_socket.wait_for("STOPPING", timeout=5, process=coordinator.process)
            # Health turns NOT_SERVING before the server closes, so balancers and clients move away first.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert coordinator.process.wait(10) == 0, coordinator.output()[-2000:]
        assert time.monotonic() - stopped_at < 5
        assert '"coordinator stopped"' in coordinator.output()
    finally:
        coordinator.stop()


def test_coordinator_runs_with_memory_deny_write_execute(tmp_path, notify_socket):
    """The coordinator unit sets MemoryDenyWriteExecute=yes: nothing it loads may map memory writable and executable.

    Uses the kernel's own W^X switch, prctl(PR_SET_MDWE) (Linux 6.3+), as a stand-in
    for systemd's seccomp filter; then starts the coordinator and has it serve.
    """
    under_mdwe = (
        "-c",
        (
            "import ctypes, mmap, runpy, sys\n"
            "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"  # PR_SET_MDWE, REFUSE_EXEC_GAIN
            "try:\n"
            "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "    sys.exit('W+X mapping allowed: MDWE is not in force')\n"
            "except PermissionError:\n"
            "    pass\n"
            "runpy.run_module('coordinator.main', run_name='__main__', alter_sys=True)\n"
        ),
    )
    port = free_port()
    coordinator = start_coordinator(tmp_path, port, notify_env(notify_socket), run=under_mdwe)
    try:
        try:
            notify_socket.wait_for("READY", process=coordinator.process)
        except AssertionError:
            if coordinator.process.poll() == 77:
                pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux < 6.3)")
            raise AssertionError(coordinator.output()[-3000:]) from None
        with gpuorch.Client(f"127.0.0.1:{port}", timeout=5) as client:
            job = client.submit_job(argv=["/bin/true"], gpus=1, name="mdwe")
            assert client.get_job(job).spec.name == "mdwe"
        assert health(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
        coordinator.signal(signal.SIGTERM)
        assert coordinator.process.wait(10) == 0, coordinator.output()[-3000:]
    finally:
        coordinator.stop()


def test_agent_notify_protocol(cluster, abstract_notify_socket):
    cluster.start_coordinator()
    agent = start_agent(cluster.root, cluster.address, "sd-node", notify_env(abstract_notify_socket))
    cluster.agents["sd-node"] = agent  # stopped, and its log shown on failure, by the fixture
    ready = abstract_notify_socket.wait_for("READY", process=agent.process)
    # With a coordinator up, READY=1 means registered.
    assert cluster.node_state("sd-node") == cluster_pb2.NODE_STATE_READY
    assert ready["STATUS"] == f"node sd-node, coordinator {cluster.address}"

    assert_watchdog_pings(abstract_notify_socket)

    stopped_at = time.monotonic()
    agent.signal(signal.SIGTERM)
    abstract_notify_socket.wait_for("STOPPING", timeout=5, process=agent.process)
    assert agent.process.wait(10) == 0, agent.output()[-2000:]
    assert time.monotonic() - stopped_at < 5


def test_agent_is_ready_without_a_coordinator(tmp_path, abstract_notify_socket):
    """Readiness does not wait for the coordinator: a node boots while the coordinator is down."""
    nobody = f"127.0.0.1:{free_port()}"
    agent = start_agent(tmp_path, nobody, "lonely", notify_env(abstract_notify_socket))
    try:
        abstract_notify_socket.wait_for("READY", process=agent.process)
        assert '"registered"' not in agent.output()
        assert_watchdog_pings(abstract_notify_socket, seconds=0.6)
        agent.signal(signal.SIGTERM)
        abstract_notify_socket.wait_for("STOPPING", timeout=5, process=agent.process)
        assert agent.process.wait(10) == 0, agent.output()[-2000:]
    finally:
        agent.stop()
