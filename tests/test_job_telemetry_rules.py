"""The pure decisions over a running job's telemetry (coordinator/rules/job_telemetry.py): step rates,
stragglers on synthetic step times, idleness, and what the coordinator does about them; and the scheduler
keeping a job off the GPUs it was restarted away from."""

from __future__ import annotations

import random

import pytest

from coordinator import scheduler
from coordinator.model.cluster import Allocations
from coordinator.model.job_telemetry import AttemptTelemetry
from coordinator.model.jobs import AttemptState, JobEntry
from coordinator.rules import effects as fx
from coordinator.rules import job_machine, job_rules, job_telemetry
from coordinator.rules.job_telemetry import TelemetryConfig, judge_idle, judge_stragglers, rank_progress
from coordinator.rules.recovery import RecoveryPolicy
from gpuorch.v1 import agent_pb2, job_pb2

MACHINE = job_machine.MachineConfig(RecoveryPolicy(), stop_grace_seconds=3.0)


def reports(state: AttemptTelemetry, step_seconds: list[float], step: int, wall: float) -> None:
    for rank, seconds in enumerate(step_seconds):
        assert rank_progress(state, rank, step, step * 32, seconds, wall, {"loss": 1.0 / step} if rank == 0 else {})


def test_rates_come_from_consecutive_reports_and_a_repeated_report_counts_once():
    state = AttemptTelemetry("j-1", 1)
    assert rank_progress(state, 0, 10, 320, 0.1, 100.0, {"loss": 2.0})
    assert not rank_progress(state, 0, 10, 320, 0.1, 100.0, {"loss": 2.0}), "a heartbeat repeats the report: no new window"
    assert rank_progress(state, 0, 30, 960, 0.1, 102.0, {"loss": 1.5})
    assert rank_progress(state, 1, 5, 160, 0.1, 100.0, {"ignored": 1.0})
    assert rank_progress(state, 1, 25, 800, 0.1, 102.0, {})
    assert state.steps_per_second == pytest.approx(10.0) and state.step == 30
    assert state.samples_per_second == pytest.approx(320 + 320), "every rank's samples"
    assert state.scalars == {"loss": 1.5}, "rank 0's scalars only"
    assert state.histogram.count == 10 + 20 + 5 + 20 and state.histogram.total_seconds == pytest.approx(5.5)


def test_normal_jitter_is_never_a_straggler_over_many_windows():
    rng = random.Random(7)
    state = AttemptTelemetry("j-1", 1)
    for window in range(1, 2001):
        reports(state, [0.5 * rng.uniform(0.88, 1.12) for _ in range(16)], window, float(window))
        assert judge_stragglers(state, 1.3, 5) == [], f"window {window}"
    assert max(steps.slow_windows for steps in state.ranks.values()) == 0


def test_a_rank_half_again_as_slow_is_flagged_in_exactly_straggler_windows_windows_once():
    rng = random.Random(3)
    state = AttemptTelemetry("j-1", 1)
    flagged_at = []
    for window in range(1, 12):
        times = [0.5 * rng.uniform(0.95, 1.05) for _ in range(4)]
        times[2] = 0.75
        reports(state, times, window, float(window))
        if judge_stragglers(state, 1.3, 5):
            flagged_at.append(window)
    assert flagged_at == [5], "flagged at the fifth slow window, and only once"
    assert state.flagged == {2} and state.ranks[2].slow_windows == 11


def test_a_fast_window_resets_the_run_and_a_stale_report_is_not_judged():
    state = AttemptTelemetry("j-1", 1)
    for window in range(1, 5):
        reports(state, [0.5, 0.5, 0.8], window, float(window))
        judge_stragglers(state, 1.3, 5)
    assert state.ranks[2].slow_windows == 4
    reports(state, [0.5, 0.5, 0.5], 5, 5.0)
    judge_stragglers(state, 1.3, 5)
    assert state.ranks[2].slow_windows == 0
    reports(state, [0.5, 0.5, 0.8], 6, 6.0)
    judge_stragglers(state, 1.3, 5)
    assert judge_stragglers(state, 1.3, 5) == [] and state.ranks[2].slow_windows == 1, "no fresh report, no window"


def test_idle_is_flagged_after_the_idle_time_cleared_by_a_busy_sample_and_stopped_at_the_timeout():
    state = AttemptTelemetry("j-1", 1)
    assert judge_idle(state, [1.0, 2.0], 0.0, 5.0, 60.0, 120.0) == job_telemetry.IdleVerdict(False, False, 0.0)
    assert not judge_idle(state, [1.0, 2.0], 59.0, 5.0, 60.0, 120.0).changed
    verdict = judge_idle(state, [1.0, 4.9], 60.0, 5.0, 60.0, 120.0)
    assert verdict.changed and not verdict.stop and state.idle
    assert judge_idle(state, [], 200.0, 5.0, 60.0, 120.0) == job_telemetry.IdleVerdict(False, False, 0.0), "no samples: no news"
    busy = judge_idle(state, [1.0, 50.0], 100.0, 5.0, 60.0, 120.0)
    assert busy.changed and not state.idle and state.low_utilization_since is None, "one busy GPU: not idle"
    judge_idle(state, [0.0, 0.0], 110.0, 5.0, 60.0, 120.0)
    assert judge_idle(state, [0.0, 0.0], 230.0, 5.0, 60.0, 120.0).stop
    assert not judge_idle(AttemptTelemetry("j-2", 1), [0.0], 0.0, 5.0, 60.0, 0.0).stop, "no timeout: never stopped"


def running_job(spec: job_pb2.JobSpec) -> tuple[JobEntry, Allocations]:
    spec = job_rules.normalized(spec)
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29500, world_size=4)
    placement.nodes.add(node_id="n1", node_rank=0, device_uuids=["GPU-0", "GPU-1"], first_rank=0, device_indexes=[0, 1])
    placement.nodes.add(node_id="n2", node_rank=1, device_uuids=["GPU-2", "GPU-3"], first_rank=2, device_indexes=[0, 1])
    allocations = Allocations()
    now = job_machine.Now(1000.0, 10.0)
    job_machine.place(entry, placement, now, allocations, {}, MACHINE)
    for rank in range(4):
        status = agent_pb2.TaskStatus(job_id="j-1", attempt=1, rank=rank, state=agent_pb2.TASK_STATE_RUNNING)
        job_machine.rank_reported(entry, "n1" if rank < 2 else "n2", status, now, allocations, MACHINE)
    assert entry.current is not None and entry.current.state is AttemptState.RUNNING
    return entry, allocations


def straggling(entry: JobEntry, config: TelemetryConfig) -> list:
    state = AttemptTelemetry("j-1", 1)
    attempt = entry.current
    assert attempt is not None
    effects: list = []
    for window in range(1, config.straggler_windows + 1):
        reports(state, [0.5, 0.5, 0.8, 0.5], window, 1000.0 + window)
        now = job_machine.Now(1000.0 + window, 10.0)
        effects += job_telemetry.window(entry, attempt, state, [90.0] * 4, now, config, MACHINE)
    return effects


def test_a_straggler_is_flagged_on_the_job_with_its_node_and_gpu_and_a_watch_update():
    entry, _ = running_job(job_pb2.JobSpec(argv=["train"], gpus=4, max_restarts=2))
    effects = straggling(entry, TelemetryConfig(straggler_windows=3))
    (straggler,) = entry.job.telemetry.stragglers
    assert (straggler.rank, straggler.node_id, straggler.device_uuid, straggler.attempt) == (2, "n2", "GPU-2", 1)
    assert straggler.step_seconds == 0.8 and straggler.median_step_seconds == 0.5
    assert fx.Notify("j-1") in effects and entry.job.state == job_pb2.JOB_STATE_RUNNING, "flagged only: no restart asked for"
    shown = {rank.rank: rank for rank in entry.job.telemetry.ranks}
    assert shown[2].slow_windows == 3 and shown[2].node_id == "n2" and entry.job.telemetry.scalars["loss"] == pytest.approx(1 / 3)
    assert not entry.job.excluded_device_uuids


def test_on_straggler_restart_restarts_without_that_gpu_within_the_restart_budget():
    entry, _ = running_job(job_pb2.JobSpec(argv=["train"], gpus=4, max_restarts=1, on_straggler=job_pb2.STRAGGLER_ACTION_RESTART))
    effects = straggling(entry, TelemetryConfig(straggler_windows=2))
    job = entry.job
    assert job.state == job_pb2.JOB_STATE_PENDING and job.pending_restart_reason == "straggler:GPU-2"
    assert list(job.excluded_device_uuids) == ["GPU-2"] and job.restarts == 1
    assert fx.Stop("n1", "j-1", 1, 3.0, job.attempts[0].end_reason) in effects
    assert "rank 2 on node n2 (GPU GPU-2) is a straggler" in job.attempts[0].end_reason

    spent, _ = running_job(job_pb2.JobSpec(argv=["train"], gpus=4, max_restarts=0, on_straggler=job_pb2.STRAGGLER_ACTION_RESTART))
    straggling(spent, TelemetryConfig(straggler_windows=2))
    assert spent.job.state == job_pb2.JOB_STATE_RUNNING and len(spent.job.telemetry.stragglers) == 1, (
        "no restart left: flagged, never failed for it"
    )


def test_an_idle_job_is_flagged_then_cancelled_at_its_timeout_unless_exempt():
    config = TelemetryConfig(idle_minutes=1.0, idle_timeout_minutes={"default": 3.0})
    entry, _ = running_job(job_pb2.JobSpec(argv=["sleep"], gpus=4))
    attempt, state = entry.current, AttemptTelemetry("j-1", 1)
    assert attempt is not None

    def window(wall: float) -> list:
        return job_telemetry.window(entry, attempt, state, [0.0] * 4, job_machine.Now(wall, 0.0), config, MACHINE)

    assert window(1000.0) == []
    assert fx.Notify("j-1") in window(1060.0)
    assert entry.job.telemetry.idle and entry.job.telemetry.low_utilization_since.seconds == 1000
    effects = window(1180.0)
    assert entry.job.state == job_pb2.JOB_STATE_CANCELLED and entry.job.reason.startswith("idle: its GPUs stayed under 5%")
    assert any(isinstance(effect, fx.Stop) for effect in effects)

    own, _ = running_job(job_pb2.JobSpec(argv=["sleep"], gpus=4, idle_timeout_minutes=10))
    assert job_telemetry.idle_timeout_seconds(own.job.spec, config) == 600.0, "the job's own timeout wins over its pool's"
    exempt, _ = running_job(job_pb2.JobSpec(argv=["notebook"], gpus=4, idle_exempt=True))
    exempt_state = AttemptTelemetry("j-1", 1)
    for wall in (1000.0, 2000.0, 9000.0):
        job_telemetry.window(exempt, exempt.current, exempt_state, [0.0] * 4, job_machine.Now(wall, 0.0), config, MACHINE)
    assert exempt.job.state == job_pb2.JOB_STATE_RUNNING and not exempt.job.telemetry.idle


def test_settings_out_of_range_are_refused_by_name():
    with pytest.raises(ValueError, match="straggler_ratio must be > 1"):
        job_telemetry.telemetry_config(1.0, 5, 10.0, 5.0, 30.0, {})
    with pytest.raises(ValueError, match=r"idle_timeout_minutes\.gpu must be minutes"):
        job_telemetry.telemetry_config(1.3, 5, 10.0, 5.0, 30.0, {"gpu": "soon"})
    with pytest.raises(ValueError, match="straggler_window_seconds"):
        job_telemetry.telemetry_config(1.3, 5, 0.0, 5.0, 30.0, {})


def gpu(node: str, index: int, free: bool = True) -> scheduler.GpuView:
    return scheduler.GpuView(f"{node}-g{index}", index, "H100", 80 << 30, 0, 0.0, 30.0, healthy=True, free=free)


def test_the_scheduler_never_places_a_job_on_a_gpu_it_excludes():
    nodes = [scheduler.NodeView("a", True, tuple(gpu("a", i) for i in range(4)))]
    config = scheduler.SchedulerConfig()
    plain = scheduler.schedule(nodes, [scheduler.JobRequest("j", 4)], config, now=0.0)
    assert [d.job_id for d in plain.placed] == ["j"]
    excluded = scheduler.JobRequest("j", 4, excluded_gpus=frozenset({"a-g1"}))
    result = scheduler.schedule(nodes, [excluded], config, now=0.0)
    assert not result.placed and "other than the 1 GPU it straggled on" in result.pending_reasons["j"], (
        "four GPUs less one excluded: it cannot fit, and says why"
    )
    three = scheduler.JobRequest("k", 3, excluded_gpus=frozenset({"a-g0"}))
    (decision,) = scheduler.schedule(nodes, [three], config, now=0.0).placed
    assert decision.nodes[0].gpu_uuids == ("a-g1", "a-g2", "a-g3")
    two_nodes = [*nodes, scheduler.NodeView("b", True, tuple(gpu("b", i) for i in range(4)))]
    (moved,) = scheduler.schedule(two_nodes, [excluded, scheduler.JobRequest("x", 4)], config, now=0.0).placed[:1]
    assert moved.job_id == "j" and moved.nodes[0].node_id == "b", "it goes where its GPU is not"
