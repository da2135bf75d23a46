"""Two coordinators on one real PostgreSQL, real agents, real gloo ranks: failover end to end.

- SIGKILL of the leader in the middle of a burst of 200 submissions: the standby leads, the agents
  move over, the running 4-rank job is adopted (same attempt, its ranks never restarted), every
  acknowledged submission exists exactly once, and the burst finishes against the new leader.
- SIGSTOP of the leader: the standby takes over; on SIGCONT nothing the old leader does lands in the
  store, and it steps down by itself (exit 75).
- A PostgreSQL restart under load: the leader keeps its lease or a clean failover happens; nothing
  acknowledged is lost.

Agents (`--coordinator A,B`) and clients (`gpuorch.Client("A,B")`) are given both coordinators'
addresses and follow the leader that a standby names (gpuorch-leader metadata).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gpuorch
from coordinator.control.leadership import EXIT_STEPPED_DOWN
from gpuorch.errors import GpuorchError
from gpuorch.v1 import job_pb2, job_pb2_grpc
from tests.harness import REPO, Daemon, LocalCluster, free_port, wait_for
from tests.test_jobs_e2e import wait_state

RUNNING, SUCCEEDED, PENDING = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_PENDING
GLOO_UNTIL = str(REPO / "tests" / "workloads" / "gloo_until.py")
RANK = str(REPO / "tests" / "workloads" / "rank.py")
LEASE_SECONDS = 3.0
BURST = 200
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

torch = pytest.importorskip("torch", reason="the gloo ranks need torch (pip install torch==2.13.0)")


def health(address: str) -> int | None:
    """The coordinator's health for "" (SERVING on the leader only), None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="")
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
        except grpc.RpcError:
            return None


def wait_leading(address: str, timeout: float = 30.0) -> None:
    wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING, timeout=timeout, what=f"{address} to lead")


class Coordinators:
    """Two coordinators with one store_url: `a` is started first and leads, `b` stands by."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.addresses = {name: f"127.0.0.1:{free_port()}" for name in ("a", "b")}
        self.daemons: dict[str, Daemon] = {}

    def start(self, name: str) -> Daemon:
        argv = [
            sys.executable, "-m", "coordinator.main",
            "--listen", self.addresses[name],
            "--state-dir", str(self.root / f"coordinator-{name}"),
            "--store-url", self.url,
            "--leader-lease-seconds", str(LEASE_SECONDS),
            "--node-grace-period", "20",
            "--stop-grace-period", "1",
            "--log-format", "json",
        ]  # fmt: skip
        self.daemons[name] = Daemon(f"coordinator-{name}", argv, self.root / f"coordinator-{name}.log").start()
        return self.daemons[name]

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()


class BurstClient:
    """The SDK given both coordinators' addresses (it follows the leader itself), submitting with client request
    ids; a call that still fails UNAVAILABLE or past its deadline (no leader yet) is retried, same request id."""

    def __init__(self, addresses: list[str]) -> None:
        self.client = gpuorch.Client(",".join(addresses), timeout=5)
        self.acknowledged: dict[str, str] = {}
        """Request id -> the job id the coordinator answered with."""
        self.retries = 0

    def submit(self, request_id: str, spec: job_pb2.JobSpec, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job_id = self.client.submit_job(spec, client_request_id=request_id)
            except GpuorchError as error:
                if time.monotonic() > deadline or error.code not in RETRIED:
                    raise
                self.retries += 1
                time.sleep(0.05)
                continue
            self.acknowledged[request_id] = job_id
            return job_id

    def close(self) -> None:
        self.client.close()


def burst_spec(index: int) -> job_pb2.JobSpec:
    # Held: too big for the cluster, so they stay PENDING and the burst costs no processes.
    return job_pb2.JobSpec(argv=[sys.executable, "-c", "pass"], gpus=64, name=f"burst-{index}", hold_if_too_big=True)


def all_jobs(client) -> list[job_pb2.Job]:
    jobs, token = [], ""
    while True:
        page, token = client.list_jobs(page_size=1000, page_token=token)
        jobs += page
        if not token:
            return jobs


@pytest.fixture
def ha(tmp_path, postgres_url):
    coordinators = Coordinators(tmp_path, postgres_url)
    first = coordinators.start("a")
    try:
        wait_leading(coordinators.addresses["a"], timeout=60)
    except AssertionError as error:
        first.log_stacks()  # where it is stuck (gpuorch/stacks.py)
        raise AssertionError(f"{error}; its log ends:\n{first.output()[-8000:]}") from None
    coordinators.start("b")
    wait_for(lambda: health(coordinators.addresses["b"]) is not None, timeout=30, what="the standby to answer")
    assert health(coordinators.addresses["b"]) == health_pb2.HealthCheckResponse.NOT_SERVING
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.address = ",".join(coordinators.addresses.values())  # agents and cluster.client() follow the leader
    for node in ("n1", "n2", "n3"):
        cluster.add_agent(node, 2, "--heartbeat-interval", "0.5")
    cluster.wait_for_nodes(3, timeout=60)
    yield coordinators, cluster
    cluster.stop()
    coordinators.stop()


def test_the_standby_takes_over_a_leader_killed_mid_burst_adopting_the_running_job(ha, tmp_path):
    coordinators, cluster = ha
    client = cluster.client()
    release = tmp_path / "release"
    job_id = client.submit_job(
        argv=[sys.executable, GLOO_UNTIL, "--until-file", str(release)], gpus=4, gpus_per_node=2, backend="gloo"
    )
    running = wait_state(client, job_id, RUNNING, timeout=60)
    assert running.attempt == 1

    submitter = BurstClient([coordinators.addresses["a"], coordinators.addresses["b"]])
    failures: list[BaseException] = []

    def burst() -> None:
        try:
            for index in range(BURST):
                submitter.submit(f"burst-{index}", burst_spec(index))
        except BaseException as error:  # noqa: BLE001 - the test reports it
            failures.append(error)

    thread = threading.Thread(target=burst)
    thread.start()
    wait_for(lambda: len(submitter.acknowledged) >= 50 or failures, timeout=60, what="50 acknowledged submissions")
    coordinators.daemons["a"].kill()  # SIGKILL, mid-burst
    thread.join(180)
    submitter.close()
    assert not failures, failures
    assert len(submitter.acknowledged) == BURST, "the burst's client finished against the new leader"

    wait_leading(coordinators.addresses["b"])
    cluster.wait_for_nodes(3, timeout=60)  # every agent moved over (cluster.client() reaches b through the proxy)
    adopted = client.get_job(job_id)
    assert adopted.state == RUNNING and adopted.attempt == 1 and len(adopted.attempts) == 1, "adopted, not relaunched"

    by_name: dict[str, list[str]] = {}
    for job in all_jobs(client):
        by_name.setdefault(job.spec.name, []).append(job.job_id)
    for request_id, acknowledged in submitter.acknowledged.items():
        assert by_name.get(request_id) == [acknowledged], f"{request_id} must exist exactly once, as acknowledged"

    release.touch()
    done = wait_state(client, job_id, SUCCEEDED, timeout=60)
    assert done.attempt == 1 and len(done.attempts) == 1
    for rank in range(4):  # each rank started once: one start line in its log, of attempt 1
        output = b"".join(client.job_logs(job_id, rank)).decode()
        assert output.count(f"rank {rank}/4 pid") == 1 and "attempt 1" in output, output
        assert f"rank {rank} done after" in output


def test_a_frozen_leader_is_fenced_and_steps_down_by_itself(ha, tmp_path, postgres_url):
    coordinators, cluster = ha
    client = cluster.client()
    release = tmp_path / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2)
    wait_state(client, job_id, RUNNING, timeout=60)

    def stored_state() -> int:
        with psycopg.connect(postgres_url) as connection:
            return connection.execute("SELECT state FROM jobs WHERE job_id = %s", (job_id,)).fetchone()[0]

    # Frozen once RUNNING is committed, so that the new leader, which adopts the job as stored, writes nothing more
    # for it: every difference in the store after the old leader wakes would be the old leader's.
    wait_for(lambda: stored_state() == RUNNING, timeout=30, what="RUNNING committed")
    old = coordinators.daemons["a"]
    old.signal(signal.SIGSTOP)
    # While it is frozen its connections stay open: neither the agents' streams nor the SDK's calls (which time
    # out there: DEADLINE_EXCEEDED is not followed, the call may have reached it) move on until it steps down.
    # The new leader is asked directly.
    client = gpuorch.Client(coordinators.addresses["b"], timeout=5)
    try:
        wait_leading(coordinators.addresses["b"], timeout=LEASE_SECONDS * 5)
        held = client.submit_job(burst_spec(0), client_request_id="while-frozen")  # held: nothing will change it
        assert client.get_job(held).state == PENDING
        with psycopg.connect(postgres_url) as connection:
            before = connection.execute("SELECT job_id, state, md5(data) FROM jobs ORDER BY job_id").fetchall()
            (epoch_b,) = connection.execute("SELECT epoch FROM leader").fetchone()
    finally:
        old.signal(signal.SIGCONT)
    # Right after waking, before it has learnt that it lost the lease, the old leader acts on nothing.
    with grpc.insecure_channel(coordinators.addresses["a"]) as channel:
        request = job_pb2.SubmitJobRequest(spec=job_pb2.JobSpec(argv=["true"], gpus=1), client_request_id="to-the-old-one")
        with pytest.raises(grpc.RpcError) as refused:
            job_pb2_grpc.JobServiceStub(channel).SubmitJob(request, timeout=5)
        # UNAVAILABLE (refused as not leading), or CANCELLED (it was already stopping its server): never acknowledged.
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused.value
    assert old.process is not None
    assert old.process.wait(30) == EXIT_STEPPED_DOWN, old.output()[-3000:]
    assert "stepping down: this coordinator no longer leads" in old.output()
    with psycopg.connect(postgres_url) as connection:
        after = connection.execute("SELECT job_id, state, md5(data) FROM jobs ORDER BY job_id").fetchall()
        assert connection.execute("SELECT epoch FROM leader").fetchone() == (epoch_b,)
        assert connection.execute("SELECT count(*) FROM jobs WHERE client_request_id = 'to-the-old-one'").fetchone() == (0,)
    assert after == before, "nothing the deposed leader did landed in the store"
    wait_for(lambda: len(client.list_nodes(["READY"])) == 3, timeout=60, what="every agent registered with b")
    adopted = wait_state(client, job_id, RUNNING, timeout=30)
    assert adopted.attempt == 1 and len(adopted.attempts) == 1, "adopted, not relaunched"
    release.touch()
    assert wait_state(client, job_id, SUCCEEDED, timeout=60).attempt == 1
    client.close()


def test_a_postgresql_restart_under_load_loses_nothing_acknowledged(ha, postgres_server):
    coordinators, cluster = ha
    submitter = BurstClient([coordinators.addresses["a"], coordinators.addresses["b"]])
    failures: list[BaseException] = []

    def burst() -> None:
        try:
            for index in range(BURST):
                submitter.submit(f"burst-{index}", burst_spec(index))
        except BaseException as error:  # noqa: BLE001 - the test reports it
            failures.append(error)

    thread = threading.Thread(target=burst)
    thread.start()
    wait_for(lambda: len(submitter.acknowledged) >= 50 or failures, timeout=60, what="50 acknowledged submissions")
    postgres_server.restart(down_seconds=1.0)
    thread.join(180)
    submitter.close()
    assert not failures, failures
    assert len(submitter.acknowledged) == BURST

    wait_for(
        lambda: any(health(address) == health_pb2.HealthCheckResponse.SERVING for address in coordinators.addresses.values()),
        timeout=30,
        what="a leader after the restart (the same one, or the standby after a clean failover)",
    )
    a = coordinators.daemons["a"].process
    assert a is not None and (a.poll() is None or a.returncode == EXIT_STEPPED_DOWN), "the leader kept the lease or stepped down"
    cluster.wait_for_nodes(3, timeout=60)
    client = cluster.client()
    by_name: dict[str, list[str]] = {}
    for job in all_jobs(client):
        by_name.setdefault(job.spec.name, []).append(job.job_id)
        assert job.state == PENDING
    for request_id, acknowledged in submitter.acknowledged.items():
        assert by_name.get(request_id) == [acknowledged], f"{request_id} must exist exactly once, as acknowledged"
