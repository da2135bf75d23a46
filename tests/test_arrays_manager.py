"""Job arrays and dependencies in the JobManager in-process: a real cluster view and memory store, what agents
would receive read from their sessions' outboxes, what they would answer fed back."""

from __future__ import annotations

import json

import pytest

from coordinator.control.cluster_view import ClusterView
from coordinator.control.dependencies import DependencyNeverMet
from coordinator.control.job_manager import JobManager, QuotaExceeded
from coordinator.rules.job_rules import InvalidSpec
from coordinator.rules.liveness import LivenessPolicy
from coordinator.store.memory import MemoryJobStore
from gpuorch.arrays import parse_array, parse_dependency
from gpuorch.v1 import agent_pb2, job_pb2


def register(cluster: ClusterView, node_id: str, gpus: int = 1, model: str = "NVIDIA H100 80GB HBM3"):
    message = agent_pb2.Register(node_id=node_id, addresses=["127.0.0.1"])
    for index in range(gpus):
        message.devices.add(uuid=f"GPU-{node_id}-{index}", index=index, name=model, memory_total_bytes=80 * 2**30)
    _, session, _ = cluster.register(message)
    return session


def launches(session) -> list[agent_pb2.LaunchTask]:
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message.WhichOneof("payload") == "launch_task":
            found.append(message.launch_task)
    return found


async def started_manager(store=None, gpus: int = 4, **options) -> tuple[JobManager, object]:
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    session = register(cluster, "n1", gpus)
    manager = JobManager(cluster, store or MemoryJobStore(), **options)
    await manager.start()
    return manager, session


def end(manager: JobManager, job_id: str, exit_code: int = 0, result: dict | None = None) -> None:
    """Every rank of the job's current attempt reports its end."""
    job = manager.get(job_id).job
    for rank in range(job.placement.world_size):
        status = agent_pb2.TaskStatus(
            job_id=job_id,
            attempt=job.attempt,
            rank=rank,
            state=agent_pb2.TASK_STATE_EXITED,
            exit_code=exit_code,
            result_json=json.dumps(result) if result is not None and rank == 0 else "",
        )
        manager.on_task_status("n1", status)


def spec(*argv: str, array: str = "", after: tuple[str, ...] = ()) -> job_pb2.JobSpec:
    value = job_pb2.JobSpec(argv=list(argv) or ["train"], gpus=1, after=[parse_dependency(text) for text in after])
    if array:
        value.array.CopyFrom(parse_array(array))
    return value


async def test_a_ten_thousand_task_array_is_one_store_write():
    store = MemoryJobStore()
    manager, _ = await started_manager(store, max_pending_jobs_per_user=0)
    before = store.commits
    array_id = await manager.arrays.submit(spec("train", "--seed", "{index}", array="0-9999"))
    assert store.commits == before + 1
    assert len(store.jobs) == 10_000
    task = manager.get(f"{array_id}[9999]").job
    assert list(task.spec.argv) == ["train", "--seed", "9999"]
    assert task.spec.env["GPUORCH_ARRAY_INDEX"] == "9999" and task.spec.env["GPUORCH_ARRAY_SIZE"] == "10000"
    assert task.array_task.array_id == array_id
    jobs, _ = await manager.list()
    assert [job.job_id for job in jobs] == [array_id], "ListJobs folds the array into one line"
    assert jobs[0].array.pending == 10_000


async def test_an_array_counts_each_task_against_the_pending_quota():
    manager, _ = await started_manager(max_pending_jobs_per_user=10)
    with pytest.raises(QuotaExceeded, match="an array of 11 tasks counts as 11 pending jobs"):
        await manager.arrays.submit(spec(array="0-10"))
    assert await manager.arrays.submit(spec(array="0-9"))


async def test_the_cap_holds_tasks_over_it_with_the_reason():
    manager, session = await started_manager(gpus=4)
    array_id = await manager.arrays.submit(spec(array="0-5%2"))
    placed = await manager.schedule_pass()
    assert placed == [f"{array_id}[0]", f"{array_id}[1]"]
    waiting = manager.get(f"{array_id}[2]").job
    assert "runs its most tasks at once (2, %2); waiting for one to end" in waiting.reason
    assert await manager.schedule_pass() == []
    for launch in launches(session):
        assert launch.env["GPUORCH_ARRAY_ID"] == array_id
        assert launch.env["GPUORCH_DEVICE_CAPACITIES"] == "1"
        assert launch.ranks[0].env["GPUORCH_DEVICE_CAPACITY"] == "1"
    end(manager, f"{array_id}[0]")
    assert await manager.schedule_pass() == [f"{array_id}[2]"]
    assert manager.arrays.view(array_id).array.running == 2


async def test_a_dependent_waits_then_runs_with_the_results():
    manager, session = await started_manager(gpus=2)
    array_id = await manager.arrays.submit(spec(array="0-1"))
    merge_id = await manager.arrays.submit(spec("merge", after=(f"{array_id}:ok",)))
    assert sorted(await manager.schedule_pass()) == [f"{array_id}[0]", f"{array_id}[1]"]
    assert manager.get(merge_id).job.reason == f"waiting for {array_id}: 0 of 2 tasks ended (2 pending)"
    assert await manager.schedule_pass() == []  # the next pass judges it again: its targets changed
    assert manager.get(merge_id).job.reason == f"waiting for {array_id}: 0 of 2 tasks ended (2 running)"
    end(manager, f"{array_id}[0]", result={"loss": 0.5})
    assert await manager.schedule_pass() == []
    assert "1 of 2 tasks ended" in manager.get(merge_id).job.reason
    launches(session)
    end(manager, f"{array_id}[1]", result={"loss": 0.25})
    assert await manager.schedule_pass() == [merge_id]
    assert list(manager.get(merge_id).job.dependencies_met) == [array_id]
    (launch,) = launches(session)
    document = json.loads(launch.dependency_results_json)
    assert [(row["index"], row["result"]) for row in document["results"]] == [(0, {"loss": 0.5}), (1, {"loss": 0.25})]
    assert document["truncated"] is False


async def test_an_ok_dependent_of_a_failed_job_is_cancelled_with_the_reason():
    manager, _ = await started_manager(gpus=1)
    first = await manager.arrays.submit(spec())
    after_ok = await manager.arrays.submit(spec(after=(f"{first}:ok",)))
    after_fail = await manager.arrays.submit(spec(after=(f"{first}:fail",)))
    assert await manager.schedule_pass() == [first]
    end(manager, first, exit_code=3)
    assert await manager.schedule_pass() == [after_fail]
    cancelled = manager.get(after_ok).job
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert cancelled.reason == f"cancelled: dependency {first}:ok can never be met: it FAILED"
    with pytest.raises(DependencyNeverMet, match="can never be met: it FAILED"):
        await manager.arrays.submit(spec(after=(f"{first}:ok",)))


async def test_dependencies_on_unknown_jobs_and_bad_arrays_are_refused():
    manager, _ = await started_manager()
    with pytest.raises(InvalidSpec, match=r"spec.after\[0\]: job 'j-999999-nosuch' does not exist"):
        await manager.arrays.submit(spec(after=("j-999999-nosuch",)))
    bad = spec(array="0-3")
    bad.array.last = 10**8
    with pytest.raises(InvalidSpec, match=r"spec\.array: index 100000000 is above the largest"):
        await manager.arrays.submit(bad)


async def test_dependencies_and_arrays_survive_a_restart():
    store = MemoryJobStore()
    manager, _ = await started_manager(store, gpus=1)
    array_id = await manager.arrays.submit(spec(array="0-1%1"))
    merge_id = await manager.arrays.submit(spec(after=(array_id,)))
    assert await manager.schedule_pass() == [f"{array_id}[0]"]
    end(manager, f"{array_id}[0]", result={"acc": 1})
    for _ in range(3):
        await manager.schedule_pass()
    # A new coordinator on the same store: the array, its cap and the dependency are rebuilt from the jobs.
    restarted, _ = await started_manager(store, gpus=1)
    assert restarted.arrays.view(array_id).array.succeeded == 1
    assert restarted.get(f"{array_id}[0]").job.result_json == '{"acc": 1}'
    assert restarted.arrays.dependencies.waiting(merge_id)


async def test_an_array_is_cancelled_and_reprioritised_in_one_write_each():
    store = MemoryJobStore()
    manager, _ = await started_manager(store, gpus=1)
    array_id = await manager.arrays.submit(spec(array="0-99"))
    await manager.schedule_pass()
    before = store.commits
    view = await manager.arrays.set_priority(array_id, 7)
    assert view.spec.priority == 7 and store.commits == before + 1
    view = await manager.arrays.cancel(array_id)
    assert view.state == job_pb2.JOB_STATE_CANCELLED and view.array.cancelled == 100
    assert store.commits == before + 2


async def test_results_are_kept_from_rank_zero_of_the_current_attempt_only():
    manager, _ = await started_manager(gpus=2)
    job_id = await manager.arrays.submit(job_pb2.JobSpec(argv=["train"], gpus=2))
    await manager.schedule_pass()
    stale = agent_pb2.TaskStatus(job_id=job_id, attempt=9, rank=0, state=agent_pb2.TASK_STATE_RUNNING, result_json='{"x": 1}')
    manager.on_task_status("n1", stale)
    not_an_object = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=1, state=agent_pb2.TASK_STATE_RUNNING, result_json="[1]")
    manager.on_task_status("n1", not_an_object)
    assert manager.get(job_id).job.result_json == ""
    end(manager, job_id, result={"loss": 1.5})
    assert json.loads(manager.get(job_id).job.result_json) == {"loss": 1.5}


async def test_capacity_of_mixed_gpus_reaches_every_rank():
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    fast = register(cluster, "fast", 1, "NVIDIA H100 80GB HBM3")
    slow = register(cluster, "slow", 1, "NVIDIA A100-SXM4-80GB")
    manager = JobManager(cluster, MemoryJobStore())
    manager.arrays.dependencies.capacities = {"H100": 1.0, "A100": 0.5}
    await manager.start()
    await manager.arrays.submit(job_pb2.JobSpec(argv=["train"], gpus=2, spread=True))
    assert len(await manager.schedule_pass()) == 1
    sent = launches(fast) + launches(slow)
    assert {launch.env["GPUORCH_DEVICE_CAPACITIES"] for launch in sent} in ({"1,0.5"}, {"0.5,1"})
    own = {launch.ranks[0].env["GPUORCH_DEVICE_CAPACITY"] for launch in sent}
    assert own == {"1", "0.5"}


async def test_an_arrays_tasks_leave_memory_together_once_every_one_ended_and_history_lists_each_once():
    store = MemoryJobStore()
    manager, _ = await started_manager(store, gpus=4, recent_ended_jobs=1)
    array_id = await manager.arrays.submit(spec("train", array="0-2"))
    single = await manager.submit(spec("solo"))
    await manager.schedule_pass()
    end(manager, f"{array_id}[0]")
    end(manager, f"{array_id}[1]")
    end(manager, single)
    await manager.save()
    # Two tasks ended, one runs: the array's view needs them all, so only the single job may be evicted.
    assert {f"{array_id}[0]", f"{array_id}[1]", f"{array_id}[2]"} <= set(manager.jobs)
    assert manager.arrays.view(array_id).array.succeeded == 2
    end(manager, f"{array_id}[2]")
    await manager.save()
    assert list(manager.jobs) == [f"{array_id}[2]"], "the last task's end lets the array go, down to the bound of 1"
    assert manager.arrays.view(array_id).array.succeeded == 3, "a task still in memory keeps the whole view"
    later = await manager.submit(spec("later"))
    await manager.schedule_pass()
    end(manager, later)
    await manager.save()
    assert list(manager.jobs) == [later] and manager.arrays.view(array_id) is None, "its last task gone, the array is too"
    found, token = await manager.list(page_size=2)
    listed = [job.job_id for job in found]
    while token:
        page, token = await manager.list(page_size=2, page_token=token)
        listed += [job.job_id for job in page]
    assert sorted(listed) == sorted([single, later, f"{array_id}[0]", f"{array_id}[1]", f"{array_id}[2]"]), listed
