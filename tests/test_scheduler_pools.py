"""Node pools in the scheduler: a job is placed only on nodes of its own pool, and its reasons and the
submit-time capacity check count only that pool."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import (
    POLICIES,
    GpuView,
    JobRequest,
    NodeView,
    SchedulerConfig,
    place,
    request_of_spec,
    schedule,
    too_big_for_cluster,
)
from gpuorch.v1 import job_pb2

GIB = 1 << 30
CONFIG = SchedulerConfig()


def node(node_id, total=8, *, pool="default", free=None, schedulable=True, model="H100", memory_gib=80):
    free = total if free is None else free
    gpus = tuple(GpuView(f"{node_id}-g{i}", i, model, memory_gib * GIB, 0, 0.0, 40.0, True, i < free) for i in range(total))
    return NodeView(node_id, schedulable, gpus, pool=pool)


def placed_nodes(result, job_id):
    decision = next((d for d in result.placed if d.job_id == job_id), None)
    return None if decision is None else [share.node_id for share in decision.nodes]


def test_a_job_runs_only_in_its_own_pool():
    nodes = [node("a1", 8, pool="a"), node("b1", 8, pool="b")]
    result = schedule(nodes, [JobRequest("j1", 4, pool="b"), JobRequest("j2", 4, pool="a")], CONFIG, now=0.0)
    assert placed_nodes(result, "j1") == ["b1"]
    assert placed_nodes(result, "j2") == ["a1"]


def test_a_job_waits_for_its_pool_even_when_another_pool_is_idle():
    nodes = [node("a1", 8, pool="a", free=0), node("b1", 8, pool="b")]
    result = schedule(nodes, [JobRequest("j1", 2, pool="a")], CONFIG, now=0.0)
    assert result.placed == ()
    assert result.pending_reasons["j1"].startswith("reserving a1")


def test_a_default_job_does_not_use_a_named_pool():
    nodes = [node("gpu-x", 8, pool="x")]
    result = schedule(nodes, [JobRequest("j1", 1)], CONFIG, now=0.0)
    assert result.placed == ()
    assert result.pending_reasons["j1"] == (
        "asks for pool 'default', which no registered node is in (known pools: x); "
        "it waits for an agent started with --pool default"
    )


def test_the_reason_for_an_unknown_pool_names_it_and_the_known_pools():
    nodes = [node("a1", 8, pool="a"), node("b1", 8, pool="b", schedulable=False)]
    result = schedule(nodes, [JobRequest("j1", 1, pool="gpu-z")], CONFIG, now=0.0)
    assert "'gpu-z'" in result.pending_reasons["j1"]
    assert "known pools: a, b" in result.pending_reasons["j1"]


def test_capacity_reasons_count_only_the_jobs_pool():
    nodes = [node("a1", 4, pool="a", free=1), node("b1", 8, pool="b")]
    config = SchedulerConfig(reservations=False)
    result = schedule(nodes, [JobRequest("j1", 2, pool="a")], config, now=0.0)
    assert result.pending_reasons["j1"] == "needs 2 GPUs in pool 'a'; 1 is free, 4 exist"


def test_jobs_of_one_shape_in_different_pools_get_their_own_reasons():
    nodes = [node("a1", 4, pool="a", free=0), node("b1", 4, pool="b", free=1)]
    config = SchedulerConfig(reservations=False)
    result = schedule(nodes, [JobRequest("ja", 2, pool="a"), JobRequest("jb", 2, pool="b")], config, now=0.0)
    assert result.pending_reasons["ja"] == "needs 2 GPUs in pool 'a'; 0 are free, 4 exist"
    assert result.pending_reasons["jb"] == "needs 2 GPUs in pool 'b'; 1 is free, 4 exist"


def test_a_reservation_holds_only_nodes_of_the_jobs_pool():
    nodes = [node("a1", 8, pool="a", free=4), node("b1", 8, pool="b", free=8)]
    result = schedule(nodes, [JobRequest("big", 8, pool="a"), JobRequest("small", 4, pool="b")], CONFIG, now=0.0)
    assert result.reserved_nodes == ("a1",)
    assert placed_nodes(result, "small") == ["b1"]


def test_requirements_and_pool_narrow_together():
    nodes = [node("a-h100", 8, pool="a"), node("a-a100", 8, pool="a", model="A100"), node("b-a100", 8, pool="b", model="A100")]
    result = schedule(nodes, [JobRequest("j1", 8, pool="b", gpu_model="a100")], CONFIG, now=0.0)
    assert placed_nodes(result, "j1") == ["b-a100"]


def test_place_alone_respects_the_pool():
    nodes = [node("a1", 8, pool="a"), node("b1", 2, pool="b")]
    assert place(JobRequest("j1", 4, pool="b"), nodes, CONFIG) is None
    decision = place(JobRequest("j1", 2, pool="b"), nodes, CONFIG)
    assert decision is not None and [share.node_id for share in decision.nodes] == ["b1"]


def test_too_big_counts_only_the_jobs_pool_and_never_refuses_an_unknown_pool():
    nodes = [node("a1", 8, pool="a"), node("b1", 2, pool="b")]
    assert too_big_for_cluster(JobRequest("", 8, pool="a"), nodes) is None
    reason = too_big_for_cluster(JobRequest("", 4, pool="b"), nodes)
    assert reason == "needs 4 GPUs in pool 'b', but the 1 known node has 2 such GPUs in all"
    assert too_big_for_cluster(JobRequest("", 64, pool="new"), nodes) is None


def test_request_of_spec_reads_the_pool_with_default():
    assert request_of_spec(job_pb2.JobSpec(gpus=1)).pool == "default"
    assert request_of_spec(job_pb2.JobSpec(gpus=1, pool="a")).pool == "a"


POOLS = ("default", "a", "b")


@st.composite
def clusters(draw):
    nodes = [
        node(
            f"n{i}",
            draw(st.integers(1, 8)),
            pool=draw(st.sampled_from(POOLS)),
            free=draw(st.integers(0, 8)),
            schedulable=draw(st.booleans()),
            model=draw(st.sampled_from(("H100", "A100"))),
        )
        for i in range(draw(st.integers(0, 8)))
    ]
    jobs = []
    for j in range(draw(st.integers(1, 12))):
        gpus_per_node = draw(st.sampled_from((0, 0, 1, 2, 4)))
        gpus = gpus_per_node * draw(st.integers(1, 3)) if gpus_per_node else draw(st.integers(1, 12))
        jobs.append(
            JobRequest(
                f"j{j}",
                gpus,
                gpus_per_node=gpus_per_node,
                priority=draw(st.integers(0, 2)),
                submit_time=float(j),
                estimated_runtime_seconds=float(draw(st.integers(0, 100))),
                gpu_model=draw(st.sampled_from(("", "", "a100"))),
                spread=draw(st.booleans()),
                pool=draw(st.sampled_from((*POOLS, "gone"))),
            )
        )
    return nodes, jobs


@settings(max_examples=300, deadline=None)
@given(clusters(), st.sampled_from(POLICIES), st.booleans())
def test_no_job_is_ever_placed_on_a_node_of_another_pool(cluster, policy, reservations):
    nodes, jobs = cluster
    pool_of = {n.node_id: n.pool for n in nodes}
    job_pool = {j.job_id: j.pool for j in jobs}
    result = schedule(nodes, jobs, SchedulerConfig(policy=policy, reservations=reservations), now=100.0)
    taken: set[str] = set()
    for decision in result.placed:
        for share in decision.nodes:
            assert pool_of[share.node_id] == job_pool[decision.job_id]
            assert not taken & set(share.gpu_uuids)
            taken |= set(share.gpu_uuids)
    assert all(pool_of[n] == job_pool[result.reserved_for] for n in result.reserved_nodes)
    # Each pool alone schedules its jobs the same way: the other pools' nodes change nothing.
    for pool in POOLS:
        alone = schedule(
            [n for n in nodes if n.pool == pool],
            [j for j in jobs if j.pool == pool],
            SchedulerConfig(policy=policy, reservations=False),
            now=100.0,
        )
        if not reservations:
            assert [d for d in result.placed if job_pool[d.job_id] == pool] == list(alone.placed)


# -- the scheduling loop: the pools of nodes and jobs, elastic restarts ---------------------------------


def _register(cluster, node_id: str, gpus: int, pool: str = ""):
    from gpuorch.v1 import agent_pb2

    message = agent_pb2.Register(node_id=node_id, addresses=["127.0.0.1"], pool=pool)
    for index in range(gpus):
        message.devices.add(uuid=f"GPU-{node_id}-{index}", index=index, name="H100", memory_total_bytes=80 * GIB)
    cluster.register(message)


async def test_the_loop_sees_pools_and_an_elastic_restart_shrinks_within_its_pool():
    from coordinator.control.cluster_view import ClusterView
    from coordinator.control.job_manager import JobManager
    from coordinator.rules.liveness import LivenessPolicy
    from coordinator.store.memory import MemoryJobStore
    from gpuorch.v1 import agent_pb2

    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    _register(cluster, "a1", 4, "a")
    _register(cluster, "b1", 4)
    manager = JobManager(cluster, MemoryJobStore())
    await manager.start()
    try:
        assert {view.node_id: view.pool for view in manager.node_views()} == {"a1": "a", "b1": "default"}
        spec = job_pb2.JobSpec(argv=["x"], gpus=4, min_gpus=2, max_restarts=1, pool="a", time_limit_seconds=600)
        job_id = await manager.submit(spec)
        assert await manager.schedule_pass() == [job_id]
        request = manager.scheduling.request(manager.get(job_id))
        assert (request.pool, request.time_limit_seconds, request.estimated_runtime_seconds) == ("a", 600.0, 600.0)
        blocker = await manager.submit(job_pb2.JobSpec(argv=["x"], gpus=2, pool="a", priority=5))
        assert await manager.schedule_pass() == []
        # Rank 3 fails: the restart cannot have 4 GPUs in pool "a" (the blocker takes 2), b1's 4 free ones are not its.
        for rank in range(4):
            manager.on_task_status(
                "a1", agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=rank, state=agent_pb2.TASK_STATE_RUNNING)
            )
        manager.on_task_status(
            "a1", agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=3, state=agent_pb2.TASK_STATE_EXITED, exit_code=1)
        )
        for rank in range(3):
            manager.on_task_status(
                "a1", agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=rank, state=agent_pb2.TASK_STATE_EXITED, signal=15)
            )
        placed = await manager.schedule_pass()
        assert blocker in placed and job_id in placed
        job = manager.get(job_id).job
        assert job.attempt == 2 and job.placement.world_size == 2
        assert {node.node_id for node in job.placement.nodes} == {"a1"}
    finally:
        await manager.store.close()


def test_an_agent_with_a_bad_pool_name_is_refused_at_start_and_at_registration():
    import pytest

    from agent.settings import AgentSettings
    from coordinator.rules.registration import InvalidMessage, validate_register
    from gpuorch.settings import load_settings
    from gpuorch.v1 import agent_pb2

    assert load_settings(AgentSettings, env={"GPUORCH_POOL": "train"}).pool == "train"
    AgentSettings(pool="train-2").validate()
    with pytest.raises(ValueError, match="'Train' is not a valid pool name"):
        AgentSettings(pool="Train").validate()
    with pytest.raises(ValueError, match="pool must not be empty"):
        AgentSettings(pool="").validate()
    with pytest.raises(InvalidMessage, match=r"register\.pool: pool 'a b' is not a valid pool name"):
        validate_register(agent_pb2.Register(node_id="n1", pool="a b"))
