"""Leading, standing by and stepping down: the pure rules, the gate, and a real coordinator on loopback.

The coordinator tests drive a real Coordinator (real gRPC server, SQLite store, real agent link)
with `ScriptedLease`, a hand-written lease whose acquisition and loss the test decides; the same
coordinator on PostgreSQL, with real failovers, is tests/test_failover_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.coordinator_link import CoordinatorLink
from agent.telemetry import open_source
from coordinator.api.standby import (
    advertised_addresses,
    always_answered,
    leader_addresses,
    standby_refusal,
)
from coordinator.control.leadership import (
    EXIT_STEPPED_DOWN,
    Leadership,
    Role,
    confirmation_problem,
    loop_stalled,
    lost_reason,
)
from coordinator.settings import CoordinatorSettings, address_problem, advertised_listen
from coordinator.store.lease import LeaderInfo, Lease, LeaseLost, LocalLease
from coordinator.wiring import Coordinator
from gpuorch.clock import FakeClock
from gpuorch.leader import LEADER_AGENTS_METADATA_KEY, LEADER_METADATA_KEY
from gpuorch.v1 import job_pb2, job_pb2_grpc
from tests.harness import free_port

# -- what a standby answers ------------------------------------------------------------------------


def test_a_standby_names_the_leader_in_the_message_and_the_metadata():
    refusal = standby_refusal(LeaderInfo("10.0.0.1:50051", 7), own_address="10.0.0.2:50051")
    assert refusal.code == grpc.StatusCode.UNAVAILABLE
    assert refusal.details == "this coordinator is a standby; the leader is 10.0.0.1:50051"
    assert refusal.metadata == ((LEADER_METADATA_KEY, "10.0.0.1:50051"),)


def test_a_leader_with_a_separate_agent_port_is_named_with_both():
    leader = LeaderInfo(advertised_addresses("c1:50051", "c1:50052"), 3)
    refusal = standby_refusal(leader, own_address="c2:50051")
    assert dict(refusal.metadata) == {LEADER_METADATA_KEY: "c1:50051", LEADER_AGENTS_METADATA_KEY: "c1:50052"}
    assert "the leader is c1:50051" in refusal.details


@pytest.mark.parametrize(
    ("leader", "why"),
    [(LeaderInfo("", 0), "nobody ever led"), (LeaderInfo("c2:50051", 4), "the lease of this coordinator's previous run")],
)
def test_no_leader_is_named_when_none_can_be_reached(leader, why):
    refusal = standby_refusal(leader, own_address="c2:50051")
    assert refusal.metadata == (), why
    assert refusal.details == "this coordinator is a standby; no leader is known yet, try the others"


def test_a_coordinator_that_stepped_down_says_so():
    refusal = standby_refusal(LeaderInfo("c1:50051", 9), own_address="c2:50051", stepped_down=True)
    assert refusal.details.startswith("this coordinator is stepped down (it lost the leader lease); the leader is c1:50051")


def test_the_lease_address_carries_the_agent_address_only_when_it_differs():
    assert advertised_addresses("c1:1", "") == "c1:1"
    assert advertised_addresses("c1:1", "c1:1") == "c1:1"
    assert leader_addresses(advertised_addresses("c1:1", "c1:2")) == ("c1:1", "c1:2")
    assert leader_addresses("c1:1") == ("c1:1", "")
    assert leader_addresses("") == ("", "")


def test_health_and_reflection_are_answered_by_a_standby_and_nothing_else():
    assert always_answered("/grpc.health.v1.Health/Check")
    assert always_answered("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not always_answered("/gpuorch.v1.JobService/SubmitJob")
    assert not always_answered("/gpuorch.v1.AgentService/Connect")


# -- advertised addresses ------------------------------------------------------------------------


def test_the_advertised_address_defaults_to_listen_with_the_bound_port_unless_it_is_a_wildcard():
    assert advertised_listen("10.1.2.3:0", 50051) == "10.1.2.3:50051"
    assert advertised_listen("0.0.0.0:50051", 50051) == ""
    assert advertised_listen("[::]:50051", 50051) == ""
    settings = CoordinatorSettings(listen="127.0.0.1:0")
    assert settings.advertised_addresses(4000, 4000) == ("127.0.0.1:4000", "")
    settings = CoordinatorSettings(listen="0.0.0.0:50051", advertise_address="coord-a.example:50051")
    assert settings.advertised_addresses(50051, 50051) == ("coord-a.example:50051", "")


def test_the_agent_address_is_advertised_only_with_agent_listen():
    settings = CoordinatorSettings(listen="10.0.0.1:50051", agent_listen="10.0.0.1:50052")
    assert settings.advertised_addresses(50051, 50052) == ("10.0.0.1:50051", "10.0.0.1:50052")
    settings.advertise_agent_address = "agents.example:443"
    assert settings.advertised_addresses(50051, 50052) == ("10.0.0.1:50051", "agents.example:443")


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("coord-a", "must be HOST:PORT"),
        ("coord-a:http", "must be HOST:PORT"),
        ("coord-a:0", "must be HOST:PORT"),
        ("coord-a:70000", "must be HOST:PORT"),
        ("0.0.0.0:50051", "names no machine"),
    ],
)
def test_a_bad_advertised_address_is_refused_naming_the_setting(address, problem):
    assert problem in (address_problem(address) or "")
    with pytest.raises(ValueError, match=f"advertise_address {address!r} {problem}"):
        CoordinatorSettings(advertise_address=address).validate()


def test_advertise_agent_address_needs_agent_listen():
    with pytest.raises(ValueError, match=r"advertise_agent_address .* needs agent_listen"):
        CoordinatorSettings(advertise_agent_address="a.example:50052").validate()
    assert address_problem("") is None
    assert address_problem("[fd00::1]:50051") is None


# -- when to step down ---------------------------------------------------------------------------


def test_a_loop_that_stood_still_for_a_third_of_the_lease_may_have_outlived_it():
    assert not loop_stalled(100.0, 100.9, lease_seconds=3.0)
    assert loop_stalled(100.0, 101.0, lease_seconds=3.0)
    assert loop_stalled(100.0, 130.0, lease_seconds=3.0)


def test_a_confirmation_fails_once_another_epoch_leads():
    assert confirmation_problem(5, LeaderInfo("c1:1", 5)) is None
    assert confirmation_problem(5, LeaderInfo("c2:1", 6)) == "another coordinator leads now (epoch 6, c2:1; this one is 5)"


def test_the_reason_to_step_down_names_what_happened():
    assert lost_reason(LeaseLost("epoch 6 took over")) == "epoch 6 took over"
    assert lost_reason(LeaseLost()) == "the leader lease was lost"
    assert lost_reason(OSError("connection refused")) == "the leader lease could not be held: OSError: connection refused"
    assert EXIT_STEPPED_DOWN not in (0, 1, 2)  # 1: cannot start, 2: bad settings (never restarted)


NOBODY = LeaderInfo("", 0)


class ScriptedLease(Lease):
    """A lease the test hands out and takes away; who leads otherwise is `others`."""

    def __init__(self, epoch: int = 7, others: LeaderInfo = NOBODY) -> None:
        self.granted = asyncio.Event()
        self.lost: asyncio.Future[None] | None = None
        self.others = others
        self.confirmations = 0
        self.released = False
        self._next_epoch = epoch
        self._epoch = 0

    def grant(self) -> None:
        self.granted.set()

    def take_away(self, reason: str) -> None:
        assert self.lost is not None
        self.lost.set_exception(LeaseLost(reason))

    async def acquire(self) -> int:
        await self.granted.wait()
        self._epoch = self._next_epoch
        return self._epoch

    async def hold(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()
        await self.lost

    async def leader(self) -> LeaderInfo:
        self.confirmations += 1
        return self.others if self.others.epoch else LeaderInfo("me", self._epoch)

    async def release(self) -> None:
        self.released = True

    @property
    def epoch(self) -> int:
        return self._epoch


async def test_the_gate_opens_once_leading_and_closes_for_good_on_stepping_down():
    clock = FakeClock()
    lease = ScriptedLease()
    leadership = Leadership(lease, lease_seconds=3.0, can_lapse=True, clock=clock)
    assert leadership.role is Role.STANDBY and not leadership.may_act()
    lease.grant()
    assert await leadership.acquire() == 7
    leadership.lead()
    assert leadership.may_act()
    clock.advance(0.5)
    assert leadership.may_act()
    leadership.step_down("epoch 8 took over")
    assert not leadership.may_act() and leadership.stepped_down.is_set()
    assert await asyncio.wait_for(leadership.until_may_act(), 1) is False
    assert leadership.reason == "epoch 8 took over"


async def test_after_a_stall_the_gate_waits_for_the_store_to_confirm_the_epoch():
    clock = FakeClock()
    lease = ScriptedLease()
    lease.grant()
    leadership = Leadership(lease, lease_seconds=3.0, can_lapse=True, clock=clock)
    await leadership.acquire()
    holding = asyncio.create_task(leadership.hold())  # renewals, and the ticker that watches the loop
    leadership.lead()
    await asyncio.sleep(leadership.tick_seconds * 2)
    assert leadership.may_act() and lease.confirmations == 0
    clock.advance(5.0)  # as if the process had been frozen: nothing has run since
    assert not leadership.may_act()
    assert await asyncio.wait_for(leadership.until_may_act(), 5) is True  # the ticker noticed, and asked the store
    assert lease.confirmations >= 1 and leadership.role is Role.LEADING
    lease.others = LeaderInfo("c9:1", 8)  # meanwhile someone else took over
    clock.advance(5.0)
    assert await asyncio.wait_for(leadership.until_may_act(), 5) is False
    assert leadership.reason == "another coordinator leads now (epoch 8, c9:1; this one is 7)"
    holding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holding


async def test_a_lease_that_cannot_be_lost_never_closes_the_gate():
    clock = FakeClock()
    store_epoch = [3]
    lease = LocalLease(lambda: store_epoch[0], "c1:1")
    leadership = Leadership(lease, lease_seconds=3.0, can_lapse=False, clock=clock)
    assert await leadership.acquire() == 3
    store_epoch[0] = 4  # the store's open bumped it
    leadership.lead()
    clock.advance(3600)
    assert leadership.may_act() and lease.epoch == 4
    assert await lease.leader() == LeaderInfo("c1:1", 4)


# -- a real coordinator --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def coordinator_with(lease: Lease, tmp_path):
    port = free_port()
    settings = CoordinatorSettings(
        listen=f"127.0.0.1:{port}", state_dir=str(tmp_path / "coordinator"), local_socket="", log_format="json"
    )
    coordinator = Coordinator(settings, lease=lease)
    await coordinator.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield coordinator, channel
    finally:
        await channel.close()
        await coordinator.stop(grace=0)


async def health_of(channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_standby_serves_health_and_reflection_and_refuses_the_rest_naming_the_leader(tmp_path):
    lease = ScriptedLease(others=LeaderInfo(advertised_addresses("10.9.9.9:50051", "10.9.9.9:50052"), 6))
    async with coordinator_with(lease, tmp_path) as (coordinator, channel):
        for _ in range(100):  # the standby reads who leads as it starts waiting
            if coordinator.leadership.leader.epoch == 6:
                break
            await asyncio.sleep(0.05)
        for service in ("", "gpuorch.v1.JobService", "gpuorch.v1.AgentService", "gpuorch.v1.ClusterService"):
            assert await health_of(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING, service
        jobs = job_pb2_grpc.JobServiceStub(channel)
        error = await refused(jobs.SubmitJob(job_pb2.SubmitJobRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details() == "this coordinator is a standby; the leader is 10.9.9.9:50051"
        metadata = dict(error.trailing_metadata() or ())
        assert metadata[LEADER_METADATA_KEY] == "10.9.9.9:50051"
        assert metadata[LEADER_AGENTS_METADATA_KEY] == "10.9.9.9:50052"
        watch = jobs.WatchJob(job_pb2.WatchJobRequest(job_id="j-1"), timeout=5)  # a server stream
        error = await refused(watch.read())
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(error.trailing_metadata() or ())[LEADER_METADATA_KEY] == "10.9.9.9:50051"
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await reflection.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await reflection.read()
        assert "gpuorch.v1.JobService" in {service.name for service in listed.list_services_response.service}
        await reflection.done_writing()
        assert coordinator.store is not None and not coordinator.leading.is_set()


async def test_a_standby_leads_once_it_holds_the_lease_and_steps_down_when_it_loses_it(tmp_path):
    lease = ScriptedLease(epoch=12)
    async with coordinator_with(lease, tmp_path) as (coordinator, channel):
        source = open_source(simulate_gpus=1, node_id="n1", faults_file=str(tmp_path / "faults.json"))
        agent = CoordinatorLink(coordinator=f"127.0.0.1:{coordinator.port}", node_id="n1", source=source)
        stopping = asyncio.Event()
        running = asyncio.create_task(agent.run(stopping))
        try:
            await asyncio.sleep(1.0)
            assert not agent.registered.is_set()  # a standby refuses AgentService/Connect
            lease.grant()
            await asyncio.wait_for(coordinator.leading.wait(), 10)
            assert coordinator.epoch == 12 and coordinator.agents.epoch == 12
            assert await health_of(channel, "gpuorch.v1.JobService") == health_pb2.HealthCheckResponse.SERVING
            assert await health_of(channel, "") == health_pb2.HealthCheckResponse.SERVING
            await asyncio.wait_for(agent.registered.wait(), 20)  # registered once it leads, with its backoff
            listed = await job_pb2_grpc.JobServiceStub(channel).ListJobs(job_pb2.ListJobsRequest(), timeout=5)
            assert list(listed.jobs) == []
            session = agent.session
            lease.take_away("epoch 13 took over")
            await asyncio.wait_for(coordinator.stepped_down.wait(), 5)
            assert coordinator.leadership.reason == "epoch 13 took over"
            assert await health_of(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
            error = await refused(job_pb2_grpc.JobServiceStub(channel).ListJobs(job_pb2.ListJobsRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details().startswith("this coordinator is stepped down")
            for _ in range(100):  # the agent's stream was ended; it cannot register again here
                if not agent.connected:
                    break
                await asyncio.sleep(0.05)
            assert not agent.connected and agent.session == session
            assert all(task.done() for task in coordinator._tasks)  # no scheduling, no liveness, no renewals
        finally:
            stopping.set()
            await asyncio.wait_for(running, 10)
    assert lease.released is False  # a lost lease is not given back: it is someone else's now


async def test_a_graceful_stop_gives_the_lease_up(tmp_path):
    lease = ScriptedLease()
    lease.grant()
    async with coordinator_with(lease, tmp_path) as (coordinator, _channel):
        await asyncio.wait_for(coordinator.leading.wait(), 10)
    assert lease.released is True


def test_a_standby_asks_again_right_after_the_leaders_lease_ends_not_a_whole_poll_later():
    from coordinator.store.postgres_lease import TAKE_OVER_MARGIN_SECONDS, standby_wait

    assert standby_wait(1.0, 2.5) == 1.0, "a live leader's lease: the poll interval"
    assert standby_wait(1.0, 0.3) == pytest.approx(0.3 + TAKE_OVER_MARGIN_SECONDS), "ends sooner: asked just after"
    assert standby_wait(1.0, -4.0) == TAKE_OVER_MARGIN_SECONDS, "already over (a race): asked at once, never negative"


class CancelSwallowingLease(ScriptedLease):
    """A store read that returns normally although it was cancelled: what asyncio.wait_for does on Python 3.11 when
    the inner call completes as the cancellation arrives (PostgresLease reads who leads through wait_for), and what
    a connection close that suppresses CancelledError does."""

    async def leader(self) -> LeaderInfo:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        return LeaderInfo("", 0)


async def test_acquire_returns_even_when_the_leader_watch_swallows_its_cancellation():
    """CI caught a coordinator that logged `leading` and then waited for ever in acquire(): the watch of who leads had
    swallowed its cancellation and slept on in its loop."""
    lease = CancelSwallowingLease()
    leadership = Leadership(lease, lease_seconds=3.0, can_lapse=True, clock=FakeClock())
    acquiring = asyncio.create_task(leadership.acquire())
    await asyncio.sleep(0.05)  # the watch is inside its read of who leads
    lease.grant()
    done, _ = await asyncio.wait({acquiring}, timeout=5)
    assert acquiring in done, "acquire() waited for a watch that never ended"
    assert acquiring.result() == 7


async def test_a_lease_that_is_cancelled_while_closing_its_connection_ends_cancelled():
    """Closing a broken connection to PostgreSQL swallows the close's own errors, but not the cancellation of the
    task doing it (a graceful stop cancels the lease's hold while a renewal failed): swallowed, the hold would go on
    renewing and the stop would wait for ever (asyncio.wait_for on Python 3.11 lets such a swallow through)."""
    from coordinator.store.postgres_lease import PostgresLease

    class SlowToClose:
        async def close(self) -> None:
            await asyncio.sleep(30)

    lease = PostgresLease("postgresql://gpuorch@127.0.0.1:1/none", "127.0.0.1:50051", lease_seconds=3.0)
    lease._connection = SlowToClose()  # type: ignore[assignment]
    dropping = asyncio.create_task(lease._drop_connection())
    await asyncio.sleep(0.05)
    dropping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(dropping, 5)
