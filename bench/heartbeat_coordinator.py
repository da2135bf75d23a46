"""The coordinator process of bench/heartbeats.py (and bench/dashboard.py): a real `gpuorch-coordinator`
on 127.0.0.1:<free port> with a temporary state dir, stopped in order (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.heartbeat_load import die_with_parent, log
from gpuorch.v1 import cluster_pb2, cluster_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Coordinator:
    def __init__(self, workdir: Path, interval: float) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
        self.log_path = workdir / f"coordinator-{self.port}.log"
        executable = shutil.which("gpuorch-coordinator") or str(Path(sys.executable).parent / "gpuorch-coordinator")
        if Path(executable).exists():
            argv = [executable]
        else:
            argv = [sys.executable, "-m", "coordinator.main"]
        self.argv = [
            *argv,
            "--listen",
            self.target,
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "warning",
            "--heartbeat-interval",
            str(interval),
        ]
        self.process: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - the coordinator writes it until stop() closes it
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on the terminal reaches only the bench, which stops us in order
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, and no thread of ours holds a lock then
            # --progress queues a job per agent before any registers: no cap on one owner's pending jobs.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "GPUORCH_MAX_PENDING_JOBS_PER_USER": "0"},
        )
        self.channel = grpc.insecure_channel(self.target)
        self.stub = cluster_pb2_grpc.ClusterServiceStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                self.status(timeout=1.0)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator not serving after {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def status(self, timeout: float = 10.0) -> cluster_pb2.ClusterStatus:
        return self.stub.GetClusterStatus(cluster_pb2.GetClusterStatusRequest(), timeout=timeout).status

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> int:
        try:
            return len(self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                log("coordinator did not stop within 15 s of SIGTERM; killing it")
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.process.returncode
