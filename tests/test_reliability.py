"""Reliability under faults: re-registration, a stopped agent, overlapping attempts, the fence of a
returning node, job ids, and where ranks ran.

The coordinator's decisions are tested in-process (a real cluster view, job manager, store and
agent service, no network; what agents would receive is read from their sessions' outboxes); the
agent and the timing of real ranks with real processes on loopback.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time

import grpc

from agent.coordinator_link import CoordinatorLink
from coordinator.api.agent_service import AgentService
from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.rules.liveness import LivenessPolicy
from coordinator.rules.recovery import RecoveryPolicy
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.backoff import Backoff
from gpuorch.v1 import agent_pb2, cluster_pb2, job_pb2
from tests.harness import REPO, wait_for

PENDING, RUNNING, FAILED = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_FAILED
OVERLAP_RANK = str(REPO / "tests" / "workloads" / "overlap_rank.py")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def registration(node_id: str, gpus: int = 1, tasks: tuple[agent_pb2.TaskStatus, ...] = ()) -> agent_pb2.Register:
    message = agent_pb2.Register(node_id=node_id, addresses=["127.0.0.1"], tasks=tasks)
    for index in range(gpus):
        message.devices.add(uuid=f"GPU-{node_id}-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
    return message


def drain(session, kind: str) -> list:
    """What the coordinator queued for one agent, of one kind, taken out of its outbox."""
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message.WhichOneof("payload") == kind:
            found.append(getattr(message, kind))
    return found


async def manager_on(tmp_path, clock: Clock | None = None) -> tuple[ClusterView, JobManager]:
    clock = clock or Clock()
    cluster = ClusterView(policy=LivenessPolicy(grace_period=5.0), default_heartbeat_interval=1.0, clock=clock)
    manager = JobManager(cluster, SqliteJobStore(tmp_path / "jobs.db"), stop_grace_seconds=2.0)
    await manager.start()
    return cluster, manager


def running(job_id: str, attempt: int, rank: int, working_dir: str = "") -> agent_pb2.TaskStatus:
    return agent_pb2.TaskStatus(
        job_id=job_id, attempt=attempt, rank=rank, state=agent_pb2.TASK_STATE_RUNNING, pid=4242, working_dir=working_dir
    )


def exited(job_id: str, attempt: int, rank: int, code: int = 0, signum: int = 0) -> agent_pb2.TaskStatus:
    return agent_pb2.TaskStatus(
        job_id=job_id, attempt=attempt, rank=rank, state=agent_pb2.TASK_STATE_EXITED, exit_code=code, signal=signum
    )


# -- 1. re-registration ---------------------------------------------------------------------------


class RegisteringStream:
    """The servicer context of one AgentService/Connect call: the agent's Register, then nothing until
    `end()`. `on_ack` runs while the coordinator writes its RegisterAck (the await in which other
    coroutines, a scheduling pass among them, get to run)."""

    def __init__(self, register: agent_pb2.Register, on_ack) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait(agent_pb2.AgentMessage(register=register))
        self.on_ack = on_ack
        self.written: list[agent_pb2.CoordinatorMessage] = []
        self.aborted: tuple | None = None

    async def read(self):
        return await self.incoming.get()

    async def write(self, message: agent_pb2.CoordinatorMessage) -> None:
        self.written.append(message)
        if message.WhichOneof("payload") == "register_ack":
            await self.on_ack()

    async def abort(self, code, details: str):
        self.aborted = (code, details)
        raise grpc.RpcError(details)

    def auth_context(self) -> dict:
        return {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def end(self) -> None:
        self.incoming.put_nowait(grpc.aio.EOF)


async def test_a_job_placed_while_its_node_re_registers_is_not_killed(tmp_path):
    """A node comes back without the rank of an earlier job, a job is pending, and a scheduling pass
    runs in the middle of the registration: the registration was reconciled before that pass (the
    earlier rank is judged lost), and the job the pass placed, which the agent's Register could not
    know of, runs on."""
    cluster, manager = await manager_on(tmp_path)
    service = AgentService(cluster, epoch=1)
    service.on_register.append(manager.on_register)
    try:
        _, old_session, _ = cluster.register(registration("n1", gpus=2))
        earlier = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        assert await manager.schedule_pass() == [earlier]
        manager.on_task_status("n1", running(earlier, 1, 0))  # the agent had the launch: a rank missing later is lost
        cluster.stream_closed(old_session)  # SUSPECT: nothing may be placed there
        job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        assert await manager.schedule_pass() == []
        in_the_window: dict = {}

        async def scheduling_pass_in_the_window() -> None:
            in_the_window["earlier"] = manager.get(earlier).job.state
            in_the_window["placed"] = await manager.schedule_pass()

        stream = RegisteringStream(registration("n1", gpus=2), scheduling_pass_in_the_window)
        connect = asyncio.create_task(service.Connect(None, stream))
        await wait_for_async(lambda: any(m.WhichOneof("payload") == "launch_task" for m in stream.written), what="the launch")
        assert in_the_window["earlier"] == FAILED, "the registration is reconciled before anything may be placed on the node"
        assert in_the_window["placed"] == [job_id], "the pass ran while the RegisterAck was written"
        job = manager.get(job_id).job
        assert job.state == RUNNING and job.attempt == 1, f"the job was killed by the registration it raced: {job.reason}"
        stream.end()
        await asyncio.wait_for(connect, 5)
    finally:
        await manager.store.close()


async def test_reconciliation_judges_only_attempts_placed_before_the_registration(tmp_path):
    """The registration's reconciliation may run after a pass placed a job on the node (whatever the
    order of callbacks): ranks placed on the new session were unknown to the agent's Register."""
    cluster, manager = await manager_on(tmp_path)
    try:
        _, old_session, _ = cluster.register(registration("n1", gpus=2))
        earlier = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        assert await manager.schedule_pass() == [earlier]
        manager.on_task_status("n1", running(earlier, 1, 0))  # the agent had the launch: a rank missing later is lost
        cluster.stream_closed(old_session)
        later = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        register = registration("n1", gpus=2)
        cluster.register(register)
        assert await manager.schedule_pass() == [later]
        manager.on_register("n1", register)  # the agent knew neither job; it ran the earlier one's rank and lost it
        assert manager.get(earlier).job.state == FAILED and "re-registered without it" in manager.get(earlier).job.reason
        assert manager.get(later).job.state == RUNNING, manager.get(later).job.reason
    finally:
        await manager.store.close()


async def wait_for_async(predicate, timeout: float = 5.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- 2. an agent whose stream broke in an unexpected way ---------------------------------------------


class NoDevices:
    blocking = False

    def devices(self):
        return []

    def sample(self):
        return []


async def test_any_error_of_a_stream_leads_to_a_reconnect():
    """`call.write` on a call the coordinator already ended raises asyncio.InvalidStateError, not an
    RpcError; whatever a stream raises, the agent reconnects."""
    agent = CoordinatorLink(coordinator="127.0.0.1:1", node_id="n1", source=NoDevices(), backoff=Backoff(initial=0.01, cap=0.01))
    stopping = asyncio.Event()
    errors = [asyncio.InvalidStateError("RPC already finished"), RuntimeError("anything else"), KeyError("a bug")]
    attempts = 0

    async def stream(stopping_event) -> None:
        nonlocal attempts
        attempts += 1
        if errors:
            raise errors.pop(0)
        stopping.set()

    agent._stream = stream
    await asyncio.wait_for(agent.run(stopping), 5)
    assert attempts == 4 and agent.reconnects == 3


def test_an_agent_stopped_past_its_down_deadline_comes_back_on_sigcont(cluster):
    """SIGSTOP an agent with a running job until its node is DOWN and its stream closed, then SIGCONT:
    the agent lives on, registers again, and the node is READY, its stale ranks fenced. Several times,
    with frequent heartbeats: the end of the old stream may reach the agent's reader first, or a write
    of its writer (asyncio.InvalidStateError, which the agent once died of; rare in any one cycle, so
    test_any_error_of_a_stream_leads_to_a_reconnect raises it deterministically)."""
    cluster.start_coordinator("--node-grace-period", "30", "--stop-grace-period", "1", "--missed-heartbeats", "8")
    agent = cluster.add_agent("n1", 2, "--heartbeat-interval", "0.05")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    argv = [sys.executable, str(REPO / "tests" / "workloads" / "rank.py"), "--sleep", "60"]
    for _ in range(6):
        job_id = client.submit_job(argv=argv, gpus=2)
        wait_for(lambda: client.get_job(job_id).state == RUNNING, what="the job running")  # noqa: B023
        wait_for(lambda: client.get_node("n1").last_heartbeat_sequence >= 4, what="heartbeats")
        agent.signal(signal.SIGSTOP)
        wait_for(lambda: client.get_node("n1").state == cluster_pb2.NODE_STATE_DOWN, timeout=5, what="n1 DOWN")
        time.sleep(0.3)  # the coordinator ends the stream while the agent cannot see it
        agent.signal(signal.SIGCONT)
        cluster.wait_node_state("n1", cluster_pb2.NODE_STATE_READY, timeout=10)
        assert agent.process.poll() is None, f"the agent exited after SIGCONT:\n{agent.output()[-3000:]}"
        assert client.get_job(job_id).state == FAILED  # its node went DOWN, and it had no restarts
        wait_for(
            lambda: not any(device.allocated_job_id for device in client.get_node("n1").devices), what="the stale ranks fenced"
        )
    assert "Traceback" not in agent.output(), agent.output()[-3000:]


# -- 3. one attempt at a time -------------------------------------------------------------------------


def lifetimes(path) -> dict[int, list[tuple[float, float]]]:
    """attempt -> (start, end) of each of its ranks, from the lines the ranks appended."""
    found: dict[int, list[tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        attempt, start, end = line.split()[:3]
        found.setdefault(int(attempt), []).append((float(start), float(end)))
    return found


def test_a_restart_waits_for_every_rank_of_the_previous_attempt_to_end(cluster):
    cluster.start_coordinator("--stop-grace-period", "5", "--restart-backoff-base", "0.2")
    for node_id in ("n1", "n2"):
        cluster.add_agent(node_id, 2, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(2)
    client = cluster.client()
    record = cluster.root / "lifetimes.txt"
    argv = [sys.executable, OVERLAP_RANK, "--record", str(record), "--fail-rank", "1", "--fail-after", "0.5", "--linger", "1.0"]
    job_id = client.submit_job(argv=argv, gpus=2, max_restarts=1)  # half the cluster: free GPUs for a restart at once
    job = wait_for(lambda: (j := client.get_job(job_id)).state == job_pb2.JOB_STATE_SUCCEEDED and j, timeout=40, what="success")
    assert job.attempt == 2
    wait_for(lambda: len(record.read_text().splitlines()) == 4, timeout=10, what="every rank of both attempts to end")
    ranks = lifetimes(record)
    assert len(ranks[1]) == 2 and len(ranks[2]) == 2, ranks
    last_end_of_first = max(end for _, end in ranks[1])
    first_start_of_second = min(start for start, _ in ranks[2])
    assert last_end_of_first < first_start_of_second, (
        f"attempt 2 started {last_end_of_first - first_start_of_second:.3f}s before attempt 1's last rank ended"
    )


async def test_after_a_coordinator_restart_a_restart_still_waits_for_the_old_ranks(tmp_path):
    """The coordinator dies while a failed attempt's ranks are in their stop grace; the one that
    starts next learns of them only from the agents' registrations, and waits for their ends."""
    cluster, manager = await manager_on(tmp_path)
    cluster.register(registration("n1", gpus=4))
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=2, max_restarts=1))
    assert await manager.schedule_pass() == [job_id]
    manager.on_task_status("n1", running(job_id, 1, 0))
    manager.on_task_status("n1", running(job_id, 1, 1))
    manager.on_task_status("n1", exited(job_id, 1, 1, code=1))  # rank 0 is stopped, and takes its time
    assert manager.get(job_id).job.state == PENDING
    await manager.store.close()

    cluster, manager = await manager_on(tmp_path)  # a new coordinator on the same store
    try:
        register = registration("n1", gpus=4, tasks=(running(job_id, 1, 0), exited(job_id, 1, 1, code=1)))
        cluster.register(register)
        manager.on_register("n1", register)
        assert await manager.schedule_pass() == [], "attempt 2 placed while attempt 1's rank 0 still runs"
        assert "waiting for 1 rank(s) of attempt 1 to end" in manager.get(job_id).job.reason
        manager.on_task_status("n1", exited(job_id, 1, 0, signum=15))
        assert await manager.schedule_pass() == [job_id]
        assert manager.get(job_id).job.attempt == 2
    finally:
        await manager.store.close()


async def test_an_elastic_restart_after_a_coordinator_restart_still_shrinks_with_its_reason(tmp_path):
    """The coordinator dies while an elastic job waits out its restart backoff, and comes back to a
    cluster too small for the job's full size: the job is still known to be restarting (its reason is
    stored), so elastic placement starts it smaller, and its ranks are told why."""
    clock = Clock()
    policy = RecoveryPolicy(backoff_initial_seconds=30.0)
    cluster = ClusterView(policy=LivenessPolicy(grace_period=5.0), default_heartbeat_interval=1.0, clock=clock)
    manager = JobManager(cluster, SqliteJobStore(tmp_path / "jobs.db"), recovery_policy=policy, clock=clock)
    await manager.start()
    cluster.register(registration("n1", gpus=2))
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=2, min_gpus=1, max_restarts=2))
    assert await manager.schedule_pass() == [job_id]
    for rank in (0, 1):
        manager.on_task_status("n1", running(job_id, 1, rank))
    manager.on_task_status("n1", exited(job_id, 1, 1, code=7))
    manager.on_task_status("n1", exited(job_id, 1, 0, signum=15))
    assert manager.get(job_id).job.state == PENDING
    await manager.store.close()

    cluster = ClusterView(policy=LivenessPolicy(grace_period=5.0), default_heartbeat_interval=1.0, clock=clock)
    manager = JobManager(cluster, SqliteJobStore(tmp_path / "jobs.db"), recovery_policy=policy, clock=clock)
    await manager.start()  # a new coordinator on the same store
    try:
        register = registration("n1", gpus=1)  # the node came back with one GPU
        cluster.register(register)
        manager.on_register("n1", register)
        assert await manager.schedule_pass() == [], "placed before its backoff ended"
        clock.now += 31
        assert await manager.schedule_pass() == [job_id], "the restarting elastic job is placed smaller"
        job = manager.get(job_id).job
        assert (job.attempt, job.placement.world_size, job.attempts[1].restart_reason) == (2, 1, "rank_exit:1:7")
        (launch,) = drain(cluster.nodes["n1"].session, "launch_task")
        assert launch.env["GPUORCH_RESTART_REASON"] == "rank_exit:1:7"
    finally:
        await manager.store.close()


# -- 4. the fence of a returning node ------------------------------------------------------------------


async def test_a_returning_nodes_gpus_wait_until_its_stale_ranks_are_gone(tmp_path):
    clock = Clock()
    cluster, manager = await manager_on(tmp_path, clock)
    try:
        _, session, _ = cluster.register(registration("n1"))
        stale = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        assert await manager.schedule_pass() == [stale]
        manager.on_task_status("n1", running(stale, 1, 0))
        cluster.stream_closed(session)
        clock.now += 10
        cluster.tick()  # DOWN: its rank is given up for lost, its GPU given back
        assert manager.get(stale).job.state == FAILED
        waiting = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
        register = registration("n1", tasks=(running(stale, 1, 0),))  # the partition heals: the rank still runs
        _, session, _ = cluster.register(register)
        manager.on_register("n1", register)
        (fence,) = drain(session, "stop_task")
        assert (fence.job_id, fence.attempt) == (stale, 1)
        assert await manager.schedule_pass() == [], "the GPU is placed while its stale rank may still run"
        assert cluster.allocations["GPU-n1-0"] == (stale, 1)
        manager.on_task_status("n1", exited(stale, 1, 0, signum=9))
        assert await manager.schedule_pass() == [waiting]
    finally:
        await manager.store.close()


async def test_a_fenced_rank_the_next_registration_no_longer_lists_is_gone(tmp_path):
    clock = Clock()
    cluster, manager = await manager_on(tmp_path, clock)
    try:
        _, session, _ = cluster.register(registration("n1"))
        stale = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
        await manager.schedule_pass()
        cluster.stream_closed(session)
        clock.now += 10
        cluster.tick()
        waiting = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
        register = registration("n1", tasks=(running(stale, 1, 0),))
        _, session, _ = cluster.register(register)
        manager.on_register("n1", register)
        assert await manager.schedule_pass() == []
        cluster.stream_closed(session)  # lost before the fencing stop was answered
        register = registration("n1")  # the agent comes back without the rank: it is gone
        cluster.register(register)
        manager.on_register("n1", register)
        assert await manager.schedule_pass() == [waiting]
    finally:
        await manager.store.close()


# -- 5, 6. job ids and where ranks ran ----------------------------------------------------------------


async def test_job_ids_keep_their_order_and_cannot_be_guessed(tmp_path):
    _, manager = await manager_on(tmp_path)
    try:
        ids = [await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1)) for _ in range(20)]
        assert all(re.fullmatch(r"j-\d{6}-[a-z2-7]{6}", job_id) for job_id in ids), ids
        assert [job_id.split("-")[1] for job_id in ids] == [f"{n:06d}" for n in range(1, 21)]
        assert len({job_id.split("-")[2] for job_id in ids}) == 20, "the unguessable parts differ"
        jobs, _ = await manager.list()
        assert [job.job_id for job in jobs] == ids[::-1]
    finally:
        await manager.store.close()


async def test_a_running_ranks_working_dir_is_recorded_per_node(tmp_path):
    cluster, manager = await manager_on(tmp_path)
    try:
        cluster.register(registration("n1"))
        cluster.register(registration("n2"))
        job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=2, spread=True))
        assert await manager.schedule_pass() == [job_id]
        placement = manager.get(job_id).job.placement
        for node in placement.nodes:
            manager.on_task_status(node.node_id, running(job_id, 1, node.first_rank, working_dir=f"/home/alice/{node.node_id}"))
        (attempt,) = manager.get(job_id).job.attempts
        assert dict(attempt.working_dirs) == {"n1": "/home/alice/n1", "n2": "/home/alice/n2"}
    finally:
        await manager.store.close()
