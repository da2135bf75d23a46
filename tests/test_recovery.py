"""Recovery decisions as pure functions."""

from __future__ import annotations

import pytest

from coordinator import scheduler
from coordinator.rules import recovery
from coordinator.rules.health import DeviceHealth, quarantined
from gpuorch import worker
from gpuorch.v1 import agent_pb2

POLICY = recovery.RecoveryPolicy(backoff_initial_seconds=0.0, backoff_base_seconds=1.0, backoff_max_seconds=8.0)


def test_restarts_within_budget_with_capped_exponential_backoff():
    delays = [recovery.decide(10, used, ["x"], POLICY).delay_seconds for used in range(7)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert recovery.decide(3, 2, ["x"], POLICY) == recovery.Restart(2.0, 3)


def test_gives_up_past_the_budget_with_the_whole_history():
    decision = recovery.decide(2, 2, ["rank 1 exited with code 3", "node n7 is down", "rank 0 exited with code 1"], POLICY)
    assert isinstance(decision, recovery.GiveUp)
    assert decision.reason.startswith("rank 0 exited with code 1 (no restarts left of 2;")
    assert "attempt 1: rank 1 exited with code 3; attempt 2: node n7 is down" in decision.reason
    assert recovery.decide(0, 0, ["rank 2 exited with code 9"], POLICY) == recovery.GiveUp("rank 2 exited with code 9")


@pytest.mark.parametrize(
    "status, code",
    [
        (agent_pb2.TaskStatus(rank=3, state=agent_pb2.TASK_STATE_EXITED, exit_code=1), "rank_exit:3:1"),
        (agent_pb2.TaskStatus(rank=3, state=agent_pb2.TASK_STATE_EXITED, signal=9), "rank_exit:3:137"),
        (
            agent_pb2.TaskStatus(rank=0, state=agent_pb2.TASK_STATE_FAILED_TO_START, message="cannot execute 'x': No such file"),
            "start_failed:0",
        ),
        (
            agent_pb2.TaskStatus(
                rank=0, state=agent_pb2.TASK_STATE_FAILED_TO_START, message="the rank's shim ended (killed) before starting it"
            ),
            "rank_start:0",
        ),
        (
            agent_pb2.TaskStatus(rank=2, state=agent_pb2.TASK_STATE_REJECTED, message="attempt 1 is older than attempt 2"),
            "rank_start:2",
        ),
    ],
)
def test_rank_failure_codes(status, code):
    assert recovery.rank_failure_code(status) == code


@pytest.mark.parametrize(
    "message, permanent",
    [
        ("cannot execute 'python': No such file or directory", True),
        ("cannot execute '/home/al/train.sh': Permission denied", True),
        ("cannot enter working directory '/srv/exp': No such file or directory", True),
        ("working_dir '/srv/exp' does not exist or is not a directory", True),
        ("cannot switch to uid 1001 gid 1001: Operation not permitted", True),
        ("the rank's shim ended (killed by SIGKILL) before starting it; see /var/lib/gpuorch/x.log", False),
        ("cannot start the rank: Resource temporarily unavailable", False),
        ("cannot create working directory '/var/lib/gpuorch/jobs/j-1': No space left on device", False),
    ],
)
def test_which_start_failures_a_restart_would_repeat(message, permanent):
    status = agent_pb2.TaskStatus(rank=0, state=agent_pb2.TASK_STATE_FAILED_TO_START, message=message)
    assert recovery.permanent_start_failure(status) is permanent
    assert not recovery.permanent_start_failure(
        agent_pb2.TaskStatus(state=agent_pb2.TASK_STATE_EXITED, exit_code=127, message=message)
    )


def test_a_permanent_start_failure_gives_up_with_restarts_left():
    reason = "rank 0 on node n1 failed to start: cannot execute 'trian.py': No such file or directory"
    decision = recovery.decide(5, 0, [reason], POLICY, "start_failed:0")
    assert isinstance(decision, recovery.GiveUp) and decision.reason.startswith(reason) and "not restarted" in decision.reason
    assert recovery.decide(5, 0, [reason], POLICY, "rank_start:0") == recovery.Restart(0.0, 1), "a passing cause is retried"
    assert recovery.decide(0, 0, [reason], POLICY, "start_failed:0") == recovery.GiveUp(reason)


def test_elastic_sizes_go_down_to_the_floor_in_whole_nodes():
    assert scheduler.elastic_sizes(4, 2, 0) == [4, 3, 2]
    assert scheduler.elastic_sizes(16, 8, 4) == [16, 12, 8]
    assert scheduler.elastic_sizes(4, 4, 0) == [4]


def test_hang_is_no_progress_for_the_timeout_counted_from_the_start():
    assert not recovery.hung(0, 0, 0, 1e9), "0 disables"
    assert not recovery.hung(10, attempt_started_at=100, last_progress_at=0, now=109)
    assert recovery.hung(10, attempt_started_at=100, last_progress_at=0, now=110)
    assert not recovery.hung(10, attempt_started_at=100, last_progress_at=105, now=114)
    assert recovery.hung(10, attempt_started_at=100, last_progress_at=105, now=115)


def test_quarantine_keeps_a_recovered_gpu_out_for_the_recovery_time():
    healthy = DeviceHealth(True, "")
    sick = DeviceHealth(False, "xid 79 (GPU has fallen off the bus)")
    assert quarantined(sick, 100.0, sick.reason, 100.0, 300) is sick
    held = quarantined(healthy, 100.0, sick.reason, 250.0, 300)
    assert not held.healthy and "recovering from xid 79" in held.reason and "150s of the 300s" in held.reason
    assert quarantined(healthy, 100.0, sick.reason, 400.0, 300).healthy
    assert quarantined(healthy, None, "", 5.0, 300).healthy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("", worker.RestartReason()),
        ("rank_exit:3:137", worker.RestartReason("rank_exit", rank=3, exit_code=137, raw="rank_exit:3:137")),
        ("node_down:n7", worker.RestartReason("node_down", node_id="n7", raw="node_down:n7")),
        ("gpu_unhealthy:GPU-1", worker.RestartReason("gpu_unhealthy", gpu_uuid="GPU-1", raw="gpu_unhealthy:GPU-1")),
        ("hang", worker.RestartReason("hang", raw="hang")),
        ("launch_timeout:n7", worker.RestartReason("launch_timeout", node_id="n7", raw="launch_timeout:n7")),
        ("straggler:GPU-2", worker.RestartReason("straggler", gpu_uuid="GPU-2", raw="straggler:GPU-2")),
    ],
)
def test_worker_parses_the_restart_reason(monkeypatch, raw, expected):
    monkeypatch.setenv("GPUORCH_RESTART_REASON", raw)
    assert worker.restart_reason() == expected
    assert worker.restart_reason().is_restart is bool(raw)


def test_report_progress_touches_the_file_at_most_once_per_interval(monkeypatch, tmp_path):
    path = tmp_path / "rank-0.progress"
    monkeypatch.setenv("GPUORCH_PROGRESS_FILE", str(path))
    monkeypatch.setattr(worker, "_progress", worker._Progress())
    worker.report_progress(min_interval_seconds=60)
    first = path.stat().st_mtime_ns
    worker.report_progress(min_interval_seconds=60)
    assert path.stat().st_mtime_ns == first
