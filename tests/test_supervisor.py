"""The worker supervisor with real rank processes: starts, exits, stops, logs, stale attempts,
and ranks that outlive the agent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.identity import IdentityPolicy
from agent.ranks import lifecycle
from agent.ranks.spawn import above_standard_descriptors
from agent.ranks.supervisor import Supervisor
from agent.ranks.watch import process_start_time
from gpuorch.v1 import agent_pb2

RUNNING = agent_pb2.TASK_STATE_RUNNING
EXITED = agent_pb2.TASK_STATE_EXITED
FAILED_TO_START = agent_pb2.TASK_STATE_FAILED_TO_START
REJECTED = agent_pb2.TASK_STATE_REJECTED
ROOT_RANKS_ALLOWED = IdentityPolicy(single_user=True)
"""These tests may run as root and launch jobs without an owner: the node is single-user, ranks run as the agent's user."""


class Reports:
    """Collects what the supervisor reports; lets a test wait for a matching status."""

    def __init__(self) -> None:
        self.statuses: list[agent_pb2.TaskStatus] = []
        self._changed = asyncio.Event()

    def __call__(self, status: agent_pb2.TaskStatus) -> None:
        self.statuses.append(status)
        self._changed.set()

    def matching(self, predicate: Callable[[agent_pb2.TaskStatus], bool]) -> list[agent_pb2.TaskStatus]:
        return [status for status in self.statuses if predicate(status)]

    async def wait_for(self, predicate: Callable[[agent_pb2.TaskStatus], bool], timeout: float = 5.0) -> agent_pb2.TaskStatus:
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(predicate)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching status within {timeout}s; got {list(self.statuses)}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def of(self, rank: int, state: int) -> Callable[[agent_pb2.TaskStatus], bool]:
        return lambda status: status.rank == rank and status.state == state


def python_rank(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def launch_task(
    job_id: str, attempt: int, argv: list[str], ranks: int = 1, working_dir: str = "", env=None
) -> agent_pb2.LaunchTask:
    return agent_pb2.LaunchTask(
        job_id=job_id,
        attempt=attempt,
        argv=argv,
        working_dir=working_dir,
        ranks=[agent_pb2.RankLaunch(rank=r, local_rank=r, env={"RANK": str(r), **(env or {})}) for r in range(ranks)],
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def process_gone(pid: int) -> bool:
    """True when the pid is gone or a zombie (a container's init may be slow to reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.fixture
async def supervisor(tmp_path: Path):
    reports = Reports()
    supervisor = Supervisor(tmp_path, reports, identity_policy=ROOT_RANKS_ALLOWED)
    supervisor.reports = reports  # type: ignore[attr-defined]
    await supervisor.recover()
    yield supervisor
    # A failed test must not leave its sleeping ranks behind.
    for job_id in {status.job_id for status in supervisor.snapshot() if status.state == RUNNING}:
        await supervisor.stop(agent_pb2.StopTask(job_id=job_id, grace_seconds=0))
    await supervisor.close()


async def test_exit_codes_are_reported(supervisor: Supervisor) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-1", 1, python_rank("import os, sys; sys.exit(3 * int(os.environ['RANK']))"), ranks=2))
    running = [await reports.wait_for(reports.of(r, RUNNING)) for r in range(2)]
    assert all(status.pid > 0 and not status.starting for status in running)
    exited = [await reports.wait_for(reports.of(r, EXITED)) for r in range(2)]
    assert [(s.exit_code, s.signal) for s in exited] == [(0, 0), (3, 0)]
    assert [s.pid for s in exited] == [s.pid for s in running]
    assert supervisor.running_count() == 0


async def test_rank_gets_env_default_working_dir_and_logs_both_streams(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    code = "import os, sys; print('out', os.environ['GREETING'], os.getcwd()); print('err', os.environ['RANK'], file=sys.stderr)"
    await supervisor.launch(launch_task("j-env", 1, python_rank(code), env={"GREETING": "hello"}))
    assert (await reports.wait_for(reports.of(0, EXITED))).exit_code == 0
    log_text = (tmp_path / "jobs" / "j-env" / "attempt-1" / "rank-0.log").read_text()
    assert f"out hello {tmp_path / 'jobs' / 'j-env' / 'work'}\n" in log_text
    assert "err 0\n" in log_text


async def test_ranks_run_in_their_own_process_group_and_working_dir(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    workdir = tmp_path / "here"
    workdir.mkdir()
    await supervisor.launch(
        launch_task(
            "j-pg", 1, python_rank("import os, time; print(os.getcwd(), flush=True); time.sleep(30)"), working_dir=str(workdir)
        )
    )
    pid = (await reports.wait_for(reports.of(0, RUNNING))).pid
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) != os.getsid(0)
    log_path = tmp_path / "jobs" / "j-pg" / "attempt-1" / "rank-0.log"
    await wait_until(lambda: log_path.read_text() != "")
    assert log_path.read_text() == f"{workdir}\n"
    await supervisor.stop(agent_pb2.StopTask(job_id="j-pg", attempt=1, grace_seconds=2))


async def test_missing_program_fails_to_start_with_a_clear_message(supervisor: Supervisor) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-bad", 1, ["nosuchprog-gpuorch"]))
    failed = await reports.wait_for(reports.of(0, FAILED_TO_START))
    assert failed.message == "cannot execute 'nosuchprog-gpuorch': No such file or directory"
    await asyncio.sleep(0.2)  # the shim's own end must not be reported as a second outcome
    assert reports.matching(lambda s: s.state != FAILED_TO_START) == []
    assert [s.state for s in supervisor.snapshot()] == [FAILED_TO_START]


async def test_missing_working_dir_fails_to_start(supervisor: Supervisor, tmp_path: Path) -> None:
    """Found by the shim, as the rank's user, when it enters the directory (the agent does not look as root)."""
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-wd", 1, python_rank("pass"), working_dir=str(tmp_path / "absent")))
    failed = await reports.wait_for(reports.of(0, FAILED_TO_START))
    assert failed.message == f"cannot enter working directory {str(tmp_path / 'absent')!r}: No such file or directory"


async def test_stop_sends_sigterm_then_sigkill_after_grace(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    # Rank 0 ignores SIGTERM, rank 1 does not; both say when they are ready.
    code = (
        "import os, signal, time\n"
        "if os.environ['RANK'] == '0': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    await supervisor.launch(launch_task("j-stop", 1, python_rank(code), ranks=2))
    logs = [tmp_path / "jobs" / "j-stop" / "attempt-1" / f"rank-{r}.log" for r in range(2)]
    await wait_until(lambda: all(path.read_text() == "ready\n" for path in logs))
    assert supervisor.read_log(agent_pb2.ReadLogs(job_id="j-stop", attempt=1, rank=0)).running

    started = time.monotonic()
    await supervisor.stop(agent_pb2.StopTask(job_id="j-stop", attempt=1, grace_seconds=0.5, reason="test"))
    assert time.monotonic() - started >= 0.5
    stubborn = await reports.wait_for(reports.of(0, EXITED), timeout=0)
    obedient = await reports.wait_for(reports.of(1, EXITED), timeout=0)
    assert (stubborn.signal, stubborn.exit_code) == (signal.SIGKILL, 0)
    assert "SIGKILL" in stubborn.message
    assert (obedient.signal, obedient.exit_code) == (signal.SIGTERM, 0)
    assert supervisor.running_count() == 0


async def test_stop_matches_the_attempt_and_older_or_all_with_zero(supervisor: Supervisor) -> None:
    reports = supervisor.reports
    sleeper = python_rank("import time; time.sleep(30)")
    await supervisor.launch(launch_task("j-a", 1, sleeper))
    await supervisor.launch(launch_task("j-a", 2, sleeper))
    await supervisor.launch(launch_task("j-other", 1, sleeper))
    assert supervisor.running_count() == 3

    await supervisor.stop(agent_pb2.StopTask(job_id="j-a", attempt=1, grace_seconds=2))
    assert {(s.job_id, s.attempt) for s in reports.matching(lambda s: s.state == EXITED)} == {("j-a", 1)}
    assert supervisor.running_count() == 2

    await supervisor.stop(agent_pb2.StopTask(job_id="j-a", attempt=0, grace_seconds=2))
    assert {(s.job_id, s.attempt) for s in reports.matching(lambda s: s.state == EXITED)} == {("j-a", 1), ("j-a", 2)}
    assert supervisor.running_count() == 1
    await supervisor.stop(agent_pb2.StopTask(job_id="j-other", grace_seconds=2))


async def test_stale_attempt_is_rejected_even_after_a_restart(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-5", 3, python_rank("pass")))
    await reports.wait_for(reports.of(0, EXITED))
    await supervisor.launch(launch_task("j-5", 2, python_rank("pass")))
    rejected = await reports.wait_for(reports.of(0, REJECTED), timeout=0)
    assert (rejected.job_id, rejected.attempt) == ("j-5", 2)
    assert rejected.message == "attempt 2 of j-5 is older than attempt 3 already seen"

    later_reports = Reports()
    restarted = Supervisor(tmp_path, later_reports, identity_policy=ROOT_RANKS_ALLOWED)
    await restarted.recover()
    await restarted.launch(launch_task("j-5", 1, python_rank("pass")))
    assert (
        later_reports.matching(lambda s: s.state == REJECTED)[0].message
        == "attempt 1 of j-5 is older than attempt 3 already seen"
    )
    await restarted.close()


async def test_resent_launch_starts_nothing_new(supervisor: Supervisor) -> None:
    reports = supervisor.reports
    launch = launch_task("j-again", 1, python_rank("import time; time.sleep(30)"))
    await supervisor.launch(launch)
    await supervisor.launch(launch)
    running = reports.matching(reports.of(0, RUNNING))
    assert len(running) == 2 and running[0].pid == running[1].pid  # the resend is answered with the same rank
    assert supervisor.running_count() == 1
    await supervisor.stop(agent_pb2.StopTask(job_id="j-again", grace_seconds=2))


async def test_read_log_reads_from_offset_or_tail(supervisor: Supervisor) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-log", 1, python_rank("print('0123456789', end='')")))
    await reports.wait_for(reports.of(0, EXITED))

    tail = supervisor.read_log(agent_pb2.ReadLogs(request_id=7, job_id="j-log", attempt=1, rank=0, offset=-4))
    assert (tail.request_id, tail.data, tail.offset, tail.file_size, tail.running, tail.error) == (7, b"6789", 6, 10, False, "")
    middle = supervisor.read_log(agent_pb2.ReadLogs(job_id="j-log", attempt=1, rank=0, offset=2, max_bytes=3))
    assert (middle.data, middle.offset) == (b"234", 2)
    whole = supervisor.read_log(agent_pb2.ReadLogs(job_id="j-log", attempt=1, rank=0, offset=-100))
    assert (whole.data, whole.offset) == (b"0123456789", 0)
    past_end = supervisor.read_log(agent_pb2.ReadLogs(job_id="j-log", attempt=1, rank=0, offset=50))
    assert (past_end.data, past_end.offset, past_end.error) == (b"", 10, "")

    unknown = supervisor.read_log(agent_pb2.ReadLogs(job_id="j-log", attempt=2, rank=0))
    assert unknown.error == "no log for j-log attempt 2 rank 0"
    sneaky = supervisor.read_log(agent_pb2.ReadLogs(job_id="..", attempt=1, rank=0))
    assert sneaky.error.startswith("no log for .. attempt 1 rank 0")


async def test_exit_stays_in_snapshot_until_acknowledged(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-ack", 1, python_rank("raise SystemExit(4)")))
    await reports.wait_for(reports.of(0, EXITED))
    assert [(s.job_id, s.state, s.exit_code) for s in supervisor.snapshot()] == [("j-ack", EXITED, 4)]

    supervisor.forget_attempt("j-ack", 1)
    assert supervisor.snapshot() == []
    later_reports = Reports()
    restarted = Supervisor(tmp_path, later_reports, identity_policy=ROOT_RANKS_ALLOWED)
    await restarted.recover()
    assert later_reports.statuses == [] and restarted.snapshot() == []  # acknowledged exits are not re-reported
    await restarted.close()


async def test_a_launch_of_a_forgotten_rank_is_not_started_again_and_is_answered_as_gone(supervisor: Supervisor) -> None:
    """A coordinator that finds none of an attempt on a node sends its launch again; a rank this node started once and
    has forgotten since is never started twice, and the answer says it is gone (the coordinator does not wait on)."""
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-once", 1, python_rank("raise SystemExit(0)")))
    await reports.wait_for(reports.of(0, EXITED))
    supervisor.forget_attempt("j-once", 1)
    reports.statuses.clear()
    await supervisor.launch(launch_task("j-once", 1, python_rank("raise SystemExit(0)")))
    gone = await reports.wait_for(reports.of(0, EXITED), timeout=1)
    assert (gone.signal, gone.message) == (9, lifecycle.FORGOTTEN_LAUNCH)
    assert reports.matching(lambda s: s.state == RUNNING) == [] and supervisor.snapshot() == [], "not started again"


async def test_ranks_survive_an_agent_restart_and_their_exit_code_is_learned(tmp_path: Path) -> None:
    first_reports = Reports()
    first = Supervisor(tmp_path, first_reports, identity_policy=ROOT_RANKS_ALLOWED)
    await first.recover()
    go_file = tmp_path / "go"
    code = f"import os, sys, time\nwhile not os.path.exists({str(go_file)!r}): time.sleep(0.01)\nsys.exit(7)"
    await first.launch(launch_task("j-long", 1, python_rank(code)))
    pid = (await first_reports.wait_for(first_reports.of(0, RUNNING))).pid
    await first.close()  # the agent dies; the rank must not

    second_reports = Reports()
    second = Supervisor(tmp_path, second_reports, identity_policy=ROOT_RANKS_ALLOWED)
    await second.recover()
    assert second.running_count() == 1
    assert [(s.state, s.pid) for s in second.snapshot()] == [(RUNNING, pid)]
    assert process_start_time(pid) is not None

    go_file.touch()
    exited = await second_reports.wait_for(second_reports.of(0, EXITED))
    assert (exited.exit_code, exited.signal, exited.pid) == (7, 0, pid)
    assert first_reports.matching(lambda s: s.state == EXITED) == []
    await second.close()


async def test_rank_that_ended_while_no_agent_ran_is_reported_on_recover(tmp_path: Path) -> None:
    first = Supervisor(tmp_path, Reports(), identity_policy=ROOT_RANKS_ALLOWED)
    await first.recover()
    go_file = tmp_path / "go"
    code = f"import os, sys, time\nwhile not os.path.exists({str(go_file)!r}): time.sleep(0.01)\nsys.exit(5)"
    await first.launch(launch_task("j-gone", 1, python_rank(code)))
    await first.close()
    go_file.touch()
    exit_file = tmp_path / "jobs" / "j-gone" / "attempt-1" / "rank-0.exit"
    await wait_until(exit_file.exists)

    reports = Reports()
    second = Supervisor(tmp_path, reports, identity_policy=ROOT_RANKS_ALLOWED)
    await second.recover()
    assert [(s.state, s.exit_code) for s in reports.statuses] == [(EXITED, 5)]
    assert second.running_count() == 0
    assert [(s.state, s.exit_code) for s in second.snapshot()] == [(EXITED, 5)]  # until acknowledged
    await second.close()


async def test_killed_shim_loses_the_exit_status_but_not_the_rank(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    await supervisor.launch(launch_task("j-shim", 1, python_rank("import time; time.sleep(30)")))
    rank_pid = (await reports.wait_for(reports.of(0, RUNNING))).pid
    shim_pid = os.getsid(rank_pid)
    os.kill(shim_pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    assert reports.matching(lambda s: s.state == EXITED) == []  # the rank still runs; keep watching it
    assert supervisor.running_count() == 1

    os.kill(rank_pid, signal.SIGTERM)
    lost = await reports.wait_for(reports.of(0, EXITED))
    assert lost.signal == signal.SIGKILL and "exit status lost" in lost.message


async def test_processes_left_behind_by_a_rank_are_killed_when_it_exits(supervisor: Supervisor, tmp_path: Path) -> None:
    reports = supervisor.reports
    code = "import subprocess; helper = subprocess.Popen(['sleep', '30']); print(helper.pid, flush=True)"
    await supervisor.launch(launch_task("j-helper", 1, python_rank(code)))
    assert (await reports.wait_for(reports.of(0, EXITED))).exit_code == 0
    helper_pid = int((tmp_path / "jobs" / "j-helper" / "attempt-1" / "rank-0.log").read_text())
    await wait_until(lambda: process_gone(helper_pid))


AGENT_THAT_LAUNCHES_AND_HANGS = """
import asyncio, sys
from pathlib import Path
from agent.identity import IdentityPolicy
from agent.ranks.supervisor import Supervisor
from gpuorch.v1 import agent_pb2

async def main():
    supervisor = Supervisor(
        Path(sys.argv[1]),
        lambda status: print("status", status.state, status.pid, flush=True),
        identity_policy=IdentityPolicy(single_user=True),
    )
    await supervisor.recover()
    code = "import os, sys, time\\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\\nsys.exit(7)"
    rank = agent_pb2.RankLaunch(rank=0)
    argv = [sys.executable, "-c", code, sys.argv[2]]
    await supervisor.launch(agent_pb2.LaunchTask(job_id="j-kill", attempt=1, argv=argv, ranks=[rank]))
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_ranks_survive_a_sigkill_of_the_agent_process(tmp_path: Path) -> None:
    go_file = tmp_path / "go"
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_THAT_LAUNCHES_AND_HANGS, str(tmp_path), str(go_file), stdout=asyncio.subprocess.PIPE
    )

    async def first_status() -> bytes:
        while True:  # skipping the agent's log lines
            line = await agent.stdout.readline()
            assert line, "the agent ended before reporting the rank"
            if line.startswith(b"status "):
                return line

    try:
        state, pid = map(int, (await asyncio.wait_for(first_status(), 10)).split()[1:])
        assert state == RUNNING
    finally:
        agent.kill()
        await agent.wait()
    try:
        assert process_start_time(pid) is not None  # the rank outlived its agent
        reports = Reports()
        restarted = Supervisor(tmp_path, reports, identity_policy=ROOT_RANKS_ALLOWED)
        await restarted.recover()
        assert [(s.state, s.pid) for s in restarted.snapshot()] == [(RUNNING, pid)]
    finally:
        go_file.touch()  # lets the rank end even when the test fails
    exited = await reports.wait_for(reports.of(0, EXITED))
    assert (exited.exit_code, exited.pid) == (7, pid)
    await restarted.close()


def test_descriptors_for_the_shim_are_moved_out_of_the_numbers_they_are_handed_over_as():
    read_end, write_end = os.pipe()
    moved = above_standard_descriptors(write_end)
    try:
        assert moved >= 10 and not os.get_inheritable(moved)
        with pytest.raises(OSError):
            os.fstat(write_end)  # the original is closed
        os.write(moved, b"x")
        assert os.read(read_end, 1) == b"x", "the same pipe"
    finally:
        os.close(moved)
        os.close(read_end)


def test_a_shim_started_without_env_fd_gives_the_rank_its_own_environment(tmp_path: Path) -> None:
    """What an agent from before the memfd handover does, still running after an upgrade."""
    shim = Path(__file__).resolve().parent.parent / "agent" / "ranks" / "shim.py"
    exit_file = tmp_path / "rank.exit"
    finished = subprocess.run(
        [sys.executable, "-I", "-S", str(shim), "--pid-file", str(tmp_path / "rank.pid"), "--exit-file", str(exit_file),
         "--cwd", str(tmp_path), "--", "/bin/sh", "-c", 'echo "rank=$RANK"'],
        env={"RANK": "3", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "rank=3\n" and "exit_code=0" in exit_file.read_text()


async def test_a_rerun_log_is_made_private_and_the_shim_keeps_only_the_agents_loader_path(
    supervisor: Supervisor, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/agent-python/lib")  # the agent's own: its interpreter may need it
    monkeypatch.setenv("GPUORCH_AGENT_ONLY_SECRET", "x")
    code = (
        "import os; print(os.environ.get('LD_LIBRARY_PATH'), os.environ.get('JOB_VAR'), flush=True); import time; time.sleep(30)"
    )
    earlier_log = tmp_path / "jobs" / "j-env" / "attempt-1" / "rank-0.log"  # left by an earlier run of the same attempt
    earlier_log.parent.mkdir(parents=True)
    earlier_log.write_text("")
    earlier_log.chmod(0o644)
    await supervisor.launch(
        launch_task("j-env", 1, python_rank(code), env={"JOB_VAR": "from-the-job", "LD_LIBRARY_PATH": "/home/u/libs"})
    )
    rank = await supervisor.reports.wait_for(supervisor.reports.of(0, RUNNING))
    record = supervisor.ranks[("j-env", 1, 0)].record
    shim_env = Path(f"/proc/{record.shim_pid}/environ").read_bytes().split(b"\0")
    assert b"LD_LIBRARY_PATH=/opt/agent-python/lib" in shim_env, shim_env
    assert not any(b"from-the-job" in entry or b"/home/u/libs" in entry or b"AGENT_ONLY_SECRET" in entry for entry in shim_env)
    await wait_until(lambda: "from-the-job" in Path(record.log_path).read_text())
    assert record.log_path == str(earlier_log)
    assert Path(record.log_path).read_text().startswith("/home/u/libs from-the-job"), "the rank gets the job's"
    assert (Path(record.log_path).stat().st_mode & 0o777) == 0o600
    assert rank.job_id == "j-env"


def test_a_rank_still_starting_is_listed_as_starting_and_one_that_runs_is_not() -> None:
    """A Register lists a rank whose shim has not confirmed its start as RUNNING with `starting` set, so the
    coordinator keeps it without counting it as started (its launch timeout still applies)."""
    from agent.ranks.lifecycle import RankState
    from agent.ranks.rank import Rank
    from agent.ranks.state_dir import RankRecord

    rank = Rank(record=RankRecord("j-s", 1, 0, 0, 0, None, 0, None, "", "", ""), record_path=Path())
    assert rank.state is RankState.STARTING
    listed = rank.running_status()
    assert (listed.state, listed.starting) == (RUNNING, True)
    rank.state = RankState.RUNNING
    assert rank.running_status().starting is False
