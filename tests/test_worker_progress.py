"""The rank side of step telemetry: gpuorch.worker's report_progress() and compute(), the agent's reading of
the progress files into heartbeat reports, the memory budget, and the spec fields' checks and flags."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from fractions import Fraction

import pytest

from agent.ranks.progress import MAX_PROGRESS_BYTES, ProgressReader, parse_progress
from agent.telemetry.simulated import SimulatedSource
from coordinator.rules import job_rules
from gpuorch import worker
from gpuorch.cli.job_flags import telemetry_fields
from gpuorch.cli.parser import build_parser
from gpuorch.cli.views import format_job
from gpuorch.client import build_job_spec
from gpuorch.v1 import job_pb2


@pytest.fixture
def progress_file(monkeypatch, tmp_path):
    path = tmp_path / "rank-0.progress"
    path.touch()
    os.utime(path, ns=(0, 0))
    monkeypatch.setenv("GPUORCH_PROGRESS_FILE", str(path))
    monkeypatch.setattr(worker, "_progress", worker._Progress())
    return path


def test_report_progress_writes_step_samples_step_time_and_scalars_at_most_once_an_interval(progress_file):
    worker.report_progress(samples=8, loss=2.5)
    first = json.loads(progress_file.read_text())
    assert first == {"step": 1, "samples": 8, "step_seconds": 0.0, "scalars": {"loss": 2.5}}, "a first report at once"
    for _ in range(4):
        time.sleep(0.01)
        worker.report_progress(samples=8, loss=2.0, min_interval_seconds=60)
    assert json.loads(progress_file.read_text()) == first, "throttled: nothing written within the interval"
    worker.report_progress(samples=8, loss=1.5, min_interval_seconds=0)
    latest = json.loads(progress_file.read_text())
    assert latest["step"] == 6 and latest["samples"] == 48 and latest["scalars"] == {"loss": 1.5}
    assert 0.005 < latest["step_seconds"] < 0.05, "wall time over the 5 steps since the last write"
    worker.report_progress(100, min_interval_seconds=0)
    assert json.loads(progress_file.read_text())["step"] == 100, "an explicit step wins"
    assert progress_file.stat().st_mtime_ns > 0, "the mtime stays the progress stamp"


def test_compute_times_only_the_work_inside_it(progress_file):
    worker.report_progress(min_interval_seconds=0)
    for _ in range(3):
        with worker.compute():
            time.sleep(0.01)
        time.sleep(0.05)  # a collective waiting for a slower peer: not this rank's step time
        worker.report_progress(min_interval_seconds=0.12)
    step_seconds = json.loads(progress_file.read_text())["step_seconds"]
    assert 0.009 < step_seconds < 0.03, step_seconds


def test_bad_scalars_and_steps_are_refused_by_name(progress_file):
    with pytest.raises(TypeError, match="scalar 'loss' must be a number"):
        worker.report_progress(loss="low")
    with pytest.raises(ValueError, match="scalar 'lr' must be finite"):
        worker.report_progress(lr=float("nan"))
    with pytest.raises(ValueError, match="at most 16 scalars"):
        worker.report_progress(**{f"s{i}": 1.0 for i in range(17)})
    with pytest.raises(TypeError, match="step must be an int"):
        worker.report_progress(0.5)
    assert progress_file.read_text() == "", "nothing written by a refused call"


def test_outside_gpuorch_report_progress_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUORCH_PROGRESS_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    worker.report_progress(3, samples=1, loss=1.0)
    assert list(tmp_path.iterdir()) == []


def test_the_agent_reads_a_report_once_per_change_keeps_the_last_good_one_and_scalars_of_rank_0_only(tmp_path):
    zero, one, silent = tmp_path / "r0.progress", tmp_path / "r1.progress", tmp_path / "r2.progress"
    for path in (zero, one, silent):
        path.touch()
        os.utime(path, ns=(0, 0))
    zero.write_text(json.dumps({"step": 7, "samples": 56, "step_seconds": 0.25, "scalars": {"loss": 0.5}}))
    one.write_text(json.dumps({"step": 7, "samples": 56, "step_seconds": 0.3, "scalars": {"loss": 0.9}}))
    reader = ProgressReader()
    ranks = [(("j-1", 1, 0), zero), (("j-1", 1, 1), one), (("j-1", 1, 2), silent), (("j-1", 1, 3), tmp_path / "gone")]
    first, second = reader.reports(ranks)
    assert (first.rank, first.step, first.samples, first.step_seconds, dict(first.scalars)) == (0, 7, 56, 0.25, {"loss": 0.5})
    assert (second.rank, second.step, dict(second.scalars)) == (1, 7, {}), "scalars travel for rank 0 only"
    assert first.last_progress_time.ToNanoseconds() == zero.stat().st_mtime_ns
    zero.write_text('{"step": 8, "sam')  # caught half-written
    os.utime(zero, ns=(zero.stat().st_mtime_ns + 10**9,) * 2)
    (first, _) = reader.reports(ranks)
    assert first.step == 7 and first.last_progress_time.ToNanoseconds() == zero.stat().st_mtime_ns, (
        "the stamp moves on, the values are the last good ones"
    )
    zero.write_text("x" * (MAX_PROGRESS_BYTES + 1))
    os.utime(zero, ns=(zero.stat().st_mtime_ns + 10**9,) * 2)
    assert reader.reports(ranks)[0].step == 7, "an oversized file is not read"


@pytest.mark.parametrize(
    "text",
    ['{"step": -1}', '{"step": 1.5}', '{"step": true}', '{"step_seconds": "1"}', '{"scalars": {"a": "b"}}', "[1]", "nope",
     '{"step_seconds": 1e999}'],
)  # fmt: skip
def test_a_report_that_is_not_one_is_refused(text):
    assert parse_progress(text) is None


def test_gpu_memory_fraction_reaches_the_ranks_and_is_applied_once_per_device(monkeypatch):
    job = job_pb2.Job(job_id="j-1", attempt=1, spec=job_pb2.JobSpec(argv=["x"], gpus=1, gpu_memory_fraction=0.5))
    placement = job_pb2.Placement(master_addr="a", master_port=1, world_size=1)
    node = placement.nodes.add(node_id="n1", device_uuids=["GPU-0"], device_indexes=[0])
    assert job_rules.node_environment(job, placement, node)["GPUORCH_GPU_MEMORY_FRACTION"] == "0.5"
    monkeypatch.setenv("GPUORCH_GPU_MEMORY_FRACTION", "0.5")
    applied = []

    class Cuda:
        @staticmethod
        def set_per_process_memory_fraction(fraction, index):
            applied.append((fraction, index))

    class Torch:
        cuda = Cuda

    monkeypatch.setattr(worker, "_budgeted_devices", set())
    worker._apply_memory_budget(Torch, 0)
    worker._apply_memory_budget(Torch, 0)
    assert applied == [(0.5, 0)] and worker.gpu_memory_fraction() == 0.5
    monkeypatch.setenv("GPUORCH_GPU_MEMORY_FRACTION", "1.5")
    with pytest.raises(ValueError, match="GPUORCH_GPU_MEMORY_FRACTION must be in"):
        worker.gpu_memory_fraction()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"gpu_memory_fraction": 1.5}, "spec.gpu_memory_fraction is 1.5"),
        ({"gpu_memory_fraction": -0.1}, "spec.gpu_memory_fraction"),
        ({"idle_timeout_minutes": -1}, "spec.idle_timeout_minutes is -1"),
        ({"on_straggler": 7}, "spec.on_straggler 7 is unknown"),
    ],
)
def test_bad_telemetry_fields_are_refused_at_submit_by_name(fields, words):
    with pytest.raises(job_rules.InvalidSpec, match=words.replace(".", r"\.")):
        job_rules.validate_spec(job_pb2.JobSpec(argv=["x"], gpus=1, **fields))


def test_gpuctl_flags_fill_the_spec():
    args = build_parser().parse_args(
        [
            "submit",
            "--on-straggler",
            "restart",
            "--idle-timeout",
            "45",
            "--idle-exempt",
            "--gpu-memory-fraction",
            "0.8",
            "--",
            "x",
        ]
    )
    assert telemetry_fields(args) == {
        "on_straggler": job_pb2.STRAGGLER_ACTION_RESTART, "idle_timeout_minutes": 45.0, "idle_exempt": True,
        "gpu_memory_fraction": 0.8,
    }  # fmt: skip
    plain = telemetry_fields(build_parser().parse_args(["run", "--", "bash"]))
    assert plain["on_straggler"] == job_pb2.STRAGGLER_ACTION_UNSPECIFIED and not plain["idle_exempt"]


def test_the_latest_scalars_are_kept_until_newer_ones_and_counts_are_checked(progress_file):
    worker.report_progress(samples=2, loss=2.0)
    worker.report_progress(samples=2, min_interval_seconds=60)  # throttled
    worker.report_progress(samples=2, min_interval_seconds=0)
    assert json.loads(progress_file.read_text()) == {
        "step": 3, "samples": 6, "step_seconds": pytest.approx(0, abs=0.05), "scalars": {"loss": 2.0},
    }, "a call without scalars keeps the last ones"  # fmt: skip

    class Int64:  # like numpy's integers: not an int, but an index
        def __index__(self) -> int:
            return 9

    worker.report_progress(Int64(), samples=Int64(), accuracy=Fraction(1, 4), min_interval_seconds=0)
    latest = json.loads(progress_file.read_text())
    assert (latest["step"], latest["samples"], latest["scalars"]) == (9, 15, {"accuracy": 0.25})
    with pytest.raises(TypeError, match="samples must be an int"):
        worker.report_progress(samples=2.5)
    with pytest.raises(ValueError, match="samples must be >= 0"):
        worker.report_progress(samples=-1)
    with pytest.raises(TypeError, match="scalar 'done' must be a number"):
        worker.report_progress(done=True)
    with pytest.raises(ValueError, match="longer than 64"):
        worker.report_progress(**{"x" * 65: 1.0})


def fake_torch(monkeypatch, cuda_available: bool = True) -> list:
    """A torch with a CUDA that records what it is asked (there is no GPU here), installed as `torch`."""
    calls: list = []
    torch, cuda, distributed = types.ModuleType("torch"), types.ModuleType("torch.cuda"), types.ModuleType("torch.distributed")
    cuda.is_available = lambda: cuda_available
    cuda.set_device = lambda index: calls.append(("set_device", index))
    cuda.set_per_process_memory_fraction = lambda fraction, index: calls.append(("fraction", fraction, index))
    torch.cuda, torch.distributed = cuda, distributed
    torch.device = lambda kind, index=None: f"{kind}:{index}" if index is not None else kind
    distributed.init_process_group = lambda **options: calls.append(("init", options["backend"]))
    distributed.get_rank, distributed.get_world_size = lambda: 0, lambda: 1
    for name, module in (("torch", torch), ("torch.cuda", cuda), ("torch.distributed", distributed)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(worker, "_budgeted_devices", set())
    return calls


def test_binding_the_device_applies_the_memory_budget_once_per_process(monkeypatch):
    calls = fake_torch(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("GPUORCH_GPU_MEMORY_FRACTION", "0.25")
    assert worker.init_process_group("nccl") == (0, 1)
    assert worker.device() == "cuda:1"
    assert calls == [("set_device", 1), ("fraction", 0.25, 1), ("init", "nccl")], "applied once, when bound"
    monkeypatch.delenv("GPUORCH_GPU_MEMORY_FRACTION")
    calls.clear()
    monkeypatch.setattr(worker, "_budgeted_devices", set())
    worker.device()
    assert calls == [] and worker.gpu_memory_fraction() is None, "no budget: the allocator is left alone"
    fake_torch(monkeypatch, cuda_available=False)
    monkeypatch.setenv("GPUORCH_GPU_MEMORY_FRACTION", "0.25")
    assert worker.device() == "cpu"


def test_the_sdk_takes_the_same_settings_as_the_flags():
    spec = build_job_spec(["x"], on_straggler="restart", idle_timeout_minutes=45, idle_exempt=True, gpu_memory_fraction=0.8)
    assert (spec.on_straggler, spec.idle_timeout_minutes, spec.idle_exempt, spec.gpu_memory_fraction) == (
        job_pb2.STRAGGLER_ACTION_RESTART, 45.0, True, 0.8,
    )  # fmt: skip
    assert build_job_spec(["x"]).on_straggler == job_pb2.STRAGGLER_ACTION_UNSPECIFIED
    assert build_job_spec(["x"], on_straggler="STRAGGLER_ACTION_RESTART").on_straggler == job_pb2.STRAGGLER_ACTION_RESTART
    with pytest.raises(ValueError, match="unknown on_straggler 'retry'"):
        build_job_spec(["x"], on_straggler="retry")


def test_gpuctl_job_shows_the_settings_only_when_set():
    plain = format_job(job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["x"], gpus=1)))
    assert "memory fraction" not in plain and "Telemetry:" not in plain
    spec = job_pb2.JobSpec(argv=["x"], gpus=1, gpu_memory_fraction=0.5, on_straggler=job_pb2.STRAGGLER_ACTION_RESTART,
                           idle_timeout_minutes=30, idle_exempt=True)  # fmt: skip
    shown = format_job(job_pb2.Job(job_id="j-1", spec=spec))
    assert "GPU memory fraction 0.5" in shown
    assert "Telemetry:  restart on a straggler, never judged idle, cancelled after 30 min idle" in shown


def test_simulated_utilisation_is_pinned_from_the_faults_file_and_the_api(tmp_path):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"0": {"utilization": 0.0}, "1": {"utilization": 150}}))
    source = SimulatedSource(3, node_id="n1", seed=1, faults_file=faults)
    for _ in range(5):
        idle, busy, _ = source.sample()
        assert (idle.gpu_utilization_percent, busy.gpu_utilization_percent) == (0.0, 100.0), "pinned (and clamped to 100)"
    assert {round(source.sample()[2].gpu_utilization_percent, 3) for _ in range(5)} != {0.0}, "an unpinned GPU wanders"
    source.set_utilization(2, 90.0)
    assert source.sample()[2].gpu_utilization_percent == 90.0
    faults.write_text("{}")
    os.utime(faults, ns=(faults.stat().st_mtime_ns + 10**9,) * 2)
    assert any(source.sample()[0].gpu_utilization_percent for _ in range(20)), "unpinned once the file forgets it"


def test_gpuctl_job_prints_its_ranks_step_times_as_a_table_of_lines():
    # Found by running it by hand: the table's newlines were escaped again with the view's lines ("\n" on screen).
    job = job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["x"], gpus=2))
    job.telemetry.step = 21
    job.telemetry.steps_per_second = 2.0
    for rank in range(2):
        job.telemetry.ranks.add(rank=rank, node_id="m1", device_uuid=f"GPU-{rank}", step=21, step_seconds=0.5)
    lines = format_job(job).splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("RANK"))
    assert "\\n" not in lines[header], lines[header]
    assert lines[header + 1].split() == ["0", "m1", "GPU-0", "21", "0.5", "-"]
    assert lines[header + 2].split() == ["1", "m1", "GPU-1", "21", "0.5", "-"]
