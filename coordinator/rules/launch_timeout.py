"""Launches that never finish: an attempt some rank of which has not reported its start within the
launch timeout fails with code `launch_timeout:<node>`, within the job's restart budget.

Placing an attempt takes its GPUs; they are worth something only once its ranks run. A launch can
stall where nothing else notices: an agent that keeps heartbeating while its start of a rank hangs
(a working directory on a hung network filesystem, a stuck cgroup write, a launch lost between two
processes). Without a timeout such an attempt stays LAUNCHING, its job RUNNING, for ever. The
timeout counts from the placement (monotonic; from the coordinator's restart for a restored
attempt), and it is the same idea as Slurm's BatchStartTimeout. Only ranks on READY nodes time
out: a node that is SUSPECT, or not yet back after a coordinator restart, is liveness's to judge
(it returns with its ranks, or goes DOWN and gives them up), not this rule's.

What counts as started is what the agent reported RUNNING. A rank its agent is still starting is
listed in a registration (after a broken stream or a coordinator restart) as RUNNING with `starting`
set: kept, neither fenced nor launched again, but not started, so a launch stuck across a
re-registration still times out (rules/job_machine.rank_reported).

The failed attempt is stopped like any other, so the ranks that did start end and give their GPUs
back at once, instead of waiting in a rendezvous that can never complete. A rank that did not start
keeps its GPU until its agent reports its end (it may still start: then it is stopped as part of
a superseded attempt), and the job's next attempt waits for that, as after any failure: two
attempts of a job never run at once. A node that goes DOWN meanwhile gives its ranks up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from coordinator.model.jobs import Attempt, JobEntry
from coordinator.rules import job_machine
from coordinator.rules.effects import Effect
from coordinator.rules.recovery import FailureCode
from gpuorch.v1 import job_pb2

LAUNCH_TIMEOUT = "launch_timeout"
"""The failure code's kind, and the start of the job's restart reason."""


def unstarted_ranks(attempt: Attempt) -> list[int]:
    """Ranks that have reported neither their start nor their end."""
    return [rank for rank in range(attempt.world_size) if rank not in attempt.running and rank not in attempt.ended]


def stalled(
    entries: Iterable[JobEntry], timeout_seconds: float, now: job_machine.Now, node_ready: Callable[[str], bool]
) -> list[tuple[JobEntry, list[int]]]:
    """The running jobs whose current attempt has a rank on a READY node not started `timeout_seconds`
    after its launch (0: no timeout), each with those ranks."""
    if timeout_seconds <= 0:
        return []
    found = []
    for entry in entries:
        attempt = entry.current
        if entry.job.state != job_pb2.JOB_STATE_RUNNING or attempt is None or attempt.all_started_at:
            continue
        if now.monotonic - attempt.launched_at < timeout_seconds:
            continue
        missing = [rank for rank in unstarted_ranks(attempt) if node_ready(attempt.node_of(rank) or "")]
        if missing:
            found.append((entry, missing))
    return found


def fail_stalled(
    entries: Iterable[JobEntry], now: job_machine.Now, config: job_machine.MachineConfig, node_ready: Callable[[str], bool]
) -> list[Effect]:
    """Fails every stalled launch (see `stalled`), naming the ranks and nodes that did not start."""
    effects: list[Effect] = []
    timeout = config.launch_timeout_seconds
    for entry, missing in stalled(entries, timeout, now, node_ready):  # judged in full before any fails
        attempt = entry.current
        assert attempt is not None  # stalled() returns only jobs with a current attempt
        nodes = list(dict.fromkeys(node for rank in missing if (node := attempt.node_of(rank)) is not None))
        ranks = ", ".join(str(rank) for rank in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        description = f"rank(s) {ranks} on {', '.join(nodes)} did not start within {timeout:g}s of the launch ({LAUNCH_TIMEOUT})"
        effects += job_machine.attempt_failed(entry, FailureCode(LAUNCH_TIMEOUT, (nodes[0],)), description, now, config)
    return effects
