"""Runtime estimates for the scheduling loop's requests, learned from finished jobs, and start-time estimates.

A job's estimate is the user's `estimated_runtime_seconds`, else its time limit, else a prediction from the
runtimes of finished jobs (coordinator/scheduler/prediction.py). The predictor learns from every job that
ends (and, after a restart, from the store's final jobs). A request carrying a prediction is cached like any
other; the first pass after something new was observed brings up to date the predictions it may have changed
(those whose tier, or a more specific one, got a runtime), and only those, so a pass never re-predicts 10,000
jobs. What a pass sees is thus what was learned before it, whenever it runs: not a timer's phase, which would
differ between the coordinator (a pass every second, and late under load) and the simulator (a pass at each
event), and so would make one of them backfill a job the other does not.

Every `interval_seconds` (not every pass) the scheduler is run forward from a snapshot of the live state
(coordinator/scheduler/forecast.py) and every pending job's `estimated_start_time` is set or cleared. The
snapshot is plain frozen data, so the forecast needs no lock; it runs in its own task, one scheduling pass
at a time, giving the event loop back between passes (a pass at 1,000 nodes takes ~10-15 ms), so it never
holds up the scheduling loop or the API for longer than one pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from coordinator import scheduler
from coordinator.model.jobs import JobEntry
from coordinator.rules import job_reasons
from coordinator.scheduler.forecast import (
    DEFAULT_MAX_JOBS,
    DEFAULT_MAX_STEPS,
    DEFAULT_RESOLUTION_SECONDS,
    Forecast,
    forecast_steps,
)
from coordinator.scheduler.prediction import RuntimePredictor
from gpuorch.logs import get_logger
from gpuorch.v1 import job_pb2

if TYPE_CHECKING:
    from coordinator.control.scheduling_loop import SchedulingLoop

log = get_logger("coordinator.jobs")

FORECAST_CPU_SHARE = 0.1
"""The forecasts' share of the event loop at most: after one that took s seconds of steps, the next starts no
sooner than s / FORECAST_CPU_SHARE later (the interval is a floor; a big cluster's forecasts run less often)."""
LEARNED_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED})
"""Jobs whose last attempt's runtime is learned from. A cancelled job's runtime is the user's choice, not the
job's length; a failed one held its GPUs that long, which is what backfill and start estimates need to know."""


def pool_of(spec: job_pb2.JobSpec) -> str:
    """The job's pool: JobSpec.pool where the wire has it, else the default pool."""
    return getattr(spec, "pool", "") or "default"


def runtime_of(job: job_pb2.Job) -> float:
    """Seconds the last attempt of a final job ran; 0 if it never ran."""
    if not job.attempts:
        return 0.0
    last = job.attempts[-1]
    if not last.HasField("start_time") or not last.HasField("end_time"):
        return 0.0
    return (last.end_time.ToNanoseconds() - last.start_time.ToNanoseconds()) / 1e9


@dataclass(eq=False)
class Estimates:
    predictor: RuntimePredictor = field(default_factory=RuntimePredictor)
    interval_seconds: float = 5.0
    """Start-time estimates are recomputed at most this often; 0 = never (every job's estimate unknown)."""
    max_steps: int = DEFAULT_MAX_STEPS
    max_jobs: int = DEFAULT_MAX_JOBS
    resolution_seconds: float = DEFAULT_RESOLUTION_SECONDS
    predicted: dict[str, tuple[str, tuple[tuple, ...]]] = field(default_factory=dict)
    """Job id -> (name, the predictor's keys its prediction depends on), for the cached requests whose estimate
    is a prediction."""
    dependents: dict[tuple, set[str]] = field(default_factory=dict)
    """Predictor key -> the jobs of `predicted` whose prediction depends on it (its index: a refresh visits only
    the jobs of the keys that changed)."""
    _learned_at: int = 0
    _next_forecast: float = 0.0
    _estimated: set[str] | None = None
    """Jobs whose estimated_start_time this module set (cleared once they stop pending); None until the first
    forecast, which clears every other pending job's (an estimate stored before a restart is stale)."""
    last: Forecast | None = None
    last_seconds: float = 0.0
    """How long the last forecast took (the clock's monotonic time)."""

    # -- runtime prediction --

    def with_estimate(self, request: scheduler.JobRequest, name: str) -> scheduler.JobRequest:
        """The request with its runtime estimate: the user's, else the time limit, else a prediction."""
        if request.estimated_runtime_seconds > 0:
            return request
        if request.time_limit_seconds > 0:
            return replace(request, estimated_runtime_seconds=request.time_limit_seconds)
        predictor, owner, gpus, pool = self.predictor, request.owner, request.gpus, request.pool
        prediction = predictor.predict(owner=owner, name=name, gpus=gpus, pool=pool)
        self._depend(request.job_id, name, predictor.depends_on(prediction, owner=owner, name=name, gpus=gpus, pool=pool))
        return replace(request, estimated_runtime_seconds=prediction.seconds) if prediction.seconds else request

    def _depend(self, job_id: str, name: str, depends_on: tuple[tuple, ...]) -> None:
        before = self.predicted.get(job_id)
        self.predicted[job_id] = (name, depends_on)
        if before is not None and before[1] == depends_on:
            return
        if before is not None:
            self._undepend(job_id, before[1])
        for key in depends_on:
            self.dependents.setdefault(key, set()).add(job_id)

    def _undepend(self, job_id: str, depends_on: tuple[tuple, ...]) -> None:
        for key in depends_on:
            jobs = self.dependents.get(key)
            if jobs is not None:
                jobs.discard(job_id)
                if not jobs:
                    del self.dependents[key]

    def forget(self, job_id: str) -> None:
        """The job's request is gone for good (the job is final): its prediction is not refreshed any more."""
        before = self.predicted.pop(job_id, None)
        if before is not None:
            self._undepend(job_id, before[1])

    def learn(self, entries: Iterable[JobEntry]) -> None:
        """Observes the runtime of each final job (oldest end first, so the windows keep the newest)."""
        for entry in entries:
            job = entry.job
            runtime = runtime_of(job) if job.state in LEARNED_STATES else 0.0
            if runtime > 0:
                spec = job.spec
                self.predictor.observe(runtime, owner=spec.owner, name=spec.name, gpus=spec.gpus, pool=pool_of(spec))

    def learn_history(self, entries: Iterable[JobEntry]) -> None:
        """After a restart: every final job of the store, in the order they ended."""
        self.learn(sorted((e for e in entries if e.final), key=lambda e: e.job.end_time.ToNanoseconds()))

    def refresh(self, requests: dict[str, scheduler.JobRequest]) -> int:
        """Brings up to date the predicted estimates of cached requests that what was observed since the last
        refresh may have changed; returns how many changed. Cheap when nothing new was observed (most passes)."""
        predictor = self.predictor
        if predictor.observed == self._learned_at:
            return 0
        self._learned_at = predictor.observed
        touched = predictor.take_touched()
        memo: dict[tuple, tuple[float, tuple[tuple, ...]]] = {}
        changed = 0
        predicted, dependents = self.predicted, self.dependents
        affected = list(predicted) if touched is None else {job for key in touched for job in dependents.get(key, ())}
        for job_id in affected:
            request = requests.get(job_id)
            if request is None:
                self.forget(job_id)  # final, or its request is rebuilt (and re-predicted) next pass
                continue
            name = predicted[job_id][0]
            key = (request.owner, name, request.gpus, request.pool)
            answer = memo.get(key)
            if answer is None:
                prediction = predictor.predict(owner=key[0], name=name, gpus=key[2], pool=key[3])
                depends = predictor.depends_on(prediction, owner=key[0], name=name, gpus=key[2], pool=key[3])
                answer = memo[key] = (prediction.seconds, depends)
            self._depend(job_id, name, answer[1])
            if answer[0] != request.estimated_runtime_seconds:
                requests[job_id] = replace(request, estimated_runtime_seconds=answer[0])
                changed += 1
        return changed

    # -- start-time estimates --

    def forecast_due(self, monotonic: float) -> bool:
        return self.interval_seconds > 0 and monotonic >= self._next_forecast

    def _begin(self, loop: SchedulingLoop) -> Generator[int, None, Forecast]:
        """The forecast over a snapshot of the live state: the ready pending jobs, the nodes, the running jobs."""
        manager = loop.manager
        wall = manager.clock.wall()
        pending = [
            loop.request(entry)
            for job_id, entry in manager.pending.items()
            if manager.backoffs.get(job_id, 0.0) <= wall and job_reasons.waiting_for_previous(entry) is None
        ]
        # With no job waiting there is nothing to forecast: the snapshot of every node and running job would
        # cost a large cluster's event loop a stall (0.3-0.5 s at 2,000 nodes) every interval for nothing.
        views = loop.node_views() if pending else []
        running = loop.running_jobs() if pending else []
        return forecast_steps(views, pending, running, loop.config, now=wall, max_steps=self.max_steps,
                              max_jobs=self.max_jobs, resolution_seconds=self.resolution_seconds)  # fmt: skip

    def _publish(self, loop: SchedulingLoop, forecast: Forecast, started: float) -> None:
        """Sets the estimate of every job the forecast placed that still pends; clears the others' old ones."""
        jobs, pending = loop.manager.jobs, loop.manager.pending
        starts = {job_id: start for job_id, start in forecast.starts.items() if job_id in pending}
        for job_id in (pending.keys() if self._estimated is None else self._estimated) - starts.keys():
            entry = jobs.get(job_id)
            if entry is not None:
                entry.job.ClearField("estimated_start_time")
        for job_id, start in starts.items():
            jobs[job_id].job.estimated_start_time.FromNanoseconds(int(start * 1e9))
        self._estimated = set(starts)
        self.last = forecast
        self.last_seconds = loop.elapsed_clock() - started
        log.debug("start times estimated", estimated=len(starts), pending=len(pending), steps=forecast.steps,
                  seconds=round(self.last_seconds, 4))  # fmt: skip

    def forecast(self, loop: SchedulingLoop, monotonic: float) -> Forecast:
        """Runs the whole forecast now (tests; the daemon uses `run`) and publishes it."""
        self._next_forecast = monotonic + self.interval_seconds
        steps = self._begin(loop)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                self._publish(loop, done.value, monotonic)
                return done.value

    async def run(self, loop: SchedulingLoop) -> None:
        """The daemon's forecasts: every interval_seconds, one pass at a time with the event loop given back between."""
        while self.interval_seconds > 0:
            await asyncio.sleep(max(0.0, self._next_forecast - loop.elapsed_clock()))
            started = loop.elapsed_clock()
            busy = 0.0
            try:
                step_started = started
                steps = self._begin(loop)
                while True:
                    try:
                        next(steps)
                    except StopIteration as done:
                        self._publish(loop, done.value, started)
                        break
                    finally:
                        busy += loop.elapsed_clock() - step_started
                    await asyncio.sleep(0)
                    step_started = loop.elapsed_clock()
            except Exception:  # a failed forecast leaves the estimates as they were; the next one tries again
                log.exception("start-time estimate failed; trying again next interval")
            self._next_forecast = started + max(self.interval_seconds, busy / FORECAST_CPU_SHARE)
