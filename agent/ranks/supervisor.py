"""The rank supervisor: starts a job's rank processes on this node, watches them, stops them.

Orchestration only: what a launch, an exit or a stale attempt means is decided in lifecycle.py
(pure), the shim is started by spawn.py, processes are watched by watch.py, files live where
state_dir.py says, cgroups are cgroups.py's.

Ranks outlive the agent. Each rank is started through `agent/ranks/shim.py`, which stays the
rank's parent, waits for it and writes its exit status to a file; the agent watches the shim
with a pidfd, which works whether or not the shim is its child. A restarted agent reloads the
per-rank records from the state dir (`recover()`), re-attaches to shims still alive and reads
the exit files of ranks that ended while no agent ran.

Each rank runs in a cgroup of its own when the node has a cgroup v2 subtree for the agent
(cgroups.py): stopping it kills everything it started, and its end is reported only once its
cgroup is empty.

An ended rank stays in `snapshot()` (so a re-registration re-delivers its end) until the
coordinator forgets its attempt (`forget_attempt()`), or for at most lifecycle.UNACKNOWLEDGED_EXIT_TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.identity import IdentityPolicy
from agent.ranks import cgroups, lifecycle, logs, spawn, watch
from agent.ranks.cgroups import NO_LIMITS, RankCgroups, RankLimits
from agent.ranks.lifecycle import LaunchAction, RankState
from agent.ranks.progress import ProgressReader
from agent.ranks.rank import Rank, RankKey
from agent.ranks.state_dir import RankRecord, StateDir, invalid_job_id, read_exit_file
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2

log = get_logger("agent.supervisor")

KILL_WAIT = 10.0
"""Seconds stop() waits for a rank to die after SIGKILL before giving up on it (a process in D state)."""

ReportFn = Callable[[agent_pb2.TaskStatus], None]


class Supervisor:
    """Starts, watches and stops this node's rank processes; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        report: ReportFn,
        *,
        identity_policy: IdentityPolicy | None = None,
        owners_authenticated: Callable[[], bool] = lambda: False,
        cgroups: RankCgroups | None = None,
        default_limits: RankLimits = NO_LIMITS,
        max_log_bytes: int = 0,
        python: str = sys.executable,
        clock: Clock = SYSTEM_CLOCK,
        terminals: spawn.TerminalOpener | None = None,
    ) -> None:
        self.state = StateDir(Path(state_dir))
        self.report_fn = report
        self.identity_policy = identity_policy or IdentityPolicy()
        self.owners_authenticated = owners_authenticated
        """Whether the coordinator vouches for LaunchTask.owner now (its last RegisterAck)."""
        self.cgroups = cgroups
        self.default_limits = default_limits
        self.max_log_bytes = max_log_bytes
        self.python = python
        self.terminals = terminals
        self.clock = clock
        self.ranks: dict[RankKey, Rank] = {}
        self.progress_reader = ProgressReader()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future] = set()
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Reloads rank records left by a previous agent: re-attaches to ranks still running and
        reports those that ended meanwhile. Call once, before the first launch."""
        self._loop = asyncio.get_running_loop()
        for record, record_path in self.state.load_records():
            rank = Rank(record=record, record_path=record_path, state=RankState.RUNNING)
            rank.started.set()
            self.ranks[rank.key] = rank
            if not record.rank_pid:
                record.rank_pid = record.read_pid_file()
            if record.cgroup and self.cgroups is not None and os.path.isdir(record.cgroup):
                with contextlib.suppress(OSError):
                    self.cgroups.apply_limits(Path(record.cgroup), RankLimits(record.pids_max, record.memory_max_bytes))
            exit_status = read_exit_file(Path(record.exit_path))
            fields = {**rank.fields, "pid": record.rank_pid}
            if exit_status is not None:
                self._finish_once_empty(rank, exit_status, ended_at=os.stat(record.exit_path).st_mtime)
            elif self._watch(rank, record.shim_pid, record.shim_start_time):
                log.info("rank re-attached", **fields)
                self._enforce_time_limit(rank)
            elif record.rank_pid and self._watch(rank, record.rank_pid, record.rank_start_time):
                rank.watching_rank_only = True
                log.warning("rank re-attached without its shim; its exit status will be lost", **fields)
                self._enforce_time_limit(rank)
            else:
                self._finish_once_empty(rank, None)
        self._expire_old_exits()

    async def launch(self, launch: agent_pb2.LaunchTask) -> None:
        """Starts one process per RankLaunch, returning once each runs or failed to start (each one reported)."""
        self._loop = asyncio.get_running_loop()
        job_id, attempt = launch.job_id, launch.attempt
        refusal = invalid_job_id(job_id) or lifecycle.stale_attempt(job_id, attempt, self.state.job(job_id).highest_attempt)
        if refusal:
            log.warning("launch rejected", job=job_id, attempt=attempt, reason=refusal)
            for rank_launch in launch.ranks:
                rejected = agent_pb2.TASK_STATE_REJECTED
                self._report(
                    agent_pb2.TaskStatus(job_id=job_id, attempt=attempt, rank=rank_launch.rank, state=rejected, message=refusal)
                )
            return

        job = self.state.job(job_id)
        if attempt > job.highest_attempt:
            job.highest_attempt, job.launched_ranks = attempt, []
        new_ranks = []
        for rank_launch in launch.ranks:
            known = self.ranks.get((job_id, attempt, rank_launch.rank))
            action = lifecycle.launch_action(known.state if known else None, rank_launch.rank in job.launched_ranks)
            if action is LaunchAction.START:
                new_ranks.append(rank_launch)
            elif action is LaunchAction.REPORT_AGAIN and known is not None:
                # The coordinator resent the launch (it may have missed our report): say again where it stands.
                log.info("launch already handled", job=job_id, attempt=attempt, rank=rank_launch.rank)
                self._report(known.final_status or known.running_status())
            elif action is LaunchAction.IGNORE:
                # Not started again; said, so that a coordinator that sent the launch again does not wait for it.
                log.info("launch ignored", job=job_id, attempt=attempt, rank=rank_launch.rank, why=action.value)
                self._report(lifecycle.forgotten_launch(job_id, attempt, rank_launch.rank))
        if not new_ranks:
            return
        # Recorded before anything starts: a rank is started at most once, even across an agent crash.
        job.launched_ranks.extend(rank_launch.rank for rank_launch in new_ranks)
        settings = spawn.StartSettings(self.python, self.cgroups, self.default_limits, self.max_log_bytes, self.terminals)
        how = spawn.prepare_launch(self.state, launch, self.identity_policy, self.owners_authenticated(), settings)
        started = []
        for rank_launch in new_ranks:
            if isinstance(how, str):
                self.fail_before_start(launch, rank_launch, how)
                continue
            try:
                started.append(self._spawn(launch, rank_launch, how))
            except OSError as error:
                self.fail_before_start(launch, rank_launch, f"cannot start the rank's shim: {error}")
        await asyncio.gather(*(self._await_start(rank, notify_fd) for rank, notify_fd in started))

    async def stop(self, stop: agent_pb2.StopTask) -> None:
        """Sends SIGTERM to every matching rank's process group (of `stop.attempt` and older; 0 = every attempt), SIGKILL
        to those still alive after `stop.grace_seconds`; returns when all of them ended (their ends are reported as usual)."""
        targets = [r for r in self.ranks.values() if lifecycle.stop_applies(stop.job_id, stop.attempt, *r.key[:2])]
        if targets:
            log.info("stopping ranks", job=stop.job_id, attempt=stop.attempt, ranks=len(targets), reason=stop.reason)
        await asyncio.gather(*(self._stop_rank(rank, max(0.0, stop.grace_seconds)) for rank in targets))

    def forget_attempt(self, job_id: str, attempt: int) -> None:
        """The coordinator has every end of this attempt (0 = of every attempt of the job): its ended
        ranks leave snapshot() and the state dir now, those still running once their end is reported."""
        for rank in list(self.ranks.values()):
            if lifecycle.forget_applies(job_id, attempt, *rank.key[:2]):
                if rank.state is RankState.ENDED:
                    self._forget(rank)
                else:
                    rank.forget_once_ended = True

    def snapshot(self) -> list[agent_pb2.TaskStatus]:
        """Every rank still running, and every end not yet forgotten, for the agent's Register."""
        self._expire_old_exits()
        return [rank.final_status or rank.running_status() for rank in self.ranks.values()]

    def read_log(self, request: agent_pb2.ReadLogs) -> agent_pb2.LogChunk:
        """Part of a rank's log (see logs.read_log_chunk); unknown ranks get `error` set, not an exception."""
        if invalid_job_id(request.job_id):
            what = f"{request.job_id} attempt {request.attempt} rank {request.rank}"
            return agent_pb2.LogChunk(request_id=request.request_id, error=f"no log for {what}: {invalid_job_id(request.job_id)}")
        rank = self.ranks.get((request.job_id, request.attempt, request.rank))
        log_path = self.state.rank_base(request.job_id, request.attempt, request.rank).with_suffix(".log")
        return logs.read_log_chunk(request, log_path, running=rank is not None and not rank.ended.is_set())

    def progress(self) -> list[agent_pb2.RankProgress]:
        """Each running rank's latest progress report (ranks that never reported are left out)."""
        running = [
            (rank.key, logs.progress_path(Path(rank.record.pid_path))) for rank in self.ranks.values() if not rank.ended.is_set()
        ]
        return self.progress_reader.reports(running)

    def running_count(self) -> int:
        return sum(1 for rank in self.ranks.values() if not rank.ended.is_set())

    async def close(self) -> None:
        """Stops watching; the ranks keep running (a restarted agent recovers them)."""
        self._closed = True
        for rank in self.ranks.values():
            self._unwatch(rank)
        if self.cgroups is not None:
            self.cgroups.release_controllers()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- launching --------------------------------------------------------------------------

    def fail_before_start(self, launch: agent_pb2.LaunchTask, rank_launch: agent_pb2.RankLaunch, why: str) -> None:
        """The rank will not start: reported FAILED_TO_START with `why`, and kept as ended like an exit."""
        log.warning("rank failed to start", job=launch.job_id, attempt=launch.attempt, rank=rank_launch.rank, error=why)
        # Kept like an exit (in memory only: nothing was started) until forgotten.
        never_started = RankRecord(
            launch.job_id, launch.attempt, rank_launch.rank, rank_launch.local_rank, 0, None, 0, None, "", "", ""
        )
        rank = Rank(record=never_started, record_path=Path(), state=RankState.ENDED)
        rank.started.set()
        rank.ended.set()
        rank.final_status = rank.status(agent_pb2.TASK_STATE_FAILED_TO_START, message=why)
        rank.ended_at = self.clock.wall()
        self.ranks[rank.key] = rank
        self._report(rank.final_status)

    def _spawn(self, launch: agent_pb2.LaunchTask, rank_launch: agent_pb2.RankLaunch, how: spawn.HowToStart) -> tuple[Rank, int]:
        """Starts the shim of one rank; returns the rank and the read end of its start notification."""
        record, notify_read = spawn.start_rank(self.state, launch, rank_launch, how)
        rank = Rank(record=record, record_path=self.state.record_path(record.job_id, record.attempt, record.rank))
        self.ranks[rank.key] = rank
        self.state.save_record(record, rank.record_path)
        self._watch(rank, record.shim_pid, record.shim_start_time)
        return rank, notify_read

    async def _await_start(self, rank: Rank, notify_fd: int) -> None:
        """Waits for the shim's word that the rank runs (or why it could not start) and reports it."""
        record, fields = rank.record, rank.fields
        try:
            notice = spawn.parse_start_notice(await spawn.read_start_notice(notify_fd))
            if notice is None:
                # The shim died before saying anything; the end of the shim reports what happened.
                record.rank_pid = record.read_pid_file()
            elif notice.failure:
                log.warning("rank failed to start", **fields, error=notice.failure)
                rank.final_status = rank.status(agent_pb2.TASK_STATE_FAILED_TO_START, message=notice.failure)
                self._report(rank.final_status)
            else:
                record.rank_pid, record.working_dir = notice.rank_pid, notice.working_dir
                record.rank_start_time = watch.process_start_time(record.rank_pid)
                record.deadline_wall = lifecycle.time_limit_deadline(self.clock.wall(), record.time_limit_seconds)
                self.state.save_record(record, rank.record_path)
                log.info("rank started", **fields, pid=record.rank_pid)
                rank.state = RankState.RUNNING  # before the report: it says the rank runs, not that it is starting
                self._report(rank.running_status())
                self._enforce_time_limit(rank)
        finally:
            os.close(notify_fd)
            if rank.state is RankState.STARTING:
                rank.state = RankState.RUNNING
            rank.started.set()

    # ---- watching ---------------------------------------------------------------------------

    def _watch(self, rank: Rank, pid: int, start_time: int | None) -> bool:
        """Watches `pid` with a pidfd; False if that process (same pid, same start time) is gone."""
        assert self._loop is not None
        rank.pidfd = watch.watch(self._loop, pid, start_time, lambda: self._on_process_end(rank, pid))
        return rank.pidfd >= 0

    def _unwatch(self, rank: Rank) -> None:
        watch.unwatch(self._loop, rank.pidfd)
        rank.pidfd = -1

    def _on_process_end(self, rank: Rank, pid: int) -> None:
        self._unwatch(rank)
        rank.shim_end = watch.reap(pid) or rank.shim_end
        # The start is reported before the end, even when both happen in one loop iteration.
        self._background(self._finish_after_start(rank))

    async def _finish_after_start(self, rank: Rank) -> None:
        await rank.started.wait()
        if self._closed:
            return
        record = rank.record
        exit_status = None if rank.watching_rank_only else read_exit_file(Path(record.exit_path))
        lost_shim = exit_status is None and not rank.watching_rank_only and record.rank_pid
        # The shim was killed on its own; the rank may well live on. Keep watching it until it ends.
        if lost_shim and self._watch(rank, record.rank_pid, record.rank_start_time):
            rank.watching_rank_only = True
            log.warning("rank lost its shim; its exit status will be lost", **rank.fields, pid=record.rank_pid)
            return
        if record.cgroup:
            await cgroups.empty_and_remove(Path(record.cgroup), complain_every=KILL_WAIT)
        if not self._closed:
            self._finish(rank, exit_status)

    def _finish_once_empty(self, rank: Rank, exit_status: dict[str, str] | None, *, ended_at: float | None = None) -> None:
        """_finish() for a rank that ended while no agent ran: at once if its cgroup is empty, else once it
        is (until then the rank counts as running: what it started still holds its GPUs)."""
        cgroup = Path(rank.record.cgroup) if rank.record.cgroup else None
        if cgroup is None or cgroups.is_empty(cgroup):
            if cgroup is not None:
                cgroups.remove(cgroup)
            self._finish(rank, exit_status, ended_at=ended_at)
            return

        async def finish(cgroup: Path) -> None:
            await cgroups.empty_and_remove(cgroup, complain_every=KILL_WAIT)
            if not self._closed:
                self._finish(rank, exit_status, ended_at=ended_at)

        self._background(finish(cgroup))

    def _finish(self, rank: Rank, exit_status: dict[str, str] | None, *, ended_at: float | None = None) -> None:
        """Records how the rank ended and reports it (unless its failed start was already reported)."""
        already_reported = rank.final_status is not None
        status = rank.end(exit_status, ended_at or self.clock.wall())
        if not (already_reported and status.state == agent_pb2.TASK_STATE_FAILED_TO_START):
            state = agent_pb2.TaskState.Name(status.state)
            pid, exit_code, signum = rank.record.rank_pid, status.exit_code, status.signal
            log.info("rank ended", **rank.fields, pid=pid, state=state, exit_code=exit_code, signal=signum)
            self._report(status)
        if rank.forget_once_ended:
            self._forget(rank)

    # ---- stopping ---------------------------------------------------------------------------

    def _enforce_time_limit(self, rank: Rank) -> None:
        """At the rank's deadline (if it has one) it is stopped as a stop would, and its end marked time-limited."""
        if rank.record.deadline_wall:
            self._background(self._stop_at_deadline(rank))

    async def _stop_at_deadline(self, rank: Rank) -> None:
        record = rank.record
        await asyncio.sleep(max(0.0, record.deadline_wall - self.clock.wall()))
        if not rank.ended.is_set():
            log.warning("rank reached its time limit; stopping it", **rank.fields, time_limit=record.time_limit_seconds)
            record.time_limited = True
            self.state.save_record(record, rank.record_path)
            why = lifecycle.time_limit_reason(record.time_limit_seconds)
            await self._stop_rank(rank, max(0.0, record.stop_grace_seconds), why)

    async def _stop_rank(self, rank: Rank, grace: float, why: str = "") -> None:
        await rank.started.wait()  # a launch still in progress: its pid is known once it started
        if rank.ended.is_set():
            return
        record, fields = rank.record, rank.fields
        if not record.rank_pid:
            record.rank_pid = record.read_pid_file()
        if not record.rank_pid:
            log.warning("cannot stop a rank whose pid is unknown", **fields)
            return
        rank.kill_reason = f"{why}; {lifecycle.sigterm_reason()}" if why else lifecycle.sigterm_reason()
        watch.signal_group(record.rank_pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rank.ended.wait(), grace)
            return
        rank.kill_reason = f"{why}; {lifecycle.sigkill_reason(grace)}" if why else lifecycle.sigkill_reason(grace)
        log.warning("rank outlived its grace period; killing it", **fields, grace=grace)
        watch.signal_group(record.rank_pid, signal.SIGKILL)
        if record.cgroup:
            cgroups.kill(Path(record.cgroup))  # and whatever left the process group
        try:
            await asyncio.wait_for(rank.ended.wait(), KILL_WAIT)
        except TimeoutError:
            log.error("rank still alive after SIGKILL", **fields, pid=record.rank_pid)

    # ---- forgetting and reporting -------------------------------------------------------------

    def _forget(self, rank: Rank) -> None:
        self._unwatch(rank)
        self.ranks.pop(rank.key, None)
        self.state.remove_record(rank.record_path)

    def _expire_old_exits(self) -> None:
        now = self.clock.wall()
        for rank in list(self.ranks.values()):
            if rank.ended.is_set() and lifecycle.exit_expired(rank.ended_at, now):
                log.info("forgetting an unacknowledged exit", **rank.fields)
                self._forget(rank)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report(self, status: agent_pb2.TaskStatus) -> None:
        try:
            self.report_fn(status)
        except Exception:
            log.exception("reporting a task status failed", job=status.job_id, attempt=status.attempt, rank=status.rank)
