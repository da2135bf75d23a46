"""What to do when an attempt fails, as pure functions over plain data.

An attempt fails when a rank exits non-zero, is killed or cannot start, when its
node goes DOWN, when one of its GPUs turns unhealthy, or when it hangs (no rank
reported progress within the job's timeout). Then every rank of the attempt is
stopped, and the job either restarts — a new attempt, placed anew, after a
capped exponential backoff — or, past its restart budget, fails for good.

Each restart carries a short machine-readable reason that ranks see as
GPUORCH_RESTART_REASON:

    rank_exit:<rank>:<code>     a rank exited with <code> (128+N when killed by signal N, as shells do)
    rank_start:<rank>           a rank could not be started for a reason that may pass (its shim died, the
                                agent refused a stale attempt, the node was out of memory or processes)

A rank that could not start for a reason a restart does not change — its program does not exist
or is not executable, its working directory is missing, its owner cannot be switched to — fails
the job at once with that reason (code start_failed:<rank>), whatever restarts are left: burning
them would only repeat the same error.
    node_down:<node>            the node holding ranks went DOWN
    gpu_unhealthy:<uuid>        a GPU of the attempt turned unhealthy
    hang                        no progress from any rank for the job's progress timeout
    launch_timeout:<node>       a rank there did not start within the launch timeout (rules/launch_timeout.py)

A rank the agent stopped at the job's time limit (TaskStatus.time_limited; code time_limit:<rank>)
fails the job at once with reason "time_limit: ...", whatever restarts are left: a new attempt would
run into the same limit.

One restart reason is no failure: `preempted` (coordinator/rules/preemption.py), the attempt before made
room for higher-ranked work; it uses no restart of the budget and waits out no backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpuorch.start_failures import AGENT_COULD_NOT_LAUNCH
from gpuorch.v1 import agent_pb2


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    backoff_initial_seconds: float = 0.0
    """Delay before the first restart: none, so a crashed rank costs seconds, not minutes."""
    backoff_base_seconds: float = 1.0
    """Delay before the second restart; doubles for each one after."""
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class Restart:
    delay_seconds: float
    restart_number: int
    """1 for the first restart."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


PERMANENT_START_FAILURE = "start_failed"
"""Code prefix of a start failure that a restart would repeat; never a restart reason."""
TIME_LIMIT = "time_limit"
"""Code (and the failed job's reason prefix) of a rank stopped at the job's time limit; never a restart reason."""
TRANSIENT_START_FAILURES = (
    "shim ended",  # the agent's shim died before it could start the rank (killed, OOM)
    "Resource temporarily unavailable",  # EAGAIN: out of processes for now
    "Cannot allocate memory",  # ENOMEM
    "No space left on device",  # ENOSPC creating the working directory
    "Too many open files",  # EMFILE, ENFILE
    "Interrupted system call",
    AGENT_COULD_NOT_LAUNCH,  # the agent's own launch raised (agent/router.py): the agent's fault, not the job's
)
"""Words of a FAILED_TO_START message (the agent's strerror or its own text) that say the cause may pass."""


def permanent_start_failure(status: agent_pb2.TaskStatus) -> bool:
    """True when a rank could not start for a reason every restart would meet again: command not found,
    permission denied, a missing working directory, an owner that cannot be run as. Not a refused launch
    (REJECTED: a stale attempt) and not a start failure whose message names a passing cause."""
    if status.state != agent_pb2.TASK_STATE_FAILED_TO_START:
        return False
    return not any(words in status.message for words in TRANSIENT_START_FAILURES)


@dataclass(frozen=True, slots=True)
class FailureCode:
    """Why an attempt failed, as structured fields; `str()` renders the GPUORCH_RESTART_REASON text."""

    kind: str
    """rank_exit, rank_start, start_failed, time_limit, node_down, gpu_unhealthy, hang or launch_timeout."""
    details: tuple[str, ...] = ()
    """The rank and exit code, the node, the GPU: whatever the kind names."""

    def __str__(self) -> str:
        return ":".join((self.kind, *self.details))

    @property
    def permanent(self) -> bool:
        return self.kind == PERMANENT_START_FAILURE


def failure_code(status: agent_pb2.TaskStatus) -> FailureCode:
    """What one failed rank's end means for its attempt, as a code."""
    if status.time_limited:
        return FailureCode(TIME_LIMIT, (str(status.rank),))
    if permanent_start_failure(status):
        return FailureCode(PERMANENT_START_FAILURE, (str(status.rank),))
    if status.state in (agent_pb2.TASK_STATE_FAILED_TO_START, agent_pb2.TASK_STATE_REJECTED):
        return FailureCode("rank_start", (str(status.rank),))
    code = 128 + status.signal if status.signal else status.exit_code
    return FailureCode("rank_exit", (str(status.rank), str(code)))


def rank_failure_code(status: agent_pb2.TaskStatus) -> str:
    return str(failure_code(status))


def restart_delay(restart_number: int, policy: RecoveryPolicy) -> float:
    """Backoff before restart number `restart_number` (1-based)."""
    if restart_number <= 1:
        return policy.backoff_initial_seconds
    return min(policy.backoff_max_seconds, policy.backoff_base_seconds * 2 ** (restart_number - 2))


def decide(
    max_restarts: int, restarts_used: int, history: list[str], policy: RecoveryPolicy, code: FailureCode | str = ""
) -> Restart | GiveUp:
    """Restart or give up after a failed attempt.

    Args:
        max_restarts: the job's restart budget.
        restarts_used: restarts already made before this failure.
        history: how each attempt so far ended, oldest first (the failed one last).
        code: the failure's code (rank_exit:..., start_failed:..., ...); a permanent start failure gives up at once.
    """
    if isinstance(code, FailureCode) and code.kind == TIME_LIMIT:
        return GiveUp(f"{TIME_LIMIT}: {history[-1]} (not restarted: a new attempt would reach the same limit)")
    permanent = code.permanent if isinstance(code, FailureCode) else code.startswith(PERMANENT_START_FAILURE + ":")
    if permanent and restarts_used < max_restarts:
        return GiveUp(f"{history[-1]} (not restarted: every restart would fail to start the same way)")
    if restarts_used < max_restarts:
        number = restarts_used + 1
        return Restart(restart_delay(number, policy), number)
    if max_restarts == 0:
        return GiveUp(history[-1])
    ends = "; ".join(f"attempt {n}: {end}" for n, end in enumerate(history, start=1))
    return GiveUp(f"{history[-1]} (no restarts left of {max_restarts}; {ends})")


def hung(progress_timeout: float, attempt_started_at: float, last_progress_at: float, now: float) -> bool:
    """True when no rank reported progress for `progress_timeout` seconds (counted from the start
    of the attempt if none ever did). A timeout of 0 disables hang detection."""
    if progress_timeout <= 0:
        return False
    return now - max(attempt_started_at, last_progress_at) >= progress_timeout
