"""A rank's life on this node, as pure rules over plain data (no I/O, no asyncio, no clock).

    launch ──(attempt older than one seen)──────────────────────────────────> REJECTED  (never a rank)
    launch ──> STARTING ──shim: "started <pid>"──> RUNNING ──process ended, cgroup empty──> ENDED
                  │                                                                  (EXITED: exit_code or signal)
                  └──shim: "failed <why>", shim died, or refused before spawning──> ENDED (FAILED_TO_START)
    ENDED ──ForgetAttempt, or UNACKNOWLEDGED_EXIT_TTL seconds──> forgotten (leaves registrations and the state dir)

A stop (StopTask) moves nothing by itself: it signals the rank, whose end then arrives like
any other. ENDED ranks are kept, and re-reported by every registration, until the coordinator
forgets their attempt: a report sent on a stream that broke is not lost.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from gpuorch.v1 import agent_pb2

UNACKNOWLEDGED_EXIT_TTL = 3600.0
"""Seconds an end stays in registrations without the coordinator forgetting its attempt."""


class RankState(enum.Enum):
    """Where a rank the supervisor knows of stands."""

    STARTING = "starting"
    """Its shim was spawned; the shim has not said yet whether the rank runs."""
    RUNNING = "running"
    """Started (or re-attached by a restarted agent); its end is still to come."""
    ENDED = "ended"
    """Its final status is known and was reported; kept until its attempt is forgotten."""


class LaunchAction(enum.Enum):
    """What a LaunchTask means for one of its ranks."""

    START = "start"
    """Never launched on this node: start it."""
    REPORT_AGAIN = "report again"
    """Known and past its start: the coordinator resent the launch (it may have missed a report)."""
    WAIT_FOR_START = "wait for start"
    """Starting right now: its start is reported once the shim says how it went."""
    IGNORE = "ignore"
    """Launched before and since forgotten: a rank is started at most once per attempt."""


def launch_action(known: RankState | None, launched_before: bool) -> LaunchAction:
    """What to do with a launched rank, from what this node knows of it (`known`: None = nothing)."""
    if known is None:
        return LaunchAction.IGNORE if launched_before else LaunchAction.START
    if known is RankState.STARTING:
        return LaunchAction.WAIT_FOR_START
    return LaunchAction.REPORT_AGAIN


FORGOTTEN_LAUNCH = "launched on this node before and forgotten since: not started again, its end is unknown"


def forgotten_launch(job_id: str, attempt: int, rank: int) -> agent_pb2.TaskStatus:
    """What a launch of a rank this node started once and has since forgotten is answered with: gone, as if killed."""
    return agent_pb2.TaskStatus(
        job_id=job_id, attempt=attempt, rank=rank, state=agent_pb2.TASK_STATE_EXITED, signal=9, message=FORGOTTEN_LAUNCH
    )


def stale_attempt(job_id: str, attempt: int, highest_seen: int) -> str:
    """Why a launch of `attempt` must be refused (an older attempt than one already seen); empty if not.

    A coordinator restarted from an old store, or a launch delayed on the wire, must not start
    ranks next to the attempt that replaced them."""
    if attempt < highest_seen:
        return f"attempt {attempt} of {job_id} is older than attempt {highest_seen} already seen"
    return ""


def stop_applies(stop_job: str, stop_attempt: int, job_id: str, attempt: int) -> bool:
    """A stop of (job, attempt) applies to that attempt and every older one; attempt 0 = all of them."""
    return job_id == stop_job and (stop_attempt == 0 or attempt <= stop_attempt)


def forget_applies(forget_job: str, forget_attempt: int, job_id: str, attempt: int) -> bool:
    """A forget of (job, attempt) applies to that attempt only; attempt 0 = every attempt of the job."""
    return job_id == forget_job and (forget_attempt == 0 or attempt == forget_attempt)


def exit_expired(ended_at: float, now: float, ttl: float = UNACKNOWLEDGED_EXIT_TTL) -> bool:
    """Whether an end reported at wall time `ended_at` has waited too long for its attempt to be forgotten."""
    return ended_at < now - ttl


def sigterm_reason() -> str:
    return "stopped with SIGTERM"


def time_limit_deadline(started_wall: float, time_limit_seconds: float) -> float:
    """Wall time a rank started at `started_wall` must end by; 0 = no limit."""
    return started_wall + time_limit_seconds if time_limit_seconds > 0 else 0.0


def time_limit_reason(time_limit_seconds: float) -> str:
    return f"reached its time limit of {time_limit_seconds:g}s"


def sigkill_reason(grace: float) -> str:
    return f"killed with SIGKILL after a {grace:g}s grace period"


@dataclass(frozen=True, slots=True)
class EndFacts:
    """What the agent knows once a rank's processes are gone."""

    exit_status: Mapping[str, str] | None
    """The shim's exit file (exit_code=, signal= or failed_to_start=); None when there is none."""
    rank_pid: int
    """0 when the rank never started (the shim ended before saying so)."""
    shim_pid: int
    shim_end: str = ""
    """How the shim itself ended, when the agent was its parent, e.g. "exit status 1"."""
    watching_rank_only: bool = False
    """The shim was gone and the rank itself was watched: no exit file can come."""
    kill_reason: str = ""
    """Why the agent signalled the rank, if it did."""
    log_path: str = ""


@dataclass(frozen=True, slots=True)
class ExitMeaning:
    """The final TaskStatus fields of a rank."""

    state: agent_pb2.TaskState
    """EXITED or FAILED_TO_START."""
    exit_code: int = 0
    signal: int = 0
    message: str = ""
    pid: int = 0


def exit_meaning(facts: EndFacts) -> ExitMeaning:
    """What a rank's end means, from its exit file and what the agent saw of its shim."""
    status = facts.exit_status
    if status is None and not facts.rank_pid:
        return ExitMeaning(
            agent_pb2.TASK_STATE_FAILED_TO_START,
            message=f"the rank's shim ended ({facts.shim_end or 'status unknown'}) before starting it; see {facts.log_path}",
        )
    if status is None:
        who = "the rank" if facts.watching_rank_only else f"the shim (pid {facts.shim_pid})"
        message = f"exit status lost: {who} ended without recording it"
        if facts.kill_reason:
            message += f"; {facts.kill_reason}"
        return ExitMeaning(agent_pb2.TASK_STATE_EXITED, signal=signal.SIGKILL, message=message, pid=facts.rank_pid)
    if "failed_to_start" in status:
        return ExitMeaning(agent_pb2.TASK_STATE_FAILED_TO_START, message=status["failed_to_start"])
    if "signal" in status:
        signum = int(status["signal"])
        named = f"killed by {signal.Signals(signum).name}" if signum in signal.valid_signals() else ""
        return ExitMeaning(agent_pb2.TASK_STATE_EXITED, signal=signum, message=facts.kill_reason or named, pid=facts.rank_pid)
    return ExitMeaning(agent_pb2.TASK_STATE_EXITED, exit_code=int(status.get("exit_code", "0")), pid=facts.rank_pid)
