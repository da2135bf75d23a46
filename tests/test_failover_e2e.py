"""Two coordinators on one real PostgreSQL, real agents, real gloo ranks: failover end to end.

- SIGKILL of the leader in the middle of a burst of 200 submissions: the standby leads, the agents
  move over, the running 4-rank job is adopted (same attempt, its ranks never restarted), every
  acknowledged submission exists exactly once, and the burst finishes against the new leader.
- SIGSTOP of the leader: the standby takes over; on SIGCONT nothing the old leader does lands in the
  store, and it steps down by itself (exit 75).
- A PostgreSQL restart under load: the leader keeps its lease or a clean failover happens; nothing
  acknowledged is lost.

The agents take one coordinator address: they reach the leader through tests/leader_proxy.py, as
through a load balancer that health-checks the coordinators. The burst's client is given both
coordinators' addresses and follows the leader that a standby names (gpuorch-leader metadata).
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

from coordinator.control.leadership import EXIT_STEPPED_DOWN
from gpuorch.leader import LEADER_METADATA_KEY
from gpuorch.v1 import job_pb2, job_pb2_grpc
from tests.harness import REPO, Daemon, LocalCluster, free_port, wait_for
from tests.leader_proxy import LeaderProxy
from tests.test_jobs_e2e import wait_state

RUNNING, SUCCEEDED, PENDING = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_PENDING
GLOO_UNTIL = str(REPO / "tests" / "workloads" / "gloo_until.py")
RANK = str(REPO / "tests" / "workloads" / "rank.py")
LEASE_SECONDS = 3.0
BURST = 200

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


class FollowingSubmitter:
    """Submits with client request ids to whichever coordinator leads: on UNAVAILABLE it goes to the address
    the standby names (gpuorch-leader), else to the other one, and retries the same request id."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = {address: grpc.insecure_channel(address) for address in addresses}
        self.current = addresses[0]
        self.acknowledged: dict[str, str] = {}
        """Request id -> the job id the coordinator answered with."""
        self.switches = 0

    def submit(self, request_id: str, spec: job_pb2.JobSpec, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            stub = job_pb2_grpc.JobServiceStub(self.channels[self.current])
            try:
                answer = stub.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, client_request_id=request_id), timeout=5)
                self.acknowledged[request_id] = answer.job_id
                return answer.job_id
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                named = dict(error.trailing_metadata() or ()).get(LEADER_METADATA_KEY, "")
                others = [address for address in self.channels if address != self.current]
                self.current = named if named in self.channels else others[0]
                self.switches += 1
                time.sleep(0.05)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


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
    coordinators.start("a")
    wait_leading(coordinators.addresses["a"])
    coordinators.start("b")
    wait_for(lambda: health(coordinators.addresses["b"]) is not None, timeout=30, what="the standby to answer")
    assert health(coordinators.addresses["b"]) == health_pb2.HealthCheckResponse.NOT_SERVING
    proxy = LeaderProxy(list(coordinators.addresses.values())).start()
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.address = proxy.address  # agents and cluster.client() reach the leader through the proxy
    for node in ("n1", "n2", "n3"):
        cluster.add_agent(node, 2, "--heartbeat-interval", "0.5")
    cluster.wait_for_nodes(3, timeout=60)
    yield coordinators, cluster, proxy
    cluster.stop()
    proxy.stop()
    coordinators.stop()


def test_the_standby_takes_over_a_leader_killed_mid_burst_adopting_the_running_job(ha, tmp_path):
    coordinators, cluster, _proxy = ha
    client = cluster.client()
    release = tmp_path / "release"
    job_id = client.submit_job(
        argv=[sys.executable, GLOO_UNTIL, "--until-file", str(release)], gpus=4, gpus_per_node=2, backend="gloo"
    )
    running = wait_state(client, job_id, RUNNING, timeout=60)
    assert running.attempt == 1

    submitter = FollowingSubmitter([coordinators.addresses["a"], coordinators.addresses["b"]])
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
    assert submitter.current == coordinators.addresses["b"] and submitter.switches >= 1

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
    coordinators, cluster, _proxy = ha
    client = cluster.client()
    release = tmp_path / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2)
    wait_state(client, job_id, RUNNING, timeout=60)
    old = coordinators.daemons["a"]
    old.signal(signal.SIGSTOP)
    try:
        wait_leading(coordinators.addresses["b"], timeout=LEASE_SECONDS * 5)
        cluster.wait_for_nodes(3, timeout=60)
        adopted = wait_state(client, job_id, RUNNING, timeout=30)
        assert adopted.attempt == 1
        later = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2, client_request_id="later")
        wait_state(client, later, RUNNING, timeout=60)
        time.sleep(1.0)  # let the new leader's writes for it settle
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
    assert health(coordinators.addresses["b"]) == health_pb2.HealthCheckResponse.SERVING
    release.touch()
    for job in (job_id, later):
        finished = wait_state(client, job, SUCCEEDED, timeout=60)
        assert finished.attempt == 1


def test_a_postgresql_restart_under_load_loses_nothing_acknowledged(ha, postgres_server):
    coordinators, cluster, _proxy = ha
    submitter = FollowingSubmitter([coordinators.addresses["a"], coordinators.addresses["b"]])
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
