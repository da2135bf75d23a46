"""Inside running jobs, with real processes on loopback: ranks report steps through gpuorch.worker, agents
send them in heartbeats, and the coordinator shows throughput, finds a straggler and restarts away from its
GPU, stops an idle job, and exports it all on /metrics."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request

import pytest

from gpuorch.v1 import job_pb2
from tests.harness import REPO, free_port, wait_for
from tests.test_jobs_e2e import wait_state

STEPS_RANK = str(REPO / "tests" / "workloads" / "steps_rank.py")
RUNNING, SUCCEEDED, CANCELLED = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_CANCELLED


def start(cluster, tmp_path, nodes: dict[str, int], utilization: float | None = None, **settings: object) -> None:
    """A coordinator judging telemetry every 0.5 s (the settings override), and agents of the given GPU counts
    (their utilisation pinned from the start, if given)."""
    config = tmp_path / "coordinator.toml"
    values = {"straggler_window_seconds": 0.5, **settings}
    config.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items() if not isinstance(value, dict)))
    for name, table in ((name, value) for name, value in values.items() if isinstance(value, dict)):
        config.write_text(config.read_text() + f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    metrics_port = free_port()
    cluster.metrics_port = metrics_port
    metrics_listen = f"127.0.0.1:{metrics_port}"
    cluster.coordinator_args = ("--config", str(config), "--metrics-listen", metrics_listen, "--stop-grace-period", "1")
    cluster.start_coordinator(*cluster.coordinator_args)
    for node_id, gpus in nodes.items():
        if utilization is not None:
            cluster.faults_file(node_id).parent.mkdir(parents=True, exist_ok=True)
            cluster.faults_file(node_id).write_text(json.dumps({str(i): {"utilization": utilization} for i in range(gpus)}))
        cluster.add_agent(node_id, gpus, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(len(nodes))


def gpuctl(cluster, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def metrics(cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_step_telemetry_reaches_the_job_gpuctl_and_metrics(cluster, tmp_path):
    start(cluster, tmp_path, {"n1": 2})
    client = cluster.client()
    until = tmp_path / "until"
    argv = [sys.executable, STEPS_RANK, "--until-file", str(until), "--step-seconds", "0.02"]
    job_id = client.submit_job(argv=argv, gpus=2, backend="gloo", owner="alice")
    # Every rank past its first step: a window that took in rank 0's first report shows a rate already, and step 1's loss (1.0).
    job = wait_for(lambda: (j := client.get_job(job_id)).telemetry.steps_per_second > 0 and len(j.telemetry.ranks) == 2
                   and all(rank.step > 1 for rank in j.telemetry.ranks) and j,
                   timeout=30, what="throughput on the job")  # fmt: skip
    shown = job.telemetry
    assert 5 < shown.steps_per_second < 60, "about 1 / 0.02 s a step, less the machine's load"
    assert shown.samples_per_second > shown.steps_per_second, "8 samples a step on each of two ranks"
    assert 0 < shown.scalars["loss"] < 1 and shown.step > 1
    assert {rank.rank for rank in shown.ranks} == {0, 1} and all(0.015 < rank.step_seconds < 0.2 for rank in shown.ranks)
    out = gpuctl(cluster, "job", job_id)
    assert "Progress:   step" in out and "steps/s" in out and "loss=" in out and "STEP SECONDS" in out, out
    series = f'gpuorch_job_steps_total{{job="{job_id}",owner="alice"}}'
    page = wait_for(lambda: page if series in (page := metrics(cluster)) else None, timeout=10, what="job metrics")
    for name in ("gpuorch_job_step_seconds_bucket", "gpuorch_job_step_seconds_count", "gpuorch_job_samples_per_second",
                 "gpuorch_job_stragglers", "gpuorch_job_idle"):  # fmt: skip
        assert f'{name}{{job="{job_id}",' in page and 'owner="alice"' in page, name
    until.touch()
    wait_state(client, job_id, SUCCEEDED)
    assert wait_for(lambda: f'job="{job_id}"' not in metrics(cluster), timeout=10, what="series gone with the job")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (gloo ranks)")
def test_a_straggler_is_flagged_with_its_rank_and_node_and_restarted_away_from_its_gpu(cluster, tmp_path):
    start(cluster, tmp_path, {"n1": 2, "n2": 3}, straggler_windows=3)
    client = cluster.client()
    until, slow = tmp_path / "until", tmp_path / "slow-gpus"
    argv = [sys.executable, STEPS_RANK, "--gloo", "--until-file", str(until), "--step-seconds", "0.1"]
    argv += ["--slow-gpus-file", str(slow)]
    job_id = client.submit_job(argv=argv, gpus=4, gpus_per_node=2, backend="gloo", max_restarts=2,
                               on_straggler=job_pb2.STRAGGLER_ACTION_RESTART)  # fmt: skip
    job = wait_state(client, job_id, RUNNING)
    where = {node.first_rank + i: (node.node_id, u) for node in job.placement.nodes for i, u in enumerate(node.device_uuids)}
    node_id, uuid = where[2]
    wait_for(lambda: len(client.get_job(job_id).telemetry.ranks) == 4, timeout=60, what="every rank's step time")
    slow.write_text(uuid)  # rank 2's GPU now runs at half speed
    job = wait_for(lambda: (j := client.get_job(job_id)).attempt == 2 and j.state == RUNNING and j, timeout=60,
                   what="a restart away from the straggler")  # fmt: skip
    (straggler,) = job.telemetry.stragglers
    assert (straggler.rank, straggler.node_id, straggler.device_uuid, straggler.attempt) == (2, node_id, uuid, 1)
    assert straggler.step_seconds > 1.3 * straggler.median_step_seconds
    assert job.attempts[1].restart_reason == f"straggler:{uuid}" and list(job.excluded_device_uuids) == [uuid]
    assert uuid not in [u for node in job.placement.nodes for u in node.device_uuids], "attempt 2 is not on the slow GPU"
    assert f"Straggler:  rank 2 on {node_id}" in gpuctl(cluster, "job", job_id)
    until.touch()
    assert wait_state(client, job_id, SUCCEEDED, timeout=60).restarts == 1


def test_an_idle_job_is_flagged_then_stopped_at_its_idle_timeout(cluster, tmp_path):
    start(cluster, tmp_path, {"n1": 2}, utilization=0.0, idle_minutes=0.02)
    client = cluster.client()
    idle = client.submit_job(argv=["sleep", "600"], gpus=1, idle_timeout_minutes=0.15)
    exempt = client.submit_job(argv=["sleep", "600"], gpus=1, idle_timeout_minutes=0.15, idle_exempt=True)
    wait_for(lambda: client.get_job(idle).telemetry.idle, timeout=30, what="the idle flag")
    assert "RUNNING (idle)" in next(line for line in gpuctl(cluster, "jobs").splitlines() if line.startswith(idle))
    ended = wait_state(client, idle, CANCELLED, timeout=30)
    assert ended.reason.startswith("idle: its GPUs stayed under 5% utilisation"), ended.reason
    exempt_job = client.get_job(exempt)
    assert exempt_job.state == RUNNING and not exempt_job.telemetry.idle, "an exempt job is never judged idle"
    client.cancel_job(exempt)


def test_gpuctl_usage_totals_match_the_jobs_run_and_survive_a_coordinator_kill(cluster, tmp_path):
    start(cluster, tmp_path, {"n1": 3}, utilization=40.0)
    client = cluster.client()
    alice = client.submit_job(argv=["sleep", "2"], gpus=2, owner="alice")
    bob = client.submit_job(argv=["sleep", "1"], gpus=1, owner="bob")
    jobs = {job_id: wait_state(client, job_id, SUCCEEDED, timeout=30) for job_id in (alice, bob)}

    def expected(job) -> float:
        (attempt,) = job.attempts
        return attempt.placement.world_size * (attempt.end_time.ToNanoseconds() - attempt.start_time.ToNanoseconds()) / 1e9

    def report() -> dict:
        document = json.loads(gpuctl(cluster, "usage", "--by", "owner", "--since", "1h", "-o", "json"))
        return {row["key"]: row for row in document["rows"]} | {"total": document["total"]}

    rows = report()
    assert rows["alice"]["gpu_seconds"] == pytest.approx(expected(jobs[alice]), abs=0.01)
    assert rows["bob"]["gpu_seconds"] == pytest.approx(expected(jobs[bob]), abs=0.01)
    assert 3.9 < rows["alice"]["gpu_seconds"] < 6 and rows["total"]["jobs"] == 2 and rows["total"]["attempts"] == 2
    assert rows["alice"]["mean_gpu_utilization_percent"] == pytest.approx(40.0), "sampled from the agent's telemetry"
    assert rows["alice"]["peak_memory_bytes"] > 0
    cluster.coordinator.kill()
    cluster.start_coordinator(*cluster.coordinator_args)
    assert report() == rows, "the totals are kept in the store"
    by_job = gpuctl(cluster, "usage", "--by", "job", "-o", "csv").splitlines()
    assert by_job[0].startswith("job,owner,pool,jobs") and {line.split(",")[0] for line in by_job[1:]} == {alice, bob, "total"}
