"""Wires the coordinator together: gRPC server, services, background loops, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from coordinator.agent_service import AgentService
from coordinator.auth import Guard, StreamQuota, node_identity_problem
from coordinator.cluster import ClusterView
from coordinator.cluster_service import ClusterService
from coordinator.job_manager import JobManager
from coordinator.job_service import JobService
from coordinator.scheduler import SchedulerConfig
from coordinator.store import SqliteJobStore
from coordinator.strict import add_strict_service
from coordinator.liveness import Liveness, LivenessPolicy
from coordinator.metrics import CoordinatorMetrics
from coordinator.recovery import RecoveryPolicy
from coordinator.reflection import CommentedPool
from coordinator.settings import CoordinatorSettings
from gpuorch import tls
from gpuorch.v1 import agent_pb2, cluster_pb2, job_pb2

log = structlog.get_logger("coordinator")

LIVENESS_TICK_SECONDS = 0.05
"""How often node deadlines are checked: bounds how late a DOWN is declared."""
SETTLE_SECONDS = 5.0
"""Quiet time after the last registration before long-lived objects are frozen out of the collector."""
UNFREEZE_SECONDS = 3600.0
"""How often frozen objects are handed back to the collector, so cyclic garbage among them is freed."""


AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"]
JOB_SERVICE = job_pb2.DESCRIPTOR.services_by_name["JobService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVICE_NAMES = (AGENT_SERVICE.full_name, CLUSTER_SERVICE.full_name, JOB_SERVICE.full_name)


class ServiceHealth(HealthServicer):
    """grpc.health.v1.Health with every method answered, every refusal saying why, and watches counted.

    The stock servicer answers a Check of an unknown service NOT_FOUND with an empty
    message, which leaves a probe with a typo in its service name guessing, and does not
    implement List at all (UNIMPLEMENTED). Statuses are the stock servicer's own
    `_server_status`, so graceful shutdown (which sets them directly) shows in both.
    Health needs no token, so its open-ended Watch streams count against their client's
    max_streams_per_client like any other stream: probes cannot be used to hold memory.
    """

    def __init__(self, streams: StreamQuota, client_key) -> None:
        super().__init__()
        self.streams = streams
        self.client_key = client_key

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in self._server_status:
            known = ", ".join(repr(name) for name in sorted(self._server_status))
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no health status for service {request.service[:200]!r}; known services: {known}"
            )
        return await super().Check(request, context)

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        async with self.streams.slot(context, self.client_key(context)):
            await super().Watch(request, context)


class CountedReflection(reflection.aio.ReflectionServicer):
    """Server reflection whose streams (open as long as the client likes, and tokenless) count like Health's watches."""

    def __init__(self, service_names, pool, streams: StreamQuota, client_key) -> None:
        super().__init__(service_names, pool=pool)
        self.streams = streams
        self.client_key = client_key

    async def ServerReflectionInfo(self, request_iterator, context):
        async with self.streams.slot(context, self.client_key(context)):
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response


class GarbageSettler:
    """Keeps full garbage collections from stalling the event loop (and with it heartbeat ingest).

    A fleet registering leaves tens of thousands of long-lived objects (node and device records,
    stream state); walking them costs a full collection tens of milliseconds at 16,000 GPUs. Once
    registrations have been quiet for a while, freeze what exists, so later collections walk only
    new objects. Hourly, unfreeze so cycles among frozen objects that died since (closed streams)
    are freed; the next quiet moment freezes again.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.last_registration = clock()
        self.frozen_at: float | None = None

    def registered(self) -> None:
        self.last_registration = self.clock()

    def tick(self) -> None:
        now = self.clock()
        if self.frozen_at is not None and now - self.frozen_at >= UNFREEZE_SECONDS:
            gc.unfreeze()
            self.frozen_at = None
        settled = now - self.last_registration >= SETTLE_SECONDS
        if settled and (self.frozen_at is None or self.last_registration > self.frozen_at):
            # No collect first: that would be the very pause this avoids. Garbage frozen along
            # with the live objects waits for the hourly unfreeze.
            gc.freeze()
            self.frozen_at = now


def next_epoch(state_dir: Path) -> int:
    """Reads, increments and durably writes the coordinator epoch."""
    path = state_dir / "epoch"
    try:
        epoch = int(path.read_text().strip()) + 1
    except FileNotFoundError:
        epoch = 1
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        handle.write(f"{epoch}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return epoch


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Agents ping to find a dead coordinator fast; let them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]



class Coordinator:
    """The control-plane daemon; `await start()`, then `await stop()`."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        settings.validate()
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.cluster = ClusterView(
            policy=LivenessPolicy(grace_period=settings.node_grace_period, missed_heartbeats=settings.missed_heartbeats),
            default_heartbeat_interval=settings.heartbeat_interval,
            history_length=settings.telemetry_history,
            device_recovery_seconds=settings.device_recovery_seconds,
        )
        self.cluster.listeners.append(self._log_transition)
        self.epoch = 0
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.guard = Guard(settings.tokens_file)  # a bad tokens file stops the start, naming the entry
        self.streams = StreamQuota(settings.max_streams_per_client)
        """Every client's open streams, of every service, against one max_streams_per_client."""
        self.health = ServiceHealth(self.streams, self.guard.client_key)
        self.garbage = GarbageSettler()
        self._tasks: list[asyncio.Task] = []
        self.metrics = CoordinatorMetrics(self) if settings.metrics_listen else None
        self.agent_port = 0

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.epoch = next_epoch(self.state_dir)
        except OSError as error:
            raise RuntimeError(f"cannot use state dir {self.state_dir}: {error.strerror or error}") from None
        settings = self.settings
        self.store = SqliteJobStore(self.state_dir / "jobs.db")
        self.jobs = JobManager(
            self.cluster,
            self.store,
            config=SchedulerConfig(
                policy=settings.scheduler_policy,
                memory_weight=settings.score_memory_weight,
                utilization_weight=settings.score_utilization_weight,
                temperature_threshold_celsius=settings.score_temperature_threshold,
                temperature_penalty_per_degree=settings.score_temperature_penalty,
            ),
            recovery_policy=RecoveryPolicy(backoff_base_seconds=settings.restart_backoff_base, backoff_max_seconds=settings.restart_backoff_max),
            stop_grace_seconds=settings.stop_grace_period,
            node_grace_period=settings.node_grace_period,
            checkpoint_root=settings.checkpoint_root or str(self.state_dir / "checkpoints"),
            max_pending_jobs_per_user=settings.max_pending_jobs_per_user,
        )
        await self.jobs.start()
        self.agents = AgentService(self.cluster, self.epoch)
        self.agents.identity_problem = functools.partial(
            node_identity_problem, mutual_tls=bool(settings.tls_client_ca), agent_listen=settings.agent_listen
        )
        self.agents.on_register.append(self.jobs.on_register)
        self.agents.on_task_status.append(self.jobs.on_task_status)
        self.agents.on_log_chunk.append(self.jobs.on_log_chunk)
        self.agents.on_progress.append(self.jobs.on_progress)
        self.agents.on_register.append(lambda node_id, register: self.garbage.registered())
        interceptors = self.metrics.interceptors() if self.metrics is not None else None
        self.server = grpc.aio.server(options=server_options(self.settings.max_message_bytes), interceptors=interceptors)
        # Every service, the stock health and reflection ones included, parses its own requests
        # (coordinator/strict.py), so malformed bytes get INVALID_ARGUMENT naming the type, never UNKNOWN.
        add_strict_service(self.server, AGENT_SERVICE, self.agents)
        add_strict_service(
            self.server,
            CLUSTER_SERVICE,
            ClusterService(
                self.cluster, self.epoch, self.guard, jobs_by_state=self.jobs.jobs_by_state, persist_drain=self.jobs.persist_drain
            ),
        )
        add_strict_service(self.server, JOB_SERVICE, JobService(self.jobs, self.guard, self.streams, settings.max_message_bytes))
        add_strict_service(self.server, HEALTH_SERVICE, self.health)
        add_strict_service(
            self.server,
            REFLECTION_SERVICE,
            CountedReflection(
                (*SERVICE_NAMES, HEALTH_SERVICE.full_name, REFLECTION_SERVICE.full_name),
                CommentedPool(),
                self.streams,
                self.guard.client_key,
            ),
        )
        self.port, self.agent_port = self._add_ports()
        if self.metrics is not None:
            self.metrics.serve(self.settings.metrics_listen)
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._supervise("liveness", self._liveness_loop)))
        self._tasks.append(asyncio.create_task(self._supervise("scheduler", self.jobs.run)))
        log.info(
            "coordinator serving",
            listen=self.settings.listen,
            port=self.port,
            agent_port=self.agent_port,
            epoch=self.epoch,
            state_dir=str(self.state_dir),
            tls=bool(self.settings.tls_cert),
            agent_mutual_tls=bool(self.settings.tls_client_ca),
            tokens=self.guard.enabled,
        )
        self._warn_about_exposure()

    def _add_ports(self) -> tuple[int, int]:
        """Binds `listen` (and `agent_listen`); returns both ports (the same one when agents share it)."""
        settings = self.settings
        agents_share_listen = not settings.agent_listen

        def bind(address: str, client_ca: str) -> int:
            try:
                if not settings.tls_cert:
                    return self.server.add_insecure_port(address)
                return self.server.add_secure_port(address, tls.server_credentials(settings.tls_cert, settings.tls_key, client_ca))
            except RuntimeError as error:
                raise RuntimeError(f"cannot listen on {address}: {error}") from None

        port = bind(settings.listen, settings.tls_client_ca if agents_share_listen else "")
        agent_port = port if agents_share_listen else bind(settings.agent_listen, settings.tls_client_ca)
        return port, agent_port

    def _warn_about_exposure(self) -> None:
        """Says in the log what the network can do to this coordinator, whenever that is more than it should."""
        settings = self.settings
        if not settings.tls_cert:
            if settings.insecure:
                log.warning("TLS is off and insecure is set: serving plaintext; tokens and job specs cross the network unencrypted", listen=settings.listen)
            else:
                log.warning("TLS is off: serving on loopback only; set tls_cert and tls_key to serve other machines", listen=settings.listen)
        if not self.guard.enabled:
            log.warning("tokens_file is not set: every client may act as any user, and as admin")
        if not settings.tls_client_ca:
            log.warning("tls_client_ca is not set: agents are not authenticated; whatever reaches the port can register as a node")

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health NOT_SERVING, streams closed, in-flight calls given `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for node in self.cluster.nodes.values():
            if node.session is not None:
                node.session.close("coordinator shutting down")
        if self.server is not None:
            await self.server.stop(grace)
        await self.store.close()
        if self.metrics is not None:
            self.metrics.close()
        log.info("coordinator stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    async def _supervise(self, name: str, loop) -> None:
        """Runs a background loop, logging and restarting it if it crashes (as Ray's agent does)."""
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background loop crashed; restarting", loop=name)
                await asyncio.sleep(1.0)

    async def _liveness_loop(self) -> None:
        while True:
            for transition in self.cluster.tick():
                if transition.session is not None:
                    transition.session.close(f"node declared down: {transition.reason}; re-register")
            self.garbage.tick()
            await asyncio.sleep(LIVENESS_TICK_SECONDS)

    def _log_transition(self, transition) -> None:
        level = log.warning if transition.after is not Liveness.READY else log.info
        level(
            "node state changed",
            node=transition.node_id,
            before=transition.before.value,
            after=transition.after.value,
            reason=transition.reason,
        )
