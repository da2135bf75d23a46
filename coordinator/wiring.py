"""Wires the coordinator together: builds the parts (one clock, one store, one cluster view), the gRPC
server and its services, starts the supervised background loops, and shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import resource
import stat
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from coordinator.api.agent_service import AgentService
from coordinator.api.auth import Guard, StreamQuota, node_identity_problem
from coordinator.api.cluster_service import ClusterService
from coordinator.api.health import ServiceHealth
from coordinator.api.interactive_service import add_interactive_services
from coordinator.api.job_service import JobService
from coordinator.api.local_socket import LocalSocketRelay
from coordinator.api.reflection import CommentedPool, CountedReflection
from coordinator.api.request_parsing import add_strict_service
from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.job_history import prune_history
from coordinator.control.job_manager import JobManager
from coordinator.control.liveness_loop import GarbageSettler, liveness_loop, log_transition
from coordinator.model.usage import UsageHistory
from coordinator.observe.prometheus import CoordinatorMetrics
from coordinator.observe.usage_sampler import SAMPLE_INTERVAL_SECONDS, run_usage_sampler
from coordinator.rules.liveness import LivenessPolicy
from coordinator.settings import CoordinatorSettings
from coordinator.store.lease import LeaseLost
from coordinator.store.open_url import open_store
from gpuorch import tls
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.v1 import agent_pb2, cluster_pb2, interactive_pb2, job_pb2

log = structlog.get_logger("coordinator")


AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"]
JOB_SERVICE = job_pb2.DESCRIPTOR.services_by_name["JobService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
INTERACTIVE_SERVICE = interactive_pb2.DESCRIPTOR.services_by_name["InteractiveService"]
SESSION_RELAY_SERVICE = interactive_pb2.DESCRIPTOR.services_by_name["SessionRelayService"]
SERVICE_NAMES = (
    AGENT_SERVICE.full_name, CLUSTER_SERVICE.full_name, JOB_SERVICE.full_name, INTERACTIVE_SERVICE.full_name,
    SESSION_RELAY_SERVICE.full_name,
)  # fmt: skip


STATE_DIR_MODE = 0o711
"""Nobody else may list or change the state dir; they may pass through it, to the local socket and the default
checkpoint_root (ranks run as their owners), and its files are 0600 (coordinator/store/sqlite.py)."""
FILE_DESCRIPTOR_HEADROOM = 256
"""File descriptors kept for what is not a connection: the job store, logs, the metrics port."""
DEFAULT_FILE_LIMIT = 65536
"""The open-file limit asked for when max_connections is 0 (the unit's LimitNOFILE=)."""
MIN_CONNECTIONS = 64


def server_options(max_message_bytes: int, handshake_timeout: float = 5.0, max_connections: int = 0) -> list[tuple[str, int]]:
    options = [
        # A connection that never finishes its handshake (TLS, or HTTP/2's preface) is closed after this,
        # not after grpc's default of 120 s: idle half-open connections would otherwise use up the fds.
        ("grpc.server_handshake_timeout_ms", int(handshake_timeout * 1000)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Agents ping to find a dead coordinator fast; let them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]
    if max_connections:
        # grpcio has no cap per peer; this caps all of a server's connections together, below the fd limit.
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    return options


def raise_file_limit(wanted: int) -> int:
    """Raises the soft fd limit towards `wanted` (at most the hard limit); returns the limit now in force.

    Outside systemd (LimitNOFILE=) the soft limit is often 1024: a few hundred agents and
    clients would exhaust it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, wanted=target, error=str(error))
    return soft


def make_state_dir(path: Path) -> None:
    """Creates the state dir with STATE_DIR_MODE; an existing one is left as the operator made it, with a warning if
    others may read or change it."""
    if not path.exists():
        path.mkdir(parents=True, mode=STATE_DIR_MODE)
        os.chmod(path, STATE_DIR_MODE)  # mkdir's mode passes through the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o066:
        log.warning("state dir is readable or writable by others; chmod it 0711 or 0700", state_dir=str(path), mode=oct(mode))


def runtime_estimates(settings: CoordinatorSettings) -> Estimates:
    """Runtime prediction and start-time estimates as the settings ask."""
    return Estimates(settings.runtime_predictor(), interval_seconds=settings.start_estimate_interval_seconds)


class Coordinator:
    """The control-plane daemon; `await start()`, then `await stop()`."""

    def __init__(self, settings: CoordinatorSettings, clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        """Rendezvous ports are drawn from this: a seeded one makes placements repeatable (the simulator)."""
        self.state_dir = Path(settings.state_dir)
        self.cluster = ClusterView(
            policy=LivenessPolicy(grace_period=settings.node_grace_period, missed_heartbeats=settings.missed_heartbeats),
            default_heartbeat_interval=settings.heartbeat_interval,
            history_length=settings.telemetry_history,
            device_recovery_seconds=settings.device_recovery_seconds,
            clock=clock,
        )
        self.cluster.listeners.append(log_transition)
        self.epoch = 0
        self.port = 0
        self.server: grpc.aio.Server | None = None
        # A bad tokens file stops the start, naming the entry.
        self.guard = Guard(settings.tokens_file, clock=clock.monotonic, tokenless_tcp_clients=settings.tokenless_tcp_clients)
        self.streams = StreamQuota(settings.max_streams_per_client, settings.max_streams)
        """Every client's open streams, of every service, against one max_streams_per_client and all against max_streams."""
        self.local_socket: LocalSocketRelay | None = self._local_socket_relay()
        self.health = ServiceHealth(self.streams, self.guard.client_key)
        self.garbage = GarbageSettler(self.clock)
        self._tasks: list[asyncio.Task] = []
        self.metrics = CoordinatorMetrics(self) if settings.metrics_listen else None
        self.agent_port = 0
        self.usage = UsageHistory(SAMPLE_INTERVAL_SECONDS, clock.wall())
        """GPUs, allocation, utilisation and GPU-seconds by owner and pool over time (in memory, lost on restart)."""

    async def start(self) -> None:
        try:
            make_state_dir(self.state_dir)
        except OSError as error:
            raise RuntimeError(f"cannot use state dir {self.state_dir}: {error.strerror or error}") from None
        settings = self.settings
        self.store, self.lease = open_store(
            settings.store_url,
            self.state_dir,
            lease_seconds=settings.leader_lease_seconds,
            advertised_address=settings.listen,
            clock=self.clock,
        )
        await self.lease.acquire()
        self.jobs = JobManager(
            self.cluster,
            self.store,
            config=settings.scheduler_config(),
            recovery_policy=settings.recovery_policy(),
            stop_grace_seconds=settings.stop_grace_period,
            preemption_grace_seconds=settings.preemption_grace_seconds,
            node_grace_period=settings.node_grace_period,
            checkpoint_root=settings.checkpoint_root or str(self.state_dir / "checkpoints"),
            max_pending_jobs_per_user=settings.max_pending_jobs_per_user,
            quotas=settings.quota_policy(),
            estimates=runtime_estimates(settings),
            clock=self.clock,
            rng=self.rng,
            recent_ended_jobs=settings.recent_ended_jobs,
        )
        self.jobs.arrays.dependencies.capacities = settings.device_capacities()  # GPUORCH_DEVICE_CAPACITY of ranks
        try:
            await self.jobs.start()
        except OSError as error:
            raise RuntimeError(f"cannot use state dir {self.state_dir}: {error.strerror or error}") from None
        self.epoch = self.jobs.epoch
        self.agents = AgentService(self.cluster, self.epoch)
        self.agents.identity_problem = functools.partial(
            node_identity_problem,
            mutual_tls=bool(settings.tls_client_ca),
            agent_listen=settings.agent_listen,
            allowed_nodes=settings.allowed_nodes,
        )
        self.agents.owners_authenticated = self.guard.owners_authenticated
        self.agents.on_register.append(self.jobs.on_register)
        self.agents.on_task_status.append(self.jobs.on_task_status)
        self.agents.on_log_chunk.append(self.jobs.on_log_chunk)
        self.agents.on_progress.append(self.jobs.on_progress)
        self.agents.on_register.append(lambda node_id, register: self.garbage.registered())
        interceptors = self.metrics.interceptors() if self.metrics is not None else None
        max_connections = self._connection_cap()
        self.server = grpc.aio.server(
            options=server_options(settings.max_message_bytes, settings.handshake_timeout, max_connections),
            interceptors=interceptors,
        )
        # Every service, the stock health and reflection ones included, parses its own requests
        # (coordinator/api/request_parsing.py), so malformed bytes get INVALID_ARGUMENT naming the type, never UNKNOWN.
        add_strict_service(self.server, AGENT_SERVICE, self.agents)
        cluster_service = ClusterService(
            self.cluster, self.epoch, self.guard, jobs_by_state=self.jobs.jobs_by_state, persist_drain=self.jobs.persist_drain
        )
        cluster_service.usage = self.usage
        add_strict_service(self.server, CLUSTER_SERVICE, cluster_service)
        job_service = JobService(
            self.jobs, self.guard, self.streams, settings.max_message_bytes, max_user_priority=settings.max_user_priority
        )
        add_strict_service(self.server, JOB_SERVICE, job_service)
        self.sessions, attach_grace = add_interactive_services(self.server, self.jobs, self.guard, self.streams, self.agents,
                                                               self.clock, settings.interactive_attach_grace_seconds)  # fmt: skip
        self._tasks.append(asyncio.create_task(self._supervise("attach grace", attach_grace)))
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
        if self.local_socket is not None:
            self.local_socket.prepare()
            self.server.add_insecure_port(self.local_socket.grpc_address)
        if self.metrics is not None:
            self.metrics.serve(self.settings.metrics_listen)
        await self.server.start()
        if self.local_socket is not None:
            await self.local_socket.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._supervise("liveness", lambda: liveness_loop(self.cluster, self.garbage))))
        self._tasks.append(asyncio.create_task(self._supervise("scheduler", self.jobs.run)))
        self._tasks.append(asyncio.create_task(self._hold_lease()))
        if settings.history_retention_days:
            retention = settings.history_retention_days * 86400
            self._tasks.append(
                asyncio.create_task(self._supervise("history retention", lambda: prune_history(self.jobs, self.clock, retention)))
            )
        usage = functools.partial(run_usage_sampler, self.usage, self.cluster, self.jobs, self.clock, SAMPLE_INTERVAL_SECONDS)
        self._tasks.append(asyncio.create_task(self._supervise("usage", usage)))
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
            local_socket=self.local_socket.public_path if self.local_socket is not None else "",
            owners_authenticated=self.guard.owners_authenticated,
        )
        self._warn_about_exposure()

    async def _hold_lease(self) -> None:
        """Keeps the leader lease; once it is lost the store refuses this coordinator's writes (they are fenced)."""
        try:
            await self.lease.hold()
        except LeaseLost as lost:
            log.error("this coordinator no longer leads: its writes are refused", error=str(lost))

    def _connection_cap(self) -> int:
        """max_connections, or (0) what the open-file limit allows once raised: connections must not take the fds
        the job store and the log need."""
        wanted = self.settings.max_connections
        file_limit = raise_file_limit((wanted or DEFAULT_FILE_LIMIT) + FILE_DESCRIPTOR_HEADROOM)
        allowed = max(file_limit - FILE_DESCRIPTOR_HEADROOM, MIN_CONNECTIONS)
        if wanted > allowed:
            log.warning("max_connections is above what the open-file limit allows; raise LimitNOFILE (ulimit -n)",
                        max_connections=wanted, open_file_limit=file_limit)  # fmt: skip
        return wanted or allowed

    def _local_socket_relay(self) -> LocalSocketRelay | None:
        settings = self.settings
        path = settings.local_socket_path
        if not path:
            return None
        try:
            return LocalSocketRelay(
                path, self.state_dir / "relay", self.guard.local_peers, settings.local_admins, settings.local_socket_group
            )
        except ValueError as error:
            if settings.local_socket != CoordinatorSettings.local_socket:
                raise
            log.warning("no local socket: the default path is too long; set local_socket", error=str(error))
            return None

    def _add_ports(self) -> tuple[int, int]:
        """Binds `listen` (and `agent_listen`); returns both ports (the same one when agents share it)."""
        settings = self.settings
        agents_share_listen = not settings.agent_listen
        server = self.server
        if server is None:
            raise RuntimeError("the gRPC server is not built yet")

        def bind(address: str, client_ca: str) -> int:
            try:
                if not settings.tls_cert:
                    return server.add_insecure_port(address)
                return server.add_secure_port(address, tls.server_credentials(settings.tls_cert, settings.tls_key, client_ca))
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
                log.warning(
                    "TLS is off and insecure is set: serving plaintext; tokens and job specs cross the network unencrypted",
                    listen=settings.listen,
                )
            else:
                log.warning(
                    "TLS is off: serving on loopback only; set tls_cert and tls_key to serve other machines",
                    listen=settings.listen,
                )
        if not self.guard.enabled and settings.tokenless_tcp_clients:
            log.warning(
                "tokens_file is not set: every TCP client may act as any user, and as admin; agents are told owners are not "
                "authenticated (set tokenless_tcp_clients = false to serve clients on the local socket only)"
            )
        if not settings.tls_client_ca:
            log.warning(
                "tls_client_ca is not set: agents are not authenticated; whatever reaches the port can register as a node"
            )

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
        if self.local_socket is not None:
            await self.local_socket.close()
        if self.server is not None:
            await self.server.stop(grace)
        await self.store.close()
        await self.lease.release()
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
