"""agent/router.py: a stop and a forget are two instructions; an older coordinator's zero-grace stop is both.

Real ranks through a real Supervisor; only the coordinator's stream is left out (the router is
handed its messages directly)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.ranks.supervisor import Supervisor
from agent.router import Router, stop_also_forgets
from coordinator.rules import recovery
from gpuorch.v1 import agent_pb2
from tests.test_supervisor import ROOT_RANKS_ALLOWED, Reports, launch_task, python_rank

RUNNING = agent_pb2.TASK_STATE_RUNNING
EXITED = agent_pb2.TASK_STATE_EXITED
SLEEPS = python_rank("import time; time.sleep(60)")


class Node:
    """A supervisor with its router, and what they sent towards the coordinator."""

    def __init__(self, state_dir: Path) -> None:
        self.reports = Reports()
        self.sent: list[agent_pb2.AgentMessage] = []
        self.supervisor = Supervisor(state_dir, self.reports, identity_policy=ROOT_RANKS_ALLOWED)
        self.router = Router(self.supervisor, send=lambda message: self.sent.append(message) is None)
        self.records = state_dir / "ranks"

    async def launch_running(self, job_id: str, attempt: int, argv: list[str]) -> None:
        self.router.handle(agent_pb2.CoordinatorMessage(launch_task=launch_task(job_id, attempt, argv)))
        await self.reports.wait_for(lambda s: s.job_id == job_id and s.attempt == attempt and s.state == RUNNING)

    def stop(self, job_id: str, attempt: int, grace: float) -> None:
        stop = agent_pb2.StopTask(job_id=job_id, attempt=attempt, grace_seconds=grace, reason="test")
        self.router.handle(agent_pb2.CoordinatorMessage(stop_task=stop))

    def forget(self, job_id: str, attempt: int) -> None:
        self.router.handle(agent_pb2.CoordinatorMessage(forget_attempt=agent_pb2.ForgetAttempt(job_id=job_id, attempt=attempt)))

    def snapshot(self) -> list[tuple[str, int, int]]:
        return [(status.job_id, status.attempt, status.state) for status in self.supervisor.snapshot()]

    async def close(self) -> None:
        await self.router.close()
        await self.supervisor.close()


@pytest.fixture
async def node(tmp_path: Path):
    node = Node(tmp_path)
    await node.supervisor.recover()
    yield node
    for rank in list(node.supervisor.ranks.values()):  # leave no rank behind
        if not rank.ended.is_set():
            await node.supervisor.stop(agent_pb2.StopTask(job_id=rank.record.job_id, grace_seconds=0))
    await node.close()


async def test_a_graceful_stop_keeps_reporting_the_end_until_the_attempt_is_forgotten(node: Node) -> None:
    await node.launch_running("j-stop", 1, SLEEPS)
    node.stop("j-stop", 1, grace=5.0)
    await node.router.settled()
    ended = await node.reports.wait_for(node.reports.of(0, EXITED))
    assert ended.message == "stopped with SIGTERM"
    # A stop is no acknowledgement: a registration after a broken stream must still carry the end.
    assert node.snapshot() == [("j-stop", 1, EXITED)]
    assert list(node.records.glob("*.json"))

    node.forget("j-stop", 1)
    assert node.snapshot() == []
    assert list(node.records.glob("*.json")) == []


async def test_an_older_coordinators_zero_grace_stop_also_forgets_the_attempt(node: Node) -> None:
    await node.launch_running("j-old", 1, SLEEPS)
    node.stop("j-old", 1, grace=0.0)
    await node.router.settled()
    await node.reports.wait_for(node.reports.of(0, EXITED))  # the end was reported once, then forgotten
    assert node.snapshot() == []
    assert list(node.records.glob("*.json")) == []


async def test_forgetting_a_running_attempt_stops_nothing_and_forgets_its_end_once_reported(node: Node) -> None:
    await node.launch_running("j-run", 1, python_rank("import time; time.sleep(0.5); raise SystemExit(3)"))
    node.forget("j-run", 1)
    assert node.snapshot() == [("j-run", 1, RUNNING)]  # still running: forgetting is not stopping
    ended = await node.reports.wait_for(node.reports.of(0, EXITED))
    assert ended.exit_code == 3
    assert node.snapshot() == []


async def test_forget_leaves_other_attempts_and_jobs_alone(node: Node) -> None:
    for job_id in ("j-a", "j-b"):
        node.router.handle(agent_pb2.CoordinatorMessage(launch_task=launch_task(job_id, 1, python_rank("pass"))))
    await node.router.settled()
    await node.reports.wait_for(lambda s: s.job_id == "j-a" and s.state == EXITED)
    await node.reports.wait_for(lambda s: s.job_id == "j-b" and s.state == EXITED)
    node.forget("j-a", 2)
    assert sorted(node.snapshot()) == [("j-a", 1, EXITED), ("j-b", 1, EXITED)]
    node.forget("j-a", 0)
    assert node.snapshot() == [("j-b", 1, EXITED)]


async def test_log_reads_are_answered_and_unknown_messages_ignored(node: Node) -> None:
    node.router.handle(agent_pb2.CoordinatorMessage(read_logs=agent_pb2.ReadLogs(request_id=7, job_id="nope", attempt=1)))
    node.router.handle(agent_pb2.CoordinatorMessage())  # nothing set: logged and ignored, never raised
    await asyncio.sleep(0)
    assert [(m.log_chunk.request_id, m.log_chunk.error) for m in node.sent] == [(7, "no log for nope attempt 1 rank 0")]


def test_only_a_zero_grace_stop_carries_an_acknowledgement() -> None:
    assert stop_also_forgets(agent_pb2.StopTask(job_id="j", attempt=1, grace_seconds=0))
    assert not stop_also_forgets(agent_pb2.StopTask(job_id="j", attempt=1, grace_seconds=0.5))


async def test_a_launch_from_a_stream_that_is_no_longer_current_is_dropped(node: Node) -> None:
    """A LaunchTask read on a stream that ended, or went stale while the agent was stopped, before its
    turn came: the coordinator may have placed the attempt elsewhere meanwhile, so no rank starts."""
    current = {2}
    node.router.is_current = lambda session: session in current
    node.router.handle(agent_pb2.CoordinatorMessage(launch_task=launch_task("j-stale", 1, SLEEPS)), session=1)
    node.router.handle(agent_pb2.CoordinatorMessage(launch_task=launch_task("j-fresh", 1, python_rank("pass"))), session=2)
    await node.router.settled()
    await node.reports.wait_for(lambda s: s.job_id == "j-fresh" and s.state == EXITED)
    assert [status.job_id for status in node.reports.statuses if status.job_id == "j-stale"] == []
    assert [job_id for job_id, _, _ in node.snapshot()] == ["j-fresh"]


async def test_a_launch_that_raises_reports_each_of_its_ranks_failed_to_start(node: Node, monkeypatch) -> None:
    """A launch the supervisor could not carry out (here its preparation raises, as an agent bug would) is not
    only logged: each rank it did not start is reported FAILED_TO_START, so the coordinator fails or restarts
    the attempt instead of waiting for ranks that will never run. The router goes on with later launches."""
    from agent.ranks import spawn

    prepare = spawn.prepare_launch

    def broken_once(*args, **kwargs):
        monkeypatch.setattr(spawn, "prepare_launch", prepare)
        raise RuntimeError("the rank's state file is unreadable")

    monkeypatch.setattr(spawn, "prepare_launch", broken_once)
    node.router.handle(agent_pb2.CoordinatorMessage(launch_task=launch_task("j-broken", 1, SLEEPS, ranks=2)))
    await node.router.settled()
    failed = node.reports.matching(lambda s: s.job_id == "j-broken" and s.state == agent_pb2.TASK_STATE_FAILED_TO_START)
    assert sorted(status.rank for status in failed) == [0, 1]
    assert all("the rank's state file is unreadable" in status.message for status in failed), failed
    # The agent's fault, not the job's: the coordinator restarts the attempt rather than failing the job.
    assert not any(recovery.permanent_start_failure(status) for status in failed)

    await node.launch_running("j-next", 1, SLEEPS)  # the launcher is still there
