"""gpuorch-sim runs the coordinator's own scheduling path: a 30-job trace of 1-3 s jobs, run on a real
coordinator with real agents (simulated GPUs, real `sleep` ranks), starts its jobs in the same order
as the simulator does with the same trace.

The simulator is given the trace as the coordinator recorded it (each job's submit time, and when each
of its ranks' ends reached the coordinator, counted from the placement: the coordinator logs them at
debug level), so that process start-up and reporting delays, which the simulator does not model, do not
shift its clock against the real one. A real job's ranks end one by one, each freeing its GPU, and a pass
may run between them; so rank r of every job here ends r x RANK_END_SPACING after rank 0, and the
simulator ends each rank when the coordinator saw it end: both then see the same partly freed jobs. (On a
loaded machine the reports of one job's ranks come anything from 0.2 s to a second apart: an end
reconstructed from the spacing would free GPUs in the simulator up to a second after they came free.)
The planned trace spaces submits by at least 300 ms, so that no decision depends on which of two events
tens of milliseconds apart came first.
"""

from __future__ import annotations

import json
import random
import sys
import time

from coordinator.sim import cli
from gpuorch.v1 import job_pb2
from tests.harness import wait_for

NODES, GPUS_PER_NODE = 2, 3
RANK_END_SPACING = 0.2
RANK_PROGRAM = """
import os, sys, time
marker = sys.argv[1]
try:
    os.mkdir(marker)  # the job's first rank to start makes it; its time is the job's reference
except FileExistsError:
    pass
time.sleep(max(0.0, os.stat(marker).st_mtime + {duration} + {spacing} * int(os.environ["RANK"]) - time.time()))
"""
"""Rank r ends r x spacing after rank 0, counted from the job's first rank's start (not its own: ranks on
two agents start tens of milliseconds apart)."""


def planned_trace() -> list[dict]:
    """30 jobs over ~14 s on 6 GPUs: more work than fits, of mixed sizes and priorities, so that the queue
    builds and ordering, reservations and backfill all decide something."""
    rng = random.Random(13)
    jobs, submit = [], 0.0
    for n in range(30):
        jobs.append(
            {
                "name": f"j{n:02d}",
                "submit_time": round(submit, 2),
                "duration": rng.choice((1.0, 1.4, 1.8, 2.2, 2.6, 3.0)),
                "gpus": rng.choice((1, 1, 2, 2, 3, 4, 6)),
                "priority": rng.choice((0, 0, 0, 5)),
            }
        )
        submit += rng.choice((0.3, 0.45, 0.6))
    return jobs


def start_order(jobs: list[dict]) -> list[str]:
    """Names by start time; jobs started by one pass (the same time) in submit order."""
    return [job["name"] for job in sorted(jobs, key=lambda job: (job["start"], job["submit"], job["name"]))]


def rank_ends(log: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(job id, attempt) -> [(rank, when the coordinator applied its end)] from the coordinator's JSON log."""
    ends: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for line in log.splitlines():
        if '"rank ended"' not in line:
            continue
        record = json.loads(line)
        ends.setdefault((record["job"], record["attempt"]), []).append((record["rank"], record["at"]))
    return ends


def test_a_real_cluster_and_the_simulator_start_the_jobs_in_the_same_order(cluster, tmp_path):
    cluster.start_coordinator("--log-level", "debug")
    for n in range(NODES):
        cluster.add_agent(f"n{n}", GPUS_PER_NODE)
    cluster.wait_for_nodes(NODES)
    client = cluster.client()
    plan = planned_trace()
    (tmp_path / "started").mkdir()
    ids = {}
    began = time.monotonic()
    for job in plan:
        time.sleep(max(0.0, began + job["submit_time"] - time.monotonic()))
        ids[job["name"]] = client.submit_job(
            argv=[
                sys.executable,
                "-I",
                "-S",
                "-c",
                RANK_PROGRAM.format(duration=job["duration"], spacing=RANK_END_SPACING),
                str(tmp_path / "started" / job["name"]),
            ],
            gpus=job["gpus"],
            priority=job["priority"],
            name=job["name"],
        )

    def all_done():
        states = {name: client.get_job(job_id) for name, job_id in ids.items()}
        return all(job.state == job_pb2.JOB_STATE_SUCCEEDED for job in states.values()) and states

    finished = wait_for(all_done, timeout=60, interval=0.2, what="every job to succeed")
    seconds = {name: (job.submit_time.ToNanoseconds() / 1e9, job.attempts) for name, job in finished.items()}
    origin = min(submit for submit, _ in seconds.values())
    ended = rank_ends(cluster.coordinator.output())
    real, recorded = [], []
    for job in plan:
        submit, attempts = seconds[job["name"]]
        assert len(attempts) == 1, f"{job['name']} ran once"
        start, end = attempts[0].start_time.ToNanoseconds() / 1e9, attempts[0].end_time.ToNanoseconds() / 1e9
        real.append({"name": job["name"], "submit": submit - origin, "start": start - origin})
        ranks = sorted(ended.get((ids[job["name"]], 1), []))
        assert [rank for rank, _ in ranks] == list(range(job["gpus"])), f"{job['name']}: every rank's end logged once"
        assert abs(max(at for _, at in ranks) - end) < 0.001, f"{job['name']}: its last rank's end is the attempt's"
        offsets = [round(max(0.001, at - start), 6) for _, at in ranks]
        recorded.append({**job, "submit_time": round(submit - origin, 6), "duration": max(offsets), "rank_ends": offsets})
    trace = tmp_path / "recorded.jsonl"
    trace.write_text("".join(json.dumps(job) + "\n" for job in recorded))

    pools = f"default={NODES}x{GPUS_PER_NODE}"
    result = cli.simulate(cli.Options(trace=str(trace), pools=pools, per_job=True))

    simulated = result["per_job"]
    table = "\n".join(
        f"{job['name']} gpus={job['gpus']} prio={job['priority']} submit={actual['submit']:.3f} real start={actual['start']:.3f} "
        f"sim start={sim['start']:.3f} duration={job['duration']:.3f}"
        for job, actual, sim in zip(recorded, real, simulated, strict=True)
    )
    assert start_order(simulated) == start_order(real), table
    waited = [job for job in real if job["start"] - job["submit"] > 0.5]
    assert len(waited) >= 10, "the queue built up: the order was the scheduler's choice"
    by_submit = [job["name"] for job in sorted(real, key=lambda job: job["submit"])]
    assert start_order(real) != by_submit, "priorities or backfill reordered the queue"
    for sim, actual in zip(
        sorted(simulated, key=lambda job: job["name"]), sorted(real, key=lambda job: job["name"]), strict=True
    ):
        assert abs(sim["start"] - actual["start"]) < 0.25, (sim, actual)
