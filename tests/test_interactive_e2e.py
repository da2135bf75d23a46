"""Interactive work end to end: a real coordinator and agent on loopback, gpuctl driven on a real pty
(pexpect): gpuctl run, attach, exec and port-forward, the attach grace, and another user refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from gpuorch.v1 import job_pb2
from tests.harness import REPO, LocalCluster, free_port, wait_for

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 60
"""Seconds any one expectation may take: generous, for a loaded machine."""
SHELL = ["--", "bash", "--norc", "--noprofile", "-i"]
PROMPT = "READY> "
"""Set by prompt(): the shell runs with the job's environment, not gpuctl's."""


def gpuctl_env(token: str = "") -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"}
    env.pop("GPUORCH_TOKEN", None)
    if token:
        env["GPUORCH_TOKEN"] = token
    return env


def spawn_gpuctl(cluster: LocalCluster, *args: str, token: str = "", rows: int = 24, columns: int = 80):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gpuorch.cli", "--coordinator", cluster.address, *args],
        env=gpuctl_env(token),
        cwd=str(cluster.root),
        timeout=TIMEOUT,
        dimensions=(rows, columns),
        encoding="utf-8",
        codec_errors="replace",
    )
    return child


def gpuctl(cluster: LocalCluster, *args: str, token: str = "", timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, *args],
        env=gpuctl_env(token), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def job_of(child) -> str:
    try:
        child.expect(r"job (j-[0-9a-z-]+) submitted")
    except (pexpect.EOF, pexpect.TIMEOUT) as error:  # pexpect's own message keeps only the last 100 characters
        child.close(force=True)
        ended = f"status {child.exitstatus}, signal {child.signalstatus}"
        raise AssertionError(f"gpuctl ended ({ended}) without a job: {child.before!r}") from error
    return child.match.group(1)


def prompt(child) -> None:
    """Sets a prompt of our own (written so that the echo of the typed line does not match it) and waits for it."""
    child.sendline("PS1='READ''Y> '")
    child.expect_exact(PROMPT)


def wait_state(cluster: LocalCluster, job_id: str, *states: int, timeout: float = TIMEOUT) -> job_pb2.Job:
    names = "/".join(job_pb2.JobState.Name(state) for state in states)
    return wait_for(lambda: (job := cluster.client().get_job(job_id)).state in states and job, timeout, 0.1, f"{job_id} {names}")


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.start_coordinator()
    cluster.add_agent("n1", gpus=1)
    cluster.wait_for_nodes(1)
    yield cluster
    cluster.stop()


def test_run_gives_a_shell_on_the_gpu_with_resize_ctrl_c_and_the_exit_code(cluster):
    # A full cluster: gpuctl run waits, saying why, and attaches once the GPU is free.
    holder = cluster.client().submit_job(argv=["sleep", "600"], gpus=1)
    wait_state(cluster, holder, job_pb2.JOB_STATE_RUNNING)
    child = spawn_gpuctl(cluster, "run", "--gpus", "1", *SHELL)
    job_id = job_of(child)
    child.expect(f"job {job_id} waiting: ")
    cluster.client().cancel_job(holder)
    prompt(child)

    job = cluster.client().get_job(job_id)
    assert job.spec.interactive
    devices = ",".join(job.placement.nodes[0].device_uuids)  # what the launcher gives CUDA_VISIBLE_DEVICES
    child.sendline("echo gpus=[$CUDA_VISIBLE_DEVICES] rank=$RANK")
    child.expect_exact(f"gpus=[{devices}] rank=0")
    child.expect_exact(PROMPT)

    child.setwinsize(41, 107)  # gpuctl gets SIGWINCH and sends the size on
    wait_for(lambda: _stty_size(child) == "41 107", TIMEOUT, 0.5, "the remote terminal to take the new size")

    child.sendline("sleep 300")
    time.sleep(1.0)
    child.sendintr()  # Ctrl-C: the byte goes to the remote terminal, which interrupts the sleep
    child.expect_exact(PROMPT, timeout=30)
    child.sendline("echo back=$((40+2))")
    child.expect_exact("back=42", timeout=30)

    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    ended = wait_state(cluster, job_id, job_pb2.JOB_STATE_FAILED)
    assert "exited with code 3" in ended.reason
    wait_for(lambda: cluster.client().cluster_status().gpus_free == 1, TIMEOUT, 0.1, "the GPU to be free again")

    listed = gpuctl(cluster, "jobs")
    assert f"{job_id} " in listed.stdout and "(interactive)" in listed.stdout, listed.stdout


def _stty_size(child) -> str:
    child.sendline("stty size")
    child.expect(r"[\r\n](\d+ \d+)\r\n")
    size = child.match.group(1)
    child.expect_exact(PROMPT)
    return size


def test_a_dropped_client_may_attach_again_within_the_grace_and_the_job_ends_after_it(cluster):
    child = spawn_gpuctl(cluster, "run", "--attach-grace", "6", *SHELL)
    job_id = job_of(child)
    prompt(child)
    child.sendline("marker=kept-$((6*7))")
    child.expect_exact(PROMPT)
    child.kill(9)  # the connection is gone, the job stays for the grace
    child.close()

    again = spawn_gpuctl(cluster, "attach", job_id)
    again.sendline("echo $marker")
    again.expect_exact("kept-42")  # the same shell
    again.expect_exact(PROMPT)
    again.kill(9)
    again.close()
    assert cluster.client().get_job(job_id).state == job_pb2.JOB_STATE_RUNNING

    ended = wait_state(cluster, job_id, job_pb2.JOB_STATE_CANCELLED, timeout=TIMEOUT)
    assert "no client attached for 6s" in ended.reason
    late = gpuctl(cluster, "attach", job_id)
    assert late.returncode == 1 and "not RUNNING" in late.stderr


def test_exec_beside_a_rank_has_its_environment_and_port_forward_reaches_its_server(cluster, tmp_path):
    port = free_port()
    served = tmp_path / "served"
    served.mkdir()
    (served / "hello.txt").write_text("hello through the coordinator\n")
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)]
    job_id = cluster.client().submit_job(argv=argv, gpus=1, env={"MARK": "from-the-job"})
    job = wait_state(cluster, job_id, job_pb2.JOB_STATE_RUNNING)

    result = wait_for(lambda: (run := gpuctl(cluster, "exec", job_id, "--", "env")).returncode == 0 and run, TIMEOUT, 0.5, "exec")
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert env["MARK"] == "from-the-job"
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(job.placement.nodes[0].device_uuids)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["GPUORCH_JOB_ID"] == job_id

    failing = gpuctl(cluster, "exec", job_id, "--", "sh", "-c", "echo to-stderr >&2; exit 7")
    assert failing.returncode == 7 and "to-stderr" in failing.stderr

    forward = subprocess.Popen(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, "port-forward", job_id, f"0:{port}"],
        env=gpuctl_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = forward.stdout.readline()
        local = int(line.split()[2].rsplit(":", 1)[1])

        def fetch() -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=10) as response:
                return response.read()

        assert wait_for(fetch, TIMEOUT, 0.5, "the rank's server through port-forward") == b"hello through the coordinator\n"
    finally:
        forward.terminate()
        forward.wait(10)


def test_another_user_may_not_exec_attach_or_forward(tmp_path):
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
    (tmp_path / "tokens.toml").write_text(
        "".join(
            f'[[tokens]]\nuser = "{user}"\nrole = "user"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n\n'
            for user, token in tokens.items()
        )
    )
    cluster = LocalCluster(tmp_path, token=tokens["alice"])
    try:
        cluster.start_coordinator("--tokens-file", str(tmp_path / "tokens.toml"))
        cluster.add_agent("n1", gpus=1)
        cluster.wait_for_nodes(1)
        child = spawn_gpuctl(cluster, "run", *SHELL, token=tokens["alice"])
        job_id = job_of(child)
        prompt(child)
        for args in (("exec", job_id, "--", "id"), ("attach", job_id), ("port-forward", job_id, "0:22")):
            refused = gpuctl(cluster, *args, token=tokens["bob"])
            assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
            assert "bob may only attach to, exec in or forward ports to their own jobs" in refused.stderr, refused.stderr
        mine = gpuctl(cluster, "exec", job_id, "--", "echo", "mine", token=tokens["alice"])
        assert mine.returncode == 0 and mine.stdout == "mine\n"
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        cluster.stop()
