"""Preemption with real processes on loopback: a real coordinator, one agent with one simulated GPU, and real
rank processes running examples/preemptible.py, which checkpoints on SIGTERM and resumes from its checkpoint."""

from __future__ import annotations

import sys

from gpuorch.v1 import job_pb2
from tests.harness import REPO, wait_for
from tests.test_cli import gpuctl
from tests.test_jobs_e2e import logs, wait_state

PREEMPTIBLE = str(REPO / "examples" / "preemptible.py")
RUNNING, SUCCEEDED = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED
GRACE_SECONDS = 8
"""The preemption grace the coordinator is started with: short for the test, long enough for the checkpoint."""
PRIORITY_CLASSES = """
[priority_classes.batch]
priority = 0

[priority_classes.urgent]
priority = 10
preempts = ["batch"]
"""
"""Jobs of priority 10 and up may preempt running jobs below it (the coordinator's [priority_classes] settings)."""


def attempt_log(client, job_id: str, attempt: int) -> str:
    return b"".join(client.job_logs(job_id, 0, attempt=attempt)).decode()


def test_a_high_priority_job_preempts_a_running_one_which_checkpoints_requeues_and_completes(cluster):
    config = cluster.root / "coordinator.toml"
    config.write_text(PRIORITY_CLASSES)
    cluster.start_coordinator("--config", str(config), "--preemption-grace-seconds", str(GRACE_SECONDS))
    cluster.add_agent("n1", 1, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    steps = 60
    low = client.submit_job(
        argv=[sys.executable, PREEMPTIBLE, "--steps", str(steps), "--step-seconds", "0.1", "--checkpoint-seconds", "1"],
        gpus=1,
        priority=0,
        max_restarts=0,  # a preemption that used a restart would fail it: none is left
        name="low",
    )
    wait_state(client, low, RUNNING)
    wait_for(lambda: "STEP 3\n" in logs(client, low, 0), timeout=30, what="the low job to make progress")
    high = client.submit_job(argv=[sys.executable, "-c", "print('urgent work done')"], gpus=1, priority=10, name="high")

    # The high job runs on the victim's GPU once the victim has checkpointed and ended; then the victim resumes.
    done_high = wait_state(client, high, SUCCEEDED, timeout=60)
    done_low = wait_state(client, low, SUCCEEDED, timeout=90)
    first, second = done_low.attempts
    assert first.end_reason.startswith("preempted") and high in first.end_reason, first.end_reason
    assert second.restart_reason == "preempted" and done_low.restarts == 0, "requeued without using a restart"
    assert first.end_time.ToNanoseconds() <= done_high.start_time.ToNanoseconds() <= second.start_time.ToNanoseconds()

    before = attempt_log(client, low, 1)
    checkpoint_lines = [line for line in before.splitlines() if line.startswith("CHECKPOINT")]
    assert checkpoint_lines, f"the victim checkpointed within its grace:\n{before[-600:]}"
    checkpointed = int(checkpoint_lines[0].split("=")[1])
    after = attempt_log(client, low, 2)
    assert f"START attempt=2 reason=preempted resumed_from={checkpointed}" in after, after[:600]
    assert 0 < checkpointed < steps, "preempted mid-run, resumed from where it stopped"
    expected_total = steps * (steps + 1) // 2
    assert f"DONE steps={steps} total={expected_total} expected={expected_total}" in after, after[-600:]

    shown = gpuctl("--coordinator", cluster.address, "job", low)
    assert shown.returncode == 0, shown.stderr
    assert "preempted" in shown.stdout and high in shown.stdout, shown.stdout


def test_a_preemption_survives_a_coordinator_killed_during_the_grace(cluster):
    """SIGKILLed while the victim checkpoints: restarted, the coordinator still knows the job preempted (not failed,
    and not succeeded by a rank's exit), and the agent's re-registration does not get the rank killed mid-checkpoint."""
    config = cluster.root / "coordinator.toml"
    config.write_text(PRIORITY_CLASSES)
    arguments = ("--config", str(config), "--preemption-grace-seconds", "20", "--node-grace-period", "30")
    cluster.start_coordinator(*arguments)
    cluster.add_agent("n1", 1, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    steps = 40
    low = client.submit_job(
        argv=[sys.executable, PREEMPTIBLE, "--steps", str(steps), "--step-seconds", "0.1", "--checkpoint-seconds", "8"],
        gpus=1,
        max_restarts=0,
    )
    wait_for(lambda: "STEP 3\n" in logs(client, low, 0), timeout=30, what="the low job to make progress")
    high = client.submit_job(argv=[sys.executable, "-c", "print('urgent work done')"], gpus=1, priority=10)
    wait_for(
        lambda: (
            (job := client.get_job(low)).attempts[0].end_reason.startswith("preempted") and job.state == job_pb2.JOB_STATE_PENDING
        ),
        timeout=30,
        what="the preemption to be stored",
    )
    assert cluster.coordinator is not None
    cluster.coordinator.kill()  # the rank is writing its 8 s checkpoint now
    cluster.start_coordinator(*arguments)
    wait_state(client, high, SUCCEEDED, timeout=60)
    done_low = wait_state(client, low, SUCCEEDED, timeout=90)
    assert [a.restart_reason for a in done_low.attempts] == ["", "preempted"] and done_low.restarts == 0
    before = attempt_log(client, low, 1)
    checkpoint_lines = [line for line in before.splitlines() if line.startswith("CHECKPOINT")]
    assert checkpoint_lines, (
        f"the rank finished its checkpoint in the grace left, not killed on re-registration:\n{before[-600:]}"
    )
    checkpointed = int(checkpoint_lines[0].split("=")[1])
    assert f"reason=preempted resumed_from={checkpointed}" in attempt_log(client, low, 2), "its checkpoint was written whole"
    assert checkpointed > 0
