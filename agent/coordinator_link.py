"""The agent's link to the coordinator: register, heartbeat, hand instructions on, reconnect.

One stream at a time. Everything the agent sends goes through one writer task
(gRPC allows one write in flight per call). When the stream breaks, the agent
reconnects with capped exponential backoff and jitter, reset after every
successful registration, and registers again with what it still runs. Given
several coordinators (`--coordinator a:50051,b:50051`), it follows the leader
(gpuorch.leader): a standby's answer names the leader, which it tries at once;
a lost or refused one sends it to the next address, the backoff coming between
full rounds. Whatever
ends a stream (an RPC error, a closed connection, a write on a call the
coordinator already ended, a bug) leads to a reconnect, never to an exit: the
agent is what supervises the node's ranks.

What the coordinator's instructions mean is the router's (agent/router.py): the link hands every
message after the RegisterAck to `on_message`, in the order they came, each with the number of
the session (stream) it came on; `is_current(session)` tells whether instructions of that
session may still be acted on.

A session goes stale when the agent has been silent longer than the coordinator's DOWN deadline
(`RegisterAck.down_after_seconds`): a process stopped with SIGSTOP, or starved of CPU, finds on
waking messages the coordinator sent before it declared the node DOWN and gave up their
attempts. Starting a rank from such a LaunchTask would run a second attempt of a job beside the
one placed elsewhere meanwhile, so the link acts on nothing more from that stream and
re-registers; the coordinator's reconciliation judges the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

import grpc

import gpuorch
from agent.telemetry import TelemetrySource
from gpuorch.addresses import parse_address_list
from gpuorch.backoff import Backoff
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.leader import Outcome, advance, begin, standby_leader
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, agent_pb2_grpc

log = get_logger("agent.coordinator_link")

OUTBOX_LIMIT = 1000
"""Messages queued for a stuck stream before heartbeats are dropped (statuses are kept for re-registration)."""

CHANNEL_OPTIONS = [
    # Find a dead or partitioned coordinator even while nothing is read.
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Our own backoff decides when to retry; keep gRPC's short so it does not add to it. (Not
    # grpc.min_reconnect_backoff_ms: it is also the minimum connect timeout, and a short one makes
    # a fleet of agents time out against a busy coordinator and thrash.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def local_address_towards(target: str) -> str:
    """The local IP the kernel would use to reach `target` (host:port); no packet is sent."""
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


STANDBY_RETRY_SECONDS = 0.5
"""The longest wait between rounds of the coordinator list while a standby answers: it takes over within its
lease (seconds), so the agent asks again soon rather than after a backoff grown while the leader was dying."""

MessageHandler = Callable[[agent_pb2.CoordinatorMessage, int], Awaitable[None] | None]
"""Receives (message, number of the session it came on)."""


DEFAULT_MISSED_HEARTBEATS = 3
"""Silence, in heartbeat intervals, after which a coordinator that does not say otherwise declares a node DOWN."""


class SilentPastDeadline(ConnectionError):
    """The agent was silent longer than the coordinator waits before declaring its node DOWN."""


def down_after(ack: agent_pb2.RegisterAck, interval: float) -> float:
    """The silence after which the coordinator declares this node DOWN (its word, else its default rule)."""
    return ack.down_after_seconds or DEFAULT_MISSED_HEARTBEATS * interval


def silent_past_deadline(last_write: float, now: float, deadline: float) -> bool:
    """Whether the time since the agent last wrote to the coordinator exceeds the coordinator's DOWN
    deadline, so that the coordinator may have given up what it sent on this stream (monotonic times)."""
    return now - last_write > deadline


def ignore_message(message: agent_pb2.CoordinatorMessage, session: int) -> None:
    log.warning("ignoring coordinator message: nothing handles it", kind=message.WhichOneof("payload"))


class CoordinatorLink:
    """One node's stream to the coordinator, kept up until the agent stops; see the module docstring."""

    def __init__(
        self,
        *,
        coordinator: str,
        node_id: str,
        source: TelemetrySource,
        heartbeat_interval: float = 0.0,
        advertise_address: str = "",
        pool: str = "",
        backoff: Backoff | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.coordinators = parse_address_list(coordinator)
        """Every coordinator this agent may register with, in the order given (gpuorch.leader follows the leader)."""
        self.coordinator = self.coordinators[0]
        """The one it is connected to, or trying now."""
        self.credentials = credentials
        """TLS (with this node's certificate, for mutual TLS); None = plaintext."""
        self.node_id = node_id
        self.source = source
        self.requested_interval = heartbeat_interval
        self.pool = pool
        """The node pool the agent registers in (empty: the default pool)."""
        self.addresses = [advertise_address or local_address_towards(self.coordinators[0])]
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.on_message: MessageHandler = ignore_message
        """Receives every coordinator message after the RegisterAck (see agent/router.py)."""
        self.task_snapshot: Callable[[], list[agent_pb2.TaskStatus]] = list
        """Returns every rank the agent supervises, for the registration."""
        self.progress_snapshot: Callable[[], list[agent_pb2.RankProgress]] = list
        """Returns when running ranks last reported progress, for heartbeats."""
        self.registered = asyncio.Event()
        self.owners_authenticated = False
        """What the last RegisterAck said: the coordinator vouches for every LaunchTask.owner."""
        self.connected = False
        self.reconnects = 0
        self.heartbeats_sent = 0
        self.session = 0
        """Number of the current stream, from 1; increases with every registration."""
        self._stale = False
        """The current session outlived the coordinator's DOWN deadline in silence (see the module docstring)."""
        self._last_write = 0.0
        self._down_after = 0.0
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] | None = None
        self.channel: grpc.aio.Channel | None = None
        """The channel of the current stream while registered: interactive sessions open their streams on it."""

    def is_current(self, session: int) -> bool:
        """Whether instructions received on `session` may still be acted on: it is the open stream,
        and the agent has not been silent past the coordinator's DOWN deadline since."""
        if not (self.connected and session == self.session and not self._stale):
            return False
        self._check_not_silent()
        return True

    def _check_not_silent(self) -> bool:
        """Marks the session stale once the agent has been silent past the DOWN deadline; True if fresh."""
        if not self._stale and silent_past_deadline(self._last_write, self.clock.monotonic(), self._down_after):
            self._stale = True
            log.warning(
                "silent past the coordinator's DOWN deadline; acting on nothing more from this stream",
                silent_seconds=round(self.clock.monotonic() - self._last_write, 3),
                deadline_seconds=self._down_after,
            )
        return not self._stale

    def send(self, message: agent_pb2.AgentMessage) -> bool:
        """Queues a message for the coordinator; False when disconnected (it will be re-sent
        through the next registration if it is a task status)."""
        if self._outbox is None:
            return False
        if self._outbox.qsize() >= OUTBOX_LIMIT and message.WhichOneof("payload") == "heartbeat":
            return False
        self._outbox.put_nowait(message)
        return True

    def report(self, status: agent_pb2.TaskStatus) -> None:
        """Sends a rank's status; while disconnected, the next registration carries it instead."""
        self.send(agent_pb2.AgentMessage(task_status=status))

    def registration(self) -> agent_pb2.AgentMessage:
        return agent_pb2.AgentMessage(
            register=agent_pb2.Register(
                node_id=self.node_id,
                hostname=socket.gethostname(),
                addresses=self.addresses,
                devices=self.source.devices(),
                heartbeat_interval_seconds=self.requested_interval,
                agent_version=gpuorch.__version__,
                pool=self.pool,
                tasks=self.task_snapshot(),
            )
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Keeps a registered stream to the leading coordinator until `stopping` is set."""
        following = begin(self.coordinators)
        standby_answered = False  # in this round of the list: a take-over is near, the wait stays short
        while not stopping.is_set():
            self.coordinator = following.current
            session = self.session
            outcome, named = Outcome.UNREACHABLE, ""
            try:
                await self._stream(stopping)
            except grpc.aio.AioRpcError as error:
                leader = standby_leader(error.trailing_metadata(), for_agents=True)
                if error.code() == grpc.StatusCode.UNAVAILABLE and leader is not None:
                    outcome, named = Outcome.STANDBY, leader
                    log.info("coordinator is a standby", coordinator=self.coordinator, leader=leader or None)
                else:
                    log.warning("coordinator stream ended", code=error.code().name, details=error.details())
            except (ConnectionError, OSError) as error:
                log.warning("coordinator connection failed", error=str(error))
            except asyncio.InvalidStateError as error:
                # grpc.aio raises this from call.write once the coordinator has ended the call, e.g. a
                # stream closed while this process was stopped (SIGSTOP) and found closed on SIGCONT.
                log.warning("coordinator stream ended while writing", error=str(error) or "RPC already finished")
            except Exception as error:  # whatever breaks one stream, the agent reconnects: its ranks need it
                log.exception("coordinator stream failed unexpectedly; reconnecting", error=f"{type(error).__name__}: {error}")
            finally:
                self.connected = False
                self._outbox = None
                self.channel = None
            if stopping.is_set():
                break
            if self.session != session:
                outcome = Outcome.LOST  # it had registered: the leader went away, or ended the stream
            following, step = advance(following, outcome, named)
            standby_answered = standby_answered or outcome is Outcome.STANDBY
            delay = 0.0
            if step.wait:
                delay = self.backoff.next_delay()
                if standby_answered:  # the control plane is up and a standby takes over within its lease
                    delay = min(delay, STANDBY_RETRY_SECONDS)
                standby_answered = False
            self.reconnects += 1
            log.info(
                "reconnecting",
                coordinator=step.address,
                delay=round(delay, 3),
                failures=self.backoff.failures,
                after=outcome.value,
            )
            if delay:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)

    async def _stream(self, stopping: asyncio.Event) -> None:
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(self.coordinator, self.credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(self.coordinator, options=CHANNEL_OPTIONS)
        async with channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            try:
                await call.write(self.registration())
            except asyncio.InvalidStateError:
                # It answered before the registration went out (a standby does): its status says who leads.
                raise grpc.aio.AioRpcError(
                    await call.code(), await call.initial_metadata(), await call.trailing_metadata(), await call.details()
                ) from None
            first = await call.read()
            if first is grpc.aio.EOF:
                raise ConnectionError("coordinator closed the stream before acknowledging the registration")
            if first.WhichOneof("payload") != "register_ack":
                raise ConnectionError(f"coordinator answered the registration with {first.WhichOneof('payload')}")
            ack = first.register_ack
            self.owners_authenticated = ack.owners_authenticated
            interval = ack.heartbeat_interval_seconds or self.requested_interval or 1.0
            self.backoff.reset()
            self.session += 1
            self._stale = False
            self._down_after = down_after(ack, interval)
            self._last_write = self.clock.monotonic()  # the registration was written just before the ack came
            self.connected = True
            self.channel = channel
            self.registered.set()
            log.info(
                "registered",
                coordinator=self.coordinator,
                node=self.node_id,
                epoch=ack.coordinator_epoch,
                heartbeat_interval=interval,
                drained=ack.drained,
            )
            self._outbox = asyncio.Queue()
            workers = [
                asyncio.create_task(self._write_loop(call)),
                asyncio.create_task(self._heartbeat_loop(interval)),
                asyncio.create_task(self._read_loop(call)),
                asyncio.create_task(stopping.wait()),
            ]
            try:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    failure = None if task.cancelled() else task.exception()
                    if failure is not None:
                        raise failure
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if stopping.is_set():
                    with contextlib.suppress(Exception):
                        await call.done_writing()

    async def _write_loop(self, call) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            message = await outbox.get()
            if not self._check_not_silent():
                raise SilentPastDeadline("silent past the coordinator's DOWN deadline; registering again")
            await call.write(message)
            self._last_write = self.clock.monotonic()

    async def _heartbeat_loop(self, interval: float) -> None:
        """Heartbeats on a fixed schedule (no drift), each with a fresh sample of every GPU."""
        sequence = 0
        next_beat = self.clock.monotonic()
        while True:
            samples = await asyncio.to_thread(self.source.sample) if self.source.blocking else self.source.sample()
            sequence += 1
            heartbeat = agent_pb2.Heartbeat(sequence=sequence, devices=samples, progress=self.progress_snapshot())
            heartbeat.sent_time.FromNanoseconds(int(self.clock.wall() * 1e9))
            if self.send(agent_pb2.AgentMessage(heartbeat=heartbeat)):
                self.heartbeats_sent += 1
            next_beat += interval
            delay = next_beat - self.clock.monotonic()
            if delay < 0:  # fell behind (a stopped process, a slow driver): start a new schedule
                next_beat = self.clock.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    async def _read_loop(self, call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise ConnectionError("coordinator ended the stream")
            if not self._check_not_silent():
                raise SilentPastDeadline("silent past the coordinator's DOWN deadline; registering again")
            try:
                result = self.on_message(message, self.session)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("error handling coordinator message", kind=message.WhichOneof("payload"))
