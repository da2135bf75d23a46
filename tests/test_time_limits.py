"""Time limits: parsing them, the rule that a rank stopped at its limit fails the job without a
restart, what reaches the agent, and the agent enforcing it on a real rank (also after a restart)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from coordinator.model.cluster import Allocations
from coordinator.model.jobs import JobEntry
from coordinator.rules import effects as fx
from coordinator.rules import job_machine, job_rules, recovery
from coordinator.rules.recovery import FailureCode, GiveUp, RecoveryPolicy
from gpuorch.client import build_job_spec
from gpuorch.durations import parse_duration
from gpuorch.v1 import agent_pb2, job_pb2

CONFIG = job_machine.MachineConfig(RecoveryPolicy(), stop_grace_seconds=3.0)


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("2s", 2), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("01:30:00", 5400), ("1:02:03", 3723), ("30:00", 1800)],
)
def test_durations_in_every_accepted_form(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "-5", "1m1h", "1:60:00", "soon", "2 hours"])
def test_a_bad_duration_is_refused_naming_it_and_the_forms(text):
    with pytest.raises(ValueError, match="is not a duration; use seconds") as error:
        parse_duration(text)
    assert repr(text) in str(error.value)


def test_the_sdk_takes_a_time_limit_as_text_or_seconds():
    assert build_job_spec(["x"], time_limit="1h30m").time_limit_seconds == 5400
    assert build_job_spec(["x"], time_limit=90).time_limit_seconds == 90
    with pytest.raises(ValueError, match="'ninety' is not a duration"):
        build_job_spec(["x"], time_limit="ninety")


# -- the spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["GPU", "a b", "-x", "x/y", "a" * 64])
def test_a_bad_pool_name_is_refused_naming_it(pool):
    with pytest.raises(job_rules.InvalidSpec, match=r"spec\.pool: pool .* is not a valid pool name"):
        job_rules.validate_spec(job_pb2.JobSpec(argv=["x"], gpus=1, pool=pool))


def test_the_pool_is_made_explicit_and_a_time_limit_over_a_year_refused():
    assert job_rules.normalized(job_pb2.JobSpec(argv=["x"], gpus=1)).pool == "default"
    job_rules.validate_spec(job_pb2.JobSpec(argv=["x"], gpus=1, pool="team-a_2", time_limit_seconds=3600))
    with pytest.raises(job_rules.InvalidSpec, match="time_limit_seconds"):
        job_rules.validate_spec(job_pb2.JobSpec(argv=["x"], gpus=1, time_limit_seconds=400 * 86400))


def test_the_launch_carries_the_limit_and_the_stop_grace():
    job = job_pb2.Job(job_id="j-1", attempt=1, spec=job_pb2.JobSpec(argv=["x"], gpus=1, time_limit_seconds=7))
    job.placement.nodes.add(node_id="n1", device_uuids=["GPU-0"], first_rank=0)
    (message,) = job_rules.launch_envelopes(job, {}, 3.0).values()
    launch = message.launch_task
    assert (launch.time_limit_seconds, launch.stop_grace_seconds) == (7, 3.0)


# -- the rules -------------------------------------------------------------------------------------


def test_a_time_limit_gives_up_whatever_restarts_are_left():
    code = recovery.failure_code(agent_pb2.TaskStatus(rank=2, state=agent_pb2.TASK_STATE_EXITED, signal=15, time_limited=True))
    assert code == FailureCode("time_limit", ("2",))
    decision = recovery.decide(5, 0, ["rank 2 on node n1 was stopped at the job's time limit"], RecoveryPolicy(), code)
    assert isinstance(decision, GiveUp)
    assert decision.reason.startswith("time_limit: rank 2 on node n1 was stopped at the job's time limit")


def test_an_exit_0_at_the_time_limits_sigterm_is_still_a_time_limit():
    outcome = job_rules.rank_outcome(agent_pb2.TaskStatus(rank=0, state=agent_pb2.TASK_STATE_EXITED, time_limited=True), "n1")
    assert outcome.failed and "time limit" in outcome.description


def test_a_rank_stopped_at_its_limit_fails_the_job_with_reason_time_limit():
    allocations = Allocations()
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["x"], gpus=1, max_restarts=3, time_limit_seconds=2))
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29500, world_size=1)
    placement.nodes.add(node_id="n1", device_uuids=["GPU-0"], first_rank=0, device_indexes=[0])
    at = job_machine.Now(100.0, 10.0)
    job_machine.place(entry, placement, at, allocations, {}, CONFIG)
    running = agent_pb2.TaskStatus(job_id="j-1", attempt=1, rank=0, state=agent_pb2.TASK_STATE_RUNNING)
    job_machine.rank_reported(entry, "n1", running, at, allocations, CONFIG)
    ended = agent_pb2.TaskStatus(
        job_id="j-1",
        attempt=1,
        rank=0,
        state=agent_pb2.TASK_STATE_EXITED,
        signal=15,
        time_limited=True,
        message="reached its time limit of 2s; stopped with SIGTERM",
    )
    effects = job_machine.rank_reported(entry, "n1", ended, job_machine.Now(102.5, 12.5), allocations, CONFIG)
    assert entry.job.state == job_pb2.JOB_STATE_FAILED
    assert entry.job.reason.startswith("time_limit: rank 0 on node n1 was stopped at the job's time limit")
    assert entry.job.restarts == 0
    assert any(isinstance(e, fx.AttemptFailed) and e.code == "time_limit:0" and not e.restart for e in effects)


# -- the agent -------------------------------------------------------------------------------------


def _launch(job_id: str, limit: float, grace: float, argv: list[str]) -> agent_pb2.LaunchTask:
    launch = agent_pb2.LaunchTask(job_id=job_id, attempt=1, argv=argv, time_limit_seconds=limit, stop_grace_seconds=grace)
    launch.ranks.add(rank=0, local_rank=0)
    return launch


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _until(predicate, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_the_agent_stops_a_rank_at_its_limit_and_kills_it_after_the_grace(tmp_path):
    from agent.identity import IdentityPolicy
    from agent.ranks.supervisor import Supervisor

    reports: list[agent_pb2.TaskStatus] = []
    supervisor = Supervisor(tmp_path, reports.append, identity_policy=IdentityPolicy(single_user=True))
    await supervisor.recover()
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    started = asyncio.get_running_loop().time()
    await supervisor.launch(_launch("j-tl", 0.5, 0.5, [sys.executable, "-c", ignores_term]))
    (running,) = [r for r in reports if r.state == agent_pb2.TASK_STATE_RUNNING]
    await _until(lambda: any(r.state == agent_pb2.TASK_STATE_EXITED for r in reports), 10.0)
    elapsed = asyncio.get_running_loop().time() - started
    (ended,) = [r for r in reports if r.state == agent_pb2.TASK_STATE_EXITED]
    assert ended.time_limited and ended.signal == 9, ended
    assert "time limit of 0.5s" in ended.message and "SIGKILL" in ended.message
    assert 0.9 <= elapsed < 5.0
    assert _gone(running.pid)
    await supervisor.close()


async def test_a_restarted_agent_still_enforces_the_limit(tmp_path):
    from agent.identity import IdentityPolicy
    from agent.ranks.supervisor import Supervisor

    policy = IdentityPolicy(single_user=True)
    first_reports: list[agent_pb2.TaskStatus] = []
    first = Supervisor(tmp_path, first_reports.append, identity_policy=policy)
    await first.recover()
    await first.launch(_launch("j-tl", 1.5, 1.0, ["sleep", "60"]))
    (running,) = [r for r in first_reports if r.state == agent_pb2.TASK_STATE_RUNNING]
    await first.close()  # the agent goes; the rank keeps running

    later_reports: list[agent_pb2.TaskStatus] = []
    second = Supervisor(tmp_path, later_reports.append, identity_policy=policy)
    await second.recover()
    assert not _gone(running.pid)
    await _until(lambda: any(r.state == agent_pb2.TASK_STATE_EXITED for r in later_reports), 10.0)
    (ended,) = later_reports
    assert ended.time_limited and ended.signal == 15
    assert _gone(running.pid)
    assert [s.time_limited for s in second.snapshot()] == [True], "a re-registration re-reports it as time-limited"
    await second.close()


def test_gpuctl_shows_a_limit_as_it_accepts_it_back():
    from gpuorch.cli.printing import duration

    for seconds in (2, 90, 5400, 7200, 93784):
        assert parse_duration(duration(seconds)) == seconds
    assert (duration(5400), duration(2), duration(3601)) == ("1h30m", "2s", "1h1s")
