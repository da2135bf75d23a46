"""The coordinator's instructions, routed to the rank supervisor.

    launch_task     start ranks                      in order, one launch after another, on one task
    stop_task       signal ranks (SIGTERM, SIGKILL)  each on a task of its own
    forget_attempt  stop reporting an attempt's ends at once
    read_logs       part of a rank's log             answered at once
    open_session    an interactive session           on a task of its own (agent/interactive/relay.py)

Stopping and forgetting are two instructions: a stop signals ranks and says nothing about their
ends, which are reported, and re-reported by every registration, until the coordinator sends
ForgetAttempt. A coordinator that predates ForgetAttempt meant both by a StopTask with a zero
grace period ("attempt over", or a fence); that one is still read as a stop followed by a forget
(see `stop_also_forgets`).

Launches run one after another so that the stream reader never waits on a process start and
the ranks of two launches start in the order they were sent; a stop does not wait behind them
(one rank's grace period must not delay the next launch). A launch whose stream is no longer
current when its turn comes (it ended, or went stale while the agent was stopped: see
agent/coordinator_link.py) is dropped: the coordinator may have given its attempt up, and the
next registration, which does not list it, lets the coordinator judge it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from agent.ranks.supervisor import Supervisor
from gpuorch.logs import get_logger
from gpuorch.start_failures import AGENT_COULD_NOT_LAUNCH
from gpuorch.v1 import agent_pb2, interactive_pb2

log = get_logger("agent.router")

SendFn = Callable[[agent_pb2.AgentMessage], bool]
SessionCheck = Callable[[int], bool]
"""Whether instructions received on a session (stream number) may still be acted on."""


def always_current(session: int) -> bool:
    return True


def ignore_session(request: interactive_pb2.NodeSessionRequest) -> None:
    log.warning("ignoring an interactive session: this agent has no sessions", session=request.session_id)


def stop_also_forgets(stop: agent_pb2.StopTask) -> bool:
    """Whether a StopTask carries an older coordinator's acknowledgement too: a zero grace period
    meant "stop what is left of this attempt, then forget it" before ForgetAttempt existed."""
    return stop.grace_seconds == 0


class Router:
    """Turns each CoordinatorMessage into calls on the supervisor; see the module docstring."""

    def __init__(self, supervisor: Supervisor, send: SendFn, is_current: SessionCheck = always_current) -> None:
        self.supervisor = supervisor
        self.send = send
        """Queues a message for the coordinator (the log chunks answering read_logs)."""
        self.is_current = is_current
        self.open_session: Callable[[interactive_pb2.NodeSessionRequest], None] = ignore_session
        """Opens an interactive session (agent/interactive/relay.py's NodeSessions.open)."""
        self._launches: asyncio.Queue[tuple[agent_pb2.LaunchTask, int]] = asyncio.Queue()
        self._background: set[asyncio.Task] = set()
        self._launcher: asyncio.Task | None = None

    def handle(self, message: agent_pb2.CoordinatorMessage, session: int = 0) -> None:
        """Routes one message; never blocks the stream reader (launches and stops run on tasks)."""
        kind = message.WhichOneof("payload")
        if kind == "launch_task":
            if self._launcher is None:
                self._launcher = asyncio.get_running_loop().create_task(self._launch_in_order())
            self._launches.put_nowait((message.launch_task, session))
        elif kind == "stop_task":
            self._spawn(self._stop(message.stop_task))
        elif kind == "forget_attempt":
            forget = message.forget_attempt
            log.info("forgetting attempt", job=forget.job_id, attempt=forget.attempt)
            self.supervisor.forget_attempt(forget.job_id, forget.attempt)
        elif kind == "read_logs":
            self.send(agent_pb2.AgentMessage(log_chunk=self.supervisor.read_log(message.read_logs)))
        elif kind == "open_session":
            if self.is_current(session):
                self.open_session(message.open_session)
        else:
            log.warning("ignoring coordinator message this agent cannot handle", kind=kind)

    async def settled(self) -> None:
        """Returns once every launch and stop received so far is done (for tests and shutdown)."""
        await self._launches.join()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        """Cancels what is still in progress (the ranks themselves keep running)."""
        tasks = [*self._background, *([self._launcher] if self._launcher is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _launch_in_order(self) -> None:
        while True:
            launch, session = await self._launches.get()
            try:
                if not self.is_current(session):
                    log.warning(
                        "launch dropped: its stream is gone or went stale before it could start",
                        job=launch.job_id,
                        attempt=launch.attempt,
                        session=session,
                    )
                    continue
                await self.supervisor.launch(launch)
            except Exception as error:
                log.exception("launch failed", job=launch.job_id, attempt=launch.attempt)
                self._report_unstarted(launch, f"{AGENT_COULD_NOT_LAUNCH}: {error}")
            finally:
                self._launches.task_done()

    def _report_unstarted(self, launch: agent_pb2.LaunchTask, why: str) -> None:
        """After a launch that raised: each of its ranks the supervisor never started is reported FAILED_TO_START,
        or the coordinator would wait for ranks that will never run (their GPUs held, the next attempt waiting)."""
        for rank_launch in launch.ranks:
            if (launch.job_id, launch.attempt, rank_launch.rank) not in self.supervisor.ranks:
                try:
                    self.supervisor.fail_before_start(launch, rank_launch, why)
                except Exception:
                    log.exception("could not report a rank that did not start", job=launch.job_id, rank=rank_launch.rank)

    async def _stop(self, stop: agent_pb2.StopTask) -> None:
        try:
            await self.supervisor.stop(stop)
            if stop_also_forgets(stop):
                self.supervisor.forget_attempt(stop.job_id, stop.attempt)
        except Exception:
            log.exception("stop failed", job=stop.job_id, attempt=stop.attempt)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
