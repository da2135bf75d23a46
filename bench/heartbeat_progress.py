"""--progress of bench/heartbeats.py: every simulated agent runs one 8-rank job and reports its ranks'
progress in every heartbeat (its docstring says what is measured).

Bench side (`submit_jobs`, `wait_running`): before the agents start, one job of 8 GPUs on one node
(gpus=8, gpus_per_node=8, argv ["true"], which no agent ever executes) is submitted per agent through
gpuorch.AsyncClient; once every agent has registered the bench waits until the coordinator reports
every job RUNNING (GetClusterStatus.jobs_by_state) before the warm-up and the window start.

Agent side (`ProgressAgent`, used by bench/heartbeat_load.py): a simulated agent answers each LaunchTask
on its stream with a TaskStatus RUNNING per rank (and a StopTask for its job with a TaskStatus EXITED
per rank, signal 15), from then on every heartbeat carries one RankProgress per rank with the launch's job
id and attempt: the step grows by 1 a heartbeat, samples by 32 a step, step_seconds is 0.9-1.1 s,
last_progress_time the send time, and rank 0 adds the scalars {"loss", "lr"}. The agent's writes to its
stream go through one lock (statuses from the reader, heartbeats from the sender: a grpc.aio stream takes
one write at a time).
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc

import gpuorch
from gpuorch.v1 import agent_pb2, job_pb2

JOB_GPUS = 8
SAMPLES_PER_STEP = 32
SUBMIT_CONCURRENCY = 32


class ProgressAgent:
    """The job one simulated agent runs: answers its launches and writes its ranks' progress into the heartbeat."""

    def __init__(self, heartbeat: agent_pb2.Heartbeat, seed: int) -> None:
        self.heartbeat = heartbeat
        self.random = random.Random(seed)
        self.job_id = ""
        self.attempt = 0
        self.ranks: list[agent_pb2.RankProgress] = []
        self.launches = 0

    def answer(self, message: agent_pb2.CoordinatorMessage) -> list[agent_pb2.AgentMessage]:
        """What the agent sends back for one coordinator message (nothing for most)."""
        kind = message.WhichOneof("payload")
        if kind == "launch_task":
            return self._launched(message.launch_task)
        if kind == "stop_task" and message.stop_task.job_id == self.job_id:
            stop = message.stop_task
            if stop.attempt == 0 or stop.attempt >= self.attempt:
                return self._stopped()
        return []

    def _launched(self, launch: agent_pb2.LaunchTask) -> list[agent_pb2.AgentMessage]:
        self.launches += 1
        self.job_id, self.attempt = launch.job_id, launch.attempt
        del self.heartbeat.progress[:]
        self.ranks = []
        for rank in launch.ranks:
            progress = self.heartbeat.progress.add(job_id=launch.job_id, attempt=launch.attempt, rank=rank.rank)
            if rank.rank == 0:
                progress.scalars["lr"] = 3e-4
            self.ranks.append(progress)
        return [self._status(rank.rank, agent_pb2.TASK_STATE_RUNNING, pid=10_000 + rank.rank) for rank in launch.ranks]

    def _stopped(self) -> list[agent_pb2.AgentMessage]:
        statuses = [self._status(progress.rank, agent_pb2.TASK_STATE_EXITED, signal=15) for progress in self.ranks]
        del self.heartbeat.progress[:]
        self.ranks = []
        self.job_id, self.attempt = "", 0
        return statuses

    def _status(self, rank: int, state: int, **fields) -> agent_pb2.AgentMessage:
        return agent_pb2.AgentMessage(
            task_status=agent_pb2.TaskStatus(job_id=self.job_id, attempt=self.attempt, rank=rank, state=state, **fields)
        )

    def advance(self, seconds: int, nanos: int) -> int:
        """One more step on every rank, reported now; returns the number of RankProgress the heartbeat carries."""
        uniform = self.random.uniform
        for progress in self.ranks:
            progress.step += 1
            progress.samples += SAMPLES_PER_STEP
            progress.step_seconds = uniform(0.9, 1.1)
            stamp = progress.last_progress_time
            stamp.seconds, stamp.nanos = seconds, nanos
            if progress.rank == 0:
                progress.scalars["loss"] = 2.5 / (1 + 0.01 * progress.step)
        return len(self.ranks)


async def _submit(target: str, count: int) -> list[str]:
    async with gpuorch.AsyncClient(target, timeout=60) as client:
        gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def one(index: int) -> str:
            async with gate:
                return await client.submit_job(
                    argv=["true"], gpus=JOB_GPUS, gpus_per_node=JOB_GPUS, name=f"bench-progress-{index}"
                )

        return await asyncio.gather(*(one(index) for index in range(count)))


def submit_jobs(coordinator, agents: int, log) -> tuple[dict, list[str]]:
    """Submits one 8-GPU job per agent, before any agent registers (each scheduling pass then places many
    at once as nodes come, where submissions to a full cluster would each pay a pass over every node);
    returns what it took, and the job ids."""
    started = time.monotonic()
    job_ids = asyncio.run(_submit(coordinator.target, agents))
    submitted = time.monotonic() - started
    log(f"[{agents} agents] submitted {len(job_ids)} jobs of {JOB_GPUS} GPUs in {submitted:.1f}s")
    return {"jobs_submitted": len(job_ids), "jobs_submit_s": round(submitted, 2)}, job_ids


def wait_running(coordinator, agents: int, log, timeout: float) -> dict:
    """Waits until the coordinator reports `agents` jobs RUNNING; raises if one fails or time runs out."""
    started = time.monotonic()
    last_report = 0.0
    while True:
        if coordinator.process.poll() is not None:
            raise RuntimeError(f"coordinator exited with {coordinator.process.returncode}:\n{coordinator.log_tail()}")
        try:
            by_state = dict(coordinator.status(timeout=30).jobs_by_state)
        except grpc.RpcError as error:
            by_state = {"error": f"{error.code().name}"}
        running = by_state.get("JOB_STATE_RUNNING", 0)
        if running >= agents:
            break
        if by_state.get("JOB_STATE_FAILED", 0):  # e.g. nodes declared down while the coordinator was starved
            raise RuntimeError(f"jobs failed before the window (see the coordinator log): {by_state}")
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise RuntimeError(f"only {running}/{agents} jobs RUNNING after {timeout:.0f}s: {by_state}")
        if elapsed - last_report >= 5:
            last_report = elapsed
            log(f"[{agents} agents] jobs by state: {by_state}")
        time.sleep(0.5)
    waited = time.monotonic() - started
    log(f"[{agents} agents] all {agents} jobs RUNNING ({waited:.1f}s after the last registration)")
    return {"jobs_running_after_registration_s": round(waited, 2)}


def progress_check(coordinator, job_ids: list[str]) -> dict:
    """What the coordinator made of the progress of a few jobs (their step telemetry), to show it was ingested."""
    picked = job_ids[:: max(1, len(job_ids) // 4)][:4]
    jobs = []
    with gpuorch.Client(coordinator.target, timeout=30) as client:
        for job_id in picked:
            job = client.get_job(job_id)
            telemetry = job.telemetry
            jobs.append(
                {
                    "job_id": job_id,
                    "state": job_pb2.JobState.Name(job.state),
                    "step": telemetry.step,
                    "steps_per_second": round(telemetry.steps_per_second, 3),
                    "samples_per_second": round(telemetry.samples_per_second, 1),
                    "ranks_with_step_time": len(telemetry.ranks),
                    "scalars": {key: round(value, 4) for key, value in telemetry.scalars.items()},
                    "stragglers": len(telemetry.stragglers),
                }
            )
    return {"sampled_jobs": jobs}
