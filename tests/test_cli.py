"""gpuctl as people type it, run as a subprocess against a real coordinator and agents on loopback,
and the SDK's retries through a TCP proxy that loses an answer or is not there yet."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import gpuorch
from gpuorch import cli
from gpuorch import client as sdk
from gpuorch.cli import printing
from gpuorch.clock import FakeClock
from gpuorch.v1 import job_pb2
from tests.harness import REPO, free_port, wait_for

RANK = str(REPO / "tests" / "workloads" / "rank.py")
SUCCEEDED, FAILED, PENDING = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_PENDING


def gpuctl(*args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=environment,
    )


@pytest.fixture
def one_node(cluster):
    cluster.start_coordinator("--stop-grace-period", "1")
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    return cluster


def wait_state(client, job_id, state, timeout=30.0):
    return wait_for(lambda: (job := client.get_job(job_id)).state == state and job, timeout=timeout, what=f"{job_id} {state}")


# -- options and addresses ----------------------------------------------------------------------


def test_global_options_work_after_the_command_too(one_node):
    after = gpuctl("nodes", "-o", "json", "--coordinator", one_node.address, "--timeout", "5")
    assert after.returncode == 0, after.stderr
    assert [node["node_id"] for node in json.loads(after.stdout)["nodes"]] == ["n1"]
    before = gpuctl("--coordinator", one_node.address, "-o", "json", "status")
    assert before.returncode == 0 and json.loads(before.stdout)["gpus_total"] == 2, before.stderr
    # Given twice, the one after the command wins; given only before, it is kept.
    both = gpuctl("-o", "json", "--coordinator", "127.0.0.1:1", "node", "n1", "--coordinator", one_node.address, "-o", "table")
    assert both.returncode == 0 and both.stdout.startswith("Node:            n1"), both.stderr


def test_a_reader_that_goes_away_ends_gpuctl_quietly(one_node):
    """`gpuctl nodes -o json | true`: the reader is gone before gpuctl writes; it stops without a traceback."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = f"{sys.executable} -m gpuorch.cli nodes -o json --coordinator {one_node.address} | true"
    shell = subprocess.run(
        ["bash", "-c", f"{command}; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": python_path},
        check=False,
    )
    assert shell.stdout.strip() == "141", shell.stdout  # the status of a command its reader left, as for `yes | true`
    assert "Traceback" not in shell.stderr and "BrokenPipeError" not in shell.stderr, shell.stderr


def test_an_address_without_a_port_means_port_50051():
    assert sdk.with_default_port("localhost") == "localhost:50051"
    assert sdk.with_default_port("coordinator.example.internal:6000") == "coordinator.example.internal:6000"
    assert sdk.with_default_port("dns:///gpu-head") == "dns:///gpu-head:50051"
    assert sdk.with_default_port("[::1]") == "[::1]:50051" and sdk.with_default_port("::1") == "[::1]:50051"
    assert (
        sdk.with_default_port("[::1]:7000") == "[::1]:7000"
        and sdk.with_default_port("unix:/run/gpuorch.sock") == "unix:/run/gpuorch.sock"
    )
    with gpuorch.Client("localhost") as client:
        assert client.address == "localhost:50051"
    os.environ["GPUORCH_COORDINATOR"], saved = "gpu-head", os.environ.get("GPUORCH_COORDINATOR")
    try:
        with gpuorch.Client() as client:
            assert client.address == "gpu-head:50051"
    finally:
        os.environ.pop("GPUORCH_COORDINATOR") if saved is None else os.environ.__setitem__("GPUORCH_COORDINATOR", saved)


def test_gpuctl_localhost_without_a_port_reaches_50051():
    """--coordinator HOST goes to 50051, not to grpc's default 443: the error names the port it tried."""
    tried = gpuctl("--coordinator", "localhost", "--timeout", "0.5", "status")
    assert tried.returncode == 1 and "localhost:50051" in tried.stderr, tried.stderr


# -- retries through a proxy --------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of the coordinator. `start_after` keeps its port closed that long (a
    coordinator that is not serving yet); `lose_first_answer` forwards the first connection's request
    and then, instead of the answer (the first HTTP/2 HEADERS frame of a stream), closes both sides."""

    def __init__(self, target_port: int, *, lose_first_answer: bool = False, start_after: float = 0.0) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.lose_first_answer = lose_first_answer
        self.connections = 0
        self.answers_lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(start_after,), daemon=True)
        self._thread.start()

    def _serve(self, start_after: float) -> None:
        time.sleep(start_after)
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target_port))
            lose = self.lose_first_answer and self.connections == 1
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, lose), daemon=True).start()
        listener.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _answers(self, server: socket.socket, client: socket.socket, lose: bool) -> None:
        if not lose:
            return self._pipe(server, client)
        buffer = b""
        try:
            while data := server.recv(65536):
                buffer += data
                while len(buffer) >= 9:  # HTTP/2 frames: 3 bytes length, type, flags, 4 bytes stream id
                    length, kind, stream = int.from_bytes(buffer[:3]), buffer[3], int.from_bytes(buffer[5:9]) & 0x7FFFFFFF
                    if len(buffer) < 9 + length:
                        break
                    if kind == 1 and stream:  # the answer's HEADERS: the request was served; lose it
                        self.answers_lost += 1
                        raise OSError("answer lost")
                    client.sendall(buffer[: 9 + length])
                    buffer = buffer[9 + length :]
        except OSError:
            pass
        for end in (server, client):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_submission_whose_answer_is_lost_is_retried_and_makes_one_job(one_node):
    proxy = Proxy(one_node.port, lose_first_answer=True)
    try:
        submitted = gpuctl(
            "--coordinator", f"127.0.0.1:{proxy.port}", "submit", "--gpus", "1", "--name", "once", "--", sys.executable, RANK
        )
    finally:
        proxy.close()
    assert proxy.answers_lost == 1 and proxy.connections >= 2, "the first answer was lost and the call was sent again"
    assert submitted.returncode == 0, submitted.stderr
    jobs, _ = one_node.client().list_jobs()
    assert [job.job_id for job in jobs] == [submitted.stdout.strip()], "one job, whose id gpuctl printed"
    assert jobs[0].spec.name == "once"


def test_the_sdk_retries_until_the_coordinator_serves(one_node):
    proxy = Proxy(one_node.port, start_after=0.3)
    try:
        started = time.monotonic()
        with gpuorch.Client(f"127.0.0.1:{proxy.port}", timeout=15) as client:
            nodes = client.list_nodes()
        waited = time.monotonic() - started
    finally:
        proxy.close()
    assert [node.node_id for node in nodes] == ["n1"]
    assert waited >= 0.25, "the first tries met a closed port and were retried"


def test_request_ids_make_submissions_idempotent(one_node):
    first = gpuctl(
        "--coordinator", one_node.address, "submit", "--request-id", "nightly-42", "--hold-if-too-big", "--gpus", "64", "--", "x"
    )
    again = gpuctl(
        "--coordinator", one_node.address, "submit", "--request-id", "nightly-42", "--hold-if-too-big", "--gpus", "64", "--", "x"
    )
    other = gpuctl("--coordinator", one_node.address, "submit", "--hold-if-too-big", "--gpus", "64", "--", "x")
    assert first.returncode == again.returncode == other.returncode == 0, (first.stderr, other.stderr)
    assert first.stdout == again.stdout != other.stdout, "the same id gives the same job; no id gives a new one"
    assert len(one_node.client().list_jobs()[0]) == 2


# -- submit: working dir, limits, too big ---------------------------------------------------------


def test_submit_sends_the_directory_it_runs_in_and_the_limits(one_node, tmp_path):
    submitted = gpuctl(
        "--coordinator", one_node.address, "submit", "--pids-max", "256", "--memory-max", "1.5G", "--hold-if-too-big",
        "--no-preempt", "--gpus", "64", "--", "python", "train.py", cwd=tmp_path,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    spec = one_node.client().get_job(submitted.stdout.strip()).spec
    assert spec.non_preemptible
    assert spec.submit_dir == str(tmp_path.resolve()) and spec.working_dir == ""
    assert spec.pids_max == 256 and spec.memory_max_bytes == int(1.5 * 1024**3)
    given = gpuctl(
        "--coordinator", one_node.address, "submit", "--working-dir", "/srv/jobs", "--hold-if-too-big", "--gpus", "64", "--", "x"
    )
    spec = one_node.client().get_job(given.stdout.strip()).spec
    assert spec.working_dir == "/srv/jobs" and spec.submit_dir == "", "an explicit working dir needs no submit dir"
    assert not spec.non_preemptible, "preemptible unless asked otherwise"
    bad = gpuctl("--coordinator", one_node.address, "submit", "--memory-max", "lots", "--", "x")
    assert bad.returncode == 2 and "64G" in bad.stderr


def test_a_job_larger_than_the_cluster_is_refused_at_submit_unless_held(one_node):
    refused = gpuctl("--coordinator", one_node.address, "submit", "--gpus", "3", "--", sys.executable, RANK)
    assert refused.returncode == 1, refused.stdout
    assert "needs 3 GPUs, but the 1 known node has 2 GPUs in all" in refused.stderr and "--hold-if-too-big" in refused.stderr
    shaped = gpuctl(
        "--coordinator", one_node.address, "submit", "--gpus", "2", "--gpus-per-node", "1", "--", sys.executable, RANK
    )
    assert shaped.returncode == 1 and "per node on 2 nodes" in shaped.stderr, shaped.stderr
    model = gpuctl("--coordinator", one_node.address, "submit", "--gpu-model", "B200", "--", sys.executable, RANK)
    assert model.returncode == 1 and "matching 'B200'" in model.stderr and "0 of 2 such GPUs" in model.stderr, model.stderr
    assert one_node.client().list_jobs()[0] == [], "nothing was queued"
    held = gpuctl("--coordinator", one_node.address, "submit", "--gpus", "3", "--hold-if-too-big", "--", sys.executable, RANK)
    assert held.returncode == 0, held.stderr
    job = one_node.client().get_job(held.stdout.strip())
    assert job.state == PENDING and job.spec.hold_if_too_big
    # A drained node (and so a DOWN one) still counts: it may come back.
    one_node.client().drain_node("n1", reason="maintenance")
    fits = gpuctl("--coordinator", one_node.address, "submit", "--gpus", "2", "--", sys.executable, RANK)
    assert fits.returncode == 0, fits.stderr


def test_before_any_node_registers_nothing_is_refused(cluster):
    cluster.start_coordinator()
    submitted = gpuctl("--coordinator", cluster.address, "submit", "--gpus", "512", "--", "x")
    assert submitted.returncode == 0, submitted.stderr


# -- job, jobs, logs, resubmit --------------------------------------------------------------------


def test_a_deterministic_start_failure_fails_at_once_without_burning_restarts(one_node):
    submitted = gpuctl(
        "--coordinator", one_node.address, "submit", "--max-restarts", "4", "--", "/nonexistent/trainer", "--lr", "1e-3"
    )
    client = one_node.client()
    job = wait_state(client, submitted.stdout.strip(), FAILED)
    assert job.attempt == 1 and job.restarts == 0, job.reason
    assert "/nonexistent/trainer" in job.reason and "not restarted" in job.reason, job.reason


def test_gpuctl_job_shows_shell_quoted_argv_local_times_and_where_it_ran(one_node, tmp_path):
    submitted = gpuctl(
        "--coordinator", one_node.address, "submit", "--name", "quoting", "--",
        sys.executable, "-c", "print(1 + 2)", cwd=tmp_path,
    )  # fmt: skip
    job_id = submitted.stdout.strip()
    wait_state(one_node.client(), job_id, SUCCEEDED)
    shown = gpuctl("--coordinator", one_node.address, "job", job_id, env={"TZ": "Asia/Kolkata"})
    assert shown.returncode == 0, shown.stderr
    assert f"Command:    {sys.executable} -c 'print(1 + 2)'\n" in shown.stdout, shown.stdout
    assert f"Submitted from: {tmp_path.resolve()}" in shown.stdout
    assert " IST" in shown.stdout and " UTC" not in shown.stdout, shown.stdout
    in_utc = gpuctl("--coordinator", one_node.address, "job", job_id, "--utc", env={"TZ": "Asia/Kolkata"})
    assert " UTC" in in_utc.stdout and " IST" not in in_utc.stdout, in_utc.stdout


def test_format_job_prints_each_attempts_working_dirs():
    job = job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["python", "train.py", "--out", "a b"], submit_dir="/home/al/exp"))
    attempt = job.attempts.add(attempt=1, end_reason="rank 0 on node n2 exited with code 1")
    attempt.working_dirs["n1"] = "/home/al/exp"
    attempt.working_dirs["n2"] = "/var/lib/gpuorch/agent/jobs/j-1/attempt-1/work"
    job.attempts.add(attempt=2).working_dirs["n1"] = "/home/al/exp"
    text = cli.format_job(job)
    assert "never preempted" not in text
    assert "never preempted" in cli.format_job(job_pb2.Job(job_id="j-2", spec=job_pb2.JobSpec(non_preemptible=True)))
    assert "Command:    python train.py --out 'a b'" in text
    assert "Submitted from: /home/al/exp" in text
    assert "attempt 1 working dir on n1: /home/al/exp" in text
    assert "attempt 1 working dir on n2: /var/lib/gpuorch/agent/jobs/j-1/attempt-1/work" in text
    assert "attempt 2 working dir on n1: /home/al/exp" in text


def test_control_characters_never_reach_the_terminal(one_node):
    name = "evil\x1b]0;pwned\x07\x1b[2J\x9b31m\nname"
    client = one_node.client()
    client.submit_job(argv=["x\x1b[1m"], gpus=64, hold_if_too_big=True, name=name)
    for args in (("jobs",), ("job", client.list_jobs()[0][0].job_id)):
        shown = gpuctl("--coordinator", one_node.address, *args)
        assert shown.returncode == 0, shown.stderr
        assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in shown.stdout), repr(shown.stdout)
        assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\nname" in shown.stdout, shown.stdout
    assert cli.printable("a\tb\x00\x7f\u0085é") == "a\\tb\\x00\\x7f\\x85é"


def test_tail_counts_lines_and_tail_bytes_counts_bytes(one_node):
    program = (
        "import sys\nfor i in range(30000):\n    print(f'line {i:05d}', 'x' * 20)\nsys.stdout.write('last without newline')\n"
    )
    client = one_node.client()
    job_id = client.submit_job(argv=[sys.executable, "-c", program], gpus=1)
    wait_state(client, job_id, SUCCEEDED)
    whole = b"".join(client.job_logs(job_id)).decode()
    assert len(whole) > 3 * 64 * 1024, "the log spans several chunks, so the count crosses chunk boundaries"
    lines = gpuctl("--coordinator", one_node.address, "logs", job_id, "--tail", "12000")
    assert lines.returncode == 0, lines.stderr
    assert lines.stdout == "".join(whole.splitlines(keepends=True)[-12000:])
    assert gpuctl("--coordinator", one_node.address, "logs", job_id, "--tail", "1").stdout == "last without newline"
    assert gpuctl("--coordinator", one_node.address, "logs", job_id, "--tail", "99999").stdout == whole
    assert gpuctl("--coordinator", one_node.address, "logs", job_id, "--tail-bytes", "8").stdout == whole[-8:]


def test_resubmit_queues_the_same_spec_as_a_new_job(one_node, tmp_path):
    first = gpuctl(
        "--coordinator", one_node.address, "submit", "--name", "again", "--env", "K=v", "--", sys.executable, RANK, cwd=tmp_path
    )
    original = first.stdout.strip()
    wait_state(one_node.client(), original, SUCCEEDED)
    again = gpuctl("--coordinator", one_node.address, "resubmit", original, "--watch")
    assert again.returncode == 0, again.stderr
    new_id = again.stdout.splitlines()[0]
    assert new_id != original and again.stdout.splitlines()[-1].startswith(f"{new_id} SUCCEEDED")
    copy, source = one_node.client().get_job(new_id).spec, one_node.client().get_job(original).spec
    assert copy == source, "the same spec, submit dir included"


# -- help and completion ----------------------------------------------------------------------------


def test_ages_are_read_on_the_clock_and_never_negative():
    beat = Timestamp(seconds=1_800_000_000, nanos=500_000_000)
    assert printing.age(beat, FakeClock(wall=1_800_000_003.0)) == "2.5s ago"
    assert printing.age(beat, FakeClock(wall=1_799_999_999.0)) == "0.0s ago", "a coordinator clock ahead of ours"
    assert printing.age(Timestamp(), FakeClock()) == "-", "never stamped"


def test_every_command_help_lists_enum_values_and_an_example():
    parser = cli.build_parser()
    for name, sub in cli.subcommands(parser).items():
        text = sub.format_help()
        assert "example:" in text and "gpuctl " in text.split("example:")[1], name
        assert "table (default) or json" in text, name
    helps = {name: sub.format_help() for name, sub in cli.subcommands(parser).items()}
    assert "nccl (default) or gloo" in helps["submit"] and "fair_share" in helps["submit"]
    assert all(state in " ".join(helps["jobs"].split()) for state in ("pending", "running", "succeeded", "failed", "cancelled"))
    assert all(state in " ".join(helps["nodes"].split()) for state in ("ready", "suspect", "down", "draining", "drained"))
    assert "fair_share" in helps["priority"] and "user (default) or admin" in " ".join(helps["token"].split())


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_are_generated_from_the_parser(shell):
    printed = gpuctl("completion", shell)
    assert printed.returncode == 0, printed.stderr
    for word in ("resubmit", "--tail-bytes", "--hold-if-too-big", "gloo", "json"):
        assert word in printed.stdout, word
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} not installed; the script's words were checked")
    checked = subprocess.run([binary, "-n"], input=printed.stdout, check=False, capture_output=True, text=True, timeout=10)
    assert checked.returncode == 0, checked.stderr
    if shell == "bash":
        probe = printed.stdout + 'COMP_WORDS=(gpuctl logs j-1 --ta); COMP_CWORD=3; _gpuctl; echo "${COMPREPLY[*]}"\n'
        probe += 'COMP_WORDS=(gpuctl submit --backend ""); COMP_CWORD=3; _gpuctl; echo "${COMPREPLY[*]}"\n'
        ran = subprocess.run([binary, "-c", probe], check=False, capture_output=True, text=True, timeout=10)
        assert ran.stdout.splitlines() == ["--tail --tail-bytes", "nccl gloo"], (ran.stdout, ran.stderr)


# -- packaging ----------------------------------------------------------------------------------------


def test_the_package_metadata_builds_without_deprecation_warnings(monkeypatch):
    """pyproject.toml as setuptools reads it on every install: an SPDX license, no warning printed."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distribution = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert distribution.metadata.license_expression == "Apache-2.0"


# -- the quick start's script -------------------------------------------------------------------------


def test_local_cluster_script_starts_single_user_agents_and_has_grpcurl(tmp_path):
    """scripts/local-cluster.sh, run as the README says, in a copy of the tree whose .venv is this Python's."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "gpuctl").exists():
        pytest.skip(f"{venv} has no gpuctl: the script would install gpuorch itself")
    agent_help = subprocess.run(
        [sys.executable, "-m", "agent.main", "--help"], check=False, capture_output=True, text=True, cwd=REPO, timeout=30
    )
    if "--single-user" not in agent_help.stdout:
        pytest.skip("this tree's agent has no --single-user setting yet (the agent side of the change)")
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "local-cluster.sh", tree / "scripts")
    (tree / ".venv").symlink_to(venv)
    environment = {
        **os.environ,
        "PORT": str(free_port()),
        "STATE": str(tmp_path / "state"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    try:
        started = subprocess.run(
            ["bash", str(tree / "scripts" / "local-cluster.sh")],
            check=False,
            capture_output=True,
            text=True,
            env=environment,
            timeout=90,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.count(" READY ") == 2, started.stdout
        assert (venv / "bin" / "grpcurl").exists() or "installing grpcurl" in started.stdout
        for node_id in ("node-a", "node-b"):
            pid = (tmp_path / "state" / f"{node_id}.pid").read_text().strip()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--single-user" in argv and b"--allow-root-ranks" not in argv, argv
    finally:
        subprocess.run(
            ["bash", str(tree / "scripts" / "local-cluster.sh"), "stop"],
            check=False,
            capture_output=True,
            env=environment,
            timeout=30,
        )


def test_gpuctl_ends_its_process_even_when_a_thread_holds_a_lock_a_finalizer_needs(tmp_path):
    """gpuctl's process ends through exit_process, not the interpreter's finalization: there, a gRPC thread still
    finishing a cancelled stream was frozen holding the call's lock, the call's finalizer waited for it for ever,
    and `gpuctl attach` hung after printing its refusal (about 1 run in 170 under load). The stand-in: a daemon
    thread holds a lock that an object reachable only through a cycle needs in __del__; with sys.exit this
    script never ends."""
    script = tmp_path / "exit_check.py"
    script.write_text(
        textwrap.dedent(
            """
            import gc, sys, threading, time
            from gpuorch.cli.commands import exit_process

            gc.disable()  # only the shutdown's own collection finds the cycle
            lock, held = threading.Lock(), threading.Event()

            class Call:
                def __init__(self, lock):
                    self.lock = lock
                def __del__(self):
                    with self.lock:
                        pass

            def sender():
                with lock:
                    held.set()
                    time.sleep(3600)

            threading.Thread(target=sender, daemon=True).start()
            held.wait()
            call = Call(lock)
            call.cycle = call
            del call
            print("printed before the exit", end="")
            exit_process(3)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=env)
    assert (done.returncode, done.stdout) == (3, "printed before the exit"), done.stderr
