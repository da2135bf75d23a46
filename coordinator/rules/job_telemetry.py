"""Inside a running job: its step rates, its stragglers, whether it idles, as pure decisions.

`rank_progress` takes one rank's report from a heartbeat. Every `straggler_window_seconds` the
coordinator calls `window` for each running attempt with its GPUs' latest utilisation:

- A straggler is a rank whose step time (fresh in this window) is above `straggler_ratio` x the median
  of the ranks' step times for `straggler_windows` windows in a row. A gang runs at the pace of its
  slowest rank, so one slow GPU (throttling, a bad link, a noisy neighbour) holds every rank back.
  It is flagged on the job once per attempt; with STRAGGLER_ACTION_RESTART, and a restart left, the
  attempt is restarted (reason "straggler:<uuid>") and the job is never placed on that GPU again.
- An attempt is idle when every GPU it holds has been under `idle_utilization_percent` for
  `idle_minutes` (flagged); with an idle timeout (the job's, else its pool's) it is cancelled with
  reason "idle: ..." once they have been for that long. A job with idle_exempt is never judged.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.model.job_telemetry import AttemptTelemetry, RankSteps
from coordinator.model.jobs import Attempt, JobEntry
from coordinator.rules import job_machine
from coordinator.rules.effects import Effect, Notify
from coordinator.rules.job_machine import MachineConfig, Now, stamp
from coordinator.rules.recovery import FailureCode
from gpuorch.v1 import job_pb2

STRAGGLER = "straggler"
"""Code (restart reason prefix) of an attempt restarted away from a straggler's GPU."""
IDLE = "idle"
"""Reason prefix of a job cancelled for idling."""


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    straggler_ratio: float = 1.3
    straggler_windows: int = 5
    idle_utilization_percent: float = 5.0
    idle_minutes: float = 30.0
    idle_timeout_minutes: Mapping[str, float] = field(default_factory=dict)
    """Pool -> minutes of idleness after which its jobs are cancelled, unless a job sets its own; absent = never."""


def telemetry_config(
    ratio: float, windows: int, window_seconds: float, idle_percent: float, idle_minutes: float, timeouts: object
) -> TelemetryConfig:
    """The coordinator's straggler and idle settings, checked; raises ValueError naming the one out of range."""
    if not ratio > 1:
        raise ValueError(f"straggler_ratio must be > 1 (a rank this many times slower than the median), got {ratio}")
    if windows < 1:
        raise ValueError(f"straggler_windows must be >= 1, got {windows}")
    if not window_seconds > 0:
        raise ValueError(f"straggler_window_seconds must be > 0, got {window_seconds}")
    if not 0 < idle_percent <= 100:
        raise ValueError(f"idle_utilization_percent must be in (0, 100], got {idle_percent}")
    if not idle_minutes > 0:
        raise ValueError(f"idle_minutes must be > 0, got {idle_minutes}")
    if not isinstance(timeouts, dict):
        raise ValueError(f"idle_timeout_minutes must be a table of pool = minutes, got {timeouts!r}")
    for pool, minutes in timeouts.items():
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0:
            raise ValueError(f"idle_timeout_minutes.{pool} must be minutes >= 0, got {minutes!r}")
    return TelemetryConfig(ratio, windows, idle_percent, idle_minutes, {str(k): float(v) for k, v in timeouts.items()})


def rank_progress(
    state: AttemptTelemetry, rank: int, step: int, samples: int, step_seconds: float, wall: float, scalars: Mapping[str, float]
) -> bool:
    """Takes one rank's report; True when it is new (the rank reached a later step). Heartbeats repeat a report
    until the rank writes its next, so only a later step counts: for the rates, the histogram and the windows."""
    steps = state.ranks.get(rank)
    if steps is None:
        steps = state.ranks[rank] = RankSteps()
    before, reported = steps.step, steps.reported_wall
    if step <= before:
        return False
    if reported and (elapsed := wall - reported) > 0:
        steps.steps_per_second = (step - before) / elapsed
        steps.samples_per_second = max(0, samples - steps.samples) / elapsed
    if step_seconds > 0:
        state.histogram.observe(step_seconds, step - before)
        steps.step_seconds = step_seconds
    steps.step, steps.samples, steps.reported_wall = step, samples, wall
    if rank == 0 and scalars:
        state.scalars = dict(scalars)
    return True


def judge_stragglers(state: AttemptTelemetry, ratio: float, windows: int) -> list[int]:
    """One window: every rank with a fresh step time is slow (above ratio x the median of the fresh ones) or not;
    returns the ranks whose run of slow windows just reached `windows` (each only once per attempt). Fewer than
    two fresh ranks say nothing about each other."""
    fresh = [(rank, steps) for rank, steps in state.ranks.items() if steps.step > steps.judged_step and steps.step_seconds > 0]
    if len(fresh) < 2:
        return []
    median = statistics.median(steps.step_seconds for _, steps in fresh)
    found = []
    for rank, steps in fresh:
        steps.judged_step = steps.step
        steps.slow_windows = steps.slow_windows + 1 if steps.step_seconds > ratio * median else 0
        if steps.slow_windows >= windows and rank not in state.flagged:
            state.flagged.add(rank)
            found.append(rank)
    return found


@dataclass(frozen=True, slots=True)
class IdleVerdict:
    changed: bool
    """The idle flag turned on or off."""
    stop: bool
    """Idle for the job's timeout: cancel it."""
    idle_seconds: float


def judge_idle(
    state: AttemptTelemetry, utilizations: Sequence[float], now_wall: float, threshold: float, flag_after: float,
    stop_after: float,
) -> IdleVerdict:  # fmt: skip
    """Every GPU under `threshold` percent since `low_utilization_since`: idle once that is `flag_after` seconds
    ago, to be stopped once it is `stop_after` (0 = never). No samples (a node not reporting) change nothing."""
    if not utilizations:
        return IdleVerdict(False, False, 0.0)
    state.utilization_percent = sum(utilizations) / len(utilizations)
    if max(utilizations) >= threshold:
        was = state.idle
        state.low_utilization_since, state.idle = None, False
        return IdleVerdict(was, False, 0.0)
    if state.low_utilization_since is None:
        state.low_utilization_since = now_wall
    low_for = now_wall - state.low_utilization_since
    newly = not state.idle and low_for >= flag_after
    state.idle = state.idle or newly
    return IdleVerdict(newly, stop_after > 0 and low_for >= stop_after, low_for)


def idle_timeout_seconds(spec: job_pb2.JobSpec, config: TelemetryConfig) -> float:
    """The job's idle timeout, else its pool's; 0 = never stopped for idling."""
    minutes = spec.idle_timeout_minutes or config.idle_timeout_minutes.get(spec.pool or "default", 0.0)
    return 60.0 * minutes


def window(
    entry: JobEntry,
    attempt: Attempt,
    state: AttemptTelemetry,
    utilizations: Sequence[float],
    now: Now,
    config: TelemetryConfig,
    machine: MachineConfig,
) -> list[Effect]:
    """One window of a running attempt: judge its stragglers and its idleness, act on them, and show the
    figures on the job (Job.telemetry); its watchers are told when they changed."""
    shown_step = entry.job.telemetry.step
    job = entry.job
    effects = _judged(entry, attempt, state, utilizations, now, config, machine)
    if job.telemetry.step != shown_step and Notify(job.job_id) not in effects:
        effects.append(Notify(job.job_id))  # watchers see the figures move, once a window at most
    return effects


def _judged(
    entry: JobEntry,
    attempt: Attempt,
    state: AttemptTelemetry,
    utilizations: Sequence[float],
    now: Now,
    config: TelemetryConfig,
    machine: MachineConfig,
) -> list[Effect]:
    job = entry.job
    effects: list[Effect] = []
    for rank in judge_stragglers(state, config.straggler_ratio, config.straggler_windows):
        effects += _straggler_found(entry, attempt, state, rank, now, machine)
    if job.state != job_pb2.JOB_STATE_RUNNING or job.attempt != attempt.attempt:
        show(job, attempt, state, now.wall)
        return effects
    if not job.spec.idle_exempt:
        stop_after = idle_timeout_seconds(job.spec, config)
        flag_after = 60.0 * config.idle_minutes
        verdict = judge_idle(state, utilizations, now.wall, config.idle_utilization_percent, flag_after, stop_after)
        show(job, attempt, state, now.wall)
        if verdict.stop:
            reason = (
                f"{IDLE}: its GPUs stayed under {config.idle_utilization_percent:g}% utilisation for "
                f"{verdict.idle_seconds / 60:.1f} min (idle timeout {stop_after / 60:g} min)"
            )
            return effects + job_machine.cancel(entry, now, machine, reason)
        if verdict.changed:
            effects.append(Notify(job.job_id))
    else:
        show(job, attempt, state, now.wall)
    return effects


def _straggler_found(
    entry: JobEntry, attempt: Attempt, state: AttemptTelemetry, rank: int, now: Now, machine: MachineConfig
) -> list[Effect]:
    job = entry.job
    node_id, uuid = attempt.where(rank) or ("", "")
    steps = state.ranks[rank]
    median = statistics.median(s.step_seconds for s in state.ranks.values() if s.step_seconds > 0)
    record = job.telemetry.stragglers.add(rank=rank, node_id=node_id, device_uuid=uuid, attempt=attempt.attempt)
    record.step_seconds, record.median_step_seconds = steps.step_seconds, median
    record.flag_time.CopyFrom(stamp(now.wall))
    restart = (
        job.spec.on_straggler == job_pb2.STRAGGLER_ACTION_RESTART
        and job.state == job_pb2.JOB_STATE_RUNNING
        and job.attempt == attempt.attempt
        and job.restarts < job.spec.max_restarts
        and uuid
    )
    if not restart:
        return [Notify(job.job_id)]
    job.excluded_device_uuids.append(uuid)
    description = (
        f"rank {rank} on node {node_id} (GPU {uuid}) is a straggler: {steps.step_seconds:.3g} s a step against "
        f"the job's median {median:.3g} s; restarted without that GPU"
    )
    return job_machine.attempt_failed(entry, FailureCode(STRAGGLER, (uuid,)), description, now, machine)


def show(job: job_pb2.Job, attempt: Attempt, state: AttemptTelemetry, now_wall: float) -> None:
    """Writes the attempt's figures into Job.telemetry (its stragglers list is kept: it spans attempts)."""
    shown = job.telemetry
    shown.steps_per_second = state.steps_per_second
    shown.samples_per_second = state.samples_per_second
    shown.step = state.step
    shown.scalars.clear()
    shown.scalars.update(state.scalars)
    del shown.ranks[:]
    for rank in sorted(state.ranks):
        steps = state.ranks[rank]
        node_id, uuid = attempt.where(rank) or ("", "")
        shown.ranks.add(rank=rank, node_id=node_id, device_uuid=uuid, step=steps.step, step_seconds=steps.step_seconds,
                        slow_windows=steps.slow_windows)  # fmt: skip
    shown.idle = state.idle
    if state.low_utilization_since is None:
        shown.ClearField("low_utilization_since")
    else:
        shown.low_utilization_since.CopyFrom(stamp(state.low_utilization_since))
    shown.gpu_utilization_percent = state.utilization_percent
    shown.update_time.CopyFrom(stamp(now_wall))
