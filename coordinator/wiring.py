"""Wires the coordinator together: builds the parts (one clock, one store, one cluster view), the gRPC
server and its services, starts the supervised background loops, and shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import stat
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from coordinator.api.agent_service import AgentService
from coordinator.api.auth import Guard, StreamQuota, node_identity_problem
from coordinator.api.cluster_service import ClusterService
from coordinator.api.health import ServiceHealth
from coordinator.api.interactive_service import add_interactive_services
from coordinator.api.job_service import JobService
from coordinator.api.local_socket import LocalSocketRelay, local_socket_relay
from coordinator.api.reflection import CommentedPool, CountedReflection
from coordinator.api.request_parsing import add_strict_service
from coordinator.api.server_options import connection_cap, server_options, warn_about_exposure
from coordinator.api.standby import Refusal, StandbyInterceptor, advertised_addresses, current_refusal
from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.job_history import prune_history
from coordinator.control.job_manager import JobManager
from coordinator.control.job_telemetry import JobTelemetry
from coordinator.control.leadership import Leadership, Role
from coordinator.control.liveness_loop import GarbageSettler, liveness_loop, log_transition
from coordinator.model.usage import UsageHistory
from coordinator.observe.prometheus import CoordinatorMetrics
from coordinator.observe.usage_sampler import SAMPLE_INTERVAL_SECONDS, run_usage_sampler
from coordinator.rules.liveness import LivenessPolicy
from coordinator.settings import CoordinatorSettings
from coordinator.store.api import JobStore
from coordinator.store.lease import LeaderInfo, Lease, LocalLease
from coordinator.store.open_url import open_store
from gpuorch import tls
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, cluster_pb2, interactive_pb2, job_pb2

log = get_logger("coordinator")


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
CANCEL_RETRY_SECONDS = 0.1
STORE_CLOSE_SECONDS = 10.0
"""A store that cannot finish its writes in this long (the database out of reach) is left behind at exit."""


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


def listen_port(address: str) -> int:
    """The port of a host:port setting; 0 when it is empty or not a number (validate() names those)."""
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


async def cancel_until_done(tasks: list[asyncio.Task]) -> None:
    """Cancels every task but the caller's and waits for each to end. A cancellation that lands as the awaited
    thing completes can be lost (asyncio.wait_for before Python 3.12), so it is repeated until the task ends."""
    current = asyncio.current_task()
    for task in tasks:
        while task is not current and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_RETRY_SECONDS)


def runtime_estimates(settings: CoordinatorSettings) -> Estimates:
    """Runtime prediction and start-time estimates as the settings ask."""
    return Estimates(settings.runtime_predictor(), interval_seconds=settings.start_estimate_interval_seconds)


class Coordinator:
    """The control-plane daemon; `await start()`, then `await stop()`."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        lease: Lease | None = None,
    ) -> None:
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
        self.local_socket: LocalSocketRelay | None = local_socket_relay(settings, self.state_dir, self.guard)
        self.health = ServiceHealth(self.streams, self.guard.client_key)
        self.garbage = GarbageSettler(self.clock)
        self._tasks: list[asyncio.Task] = []
        self.metrics = CoordinatorMetrics(self) if settings.metrics_listen else None
        self.agent_port = 0
        self.store, self.lease = self._store_and_lease(lease)
        self.leadership = Leadership(
            self.lease, lease_seconds=settings.leader_lease_seconds, can_lapse=not isinstance(self.lease, LocalLease), clock=clock
        )
        self.advertised = ("", "")
        """This coordinator's (client, agent) addresses as other coordinators' standbys name them."""
        self.leading = asyncio.Event()
        """Set once it leads: the store is open with its epoch and every service answers."""
        self.stepped_down = asyncio.Event()
        """Set once it lost the lease and stopped acting: the daemon exits (EXIT_STEPPED_DOWN) and is restarted."""
        self.usage = UsageHistory(SAMPLE_INTERVAL_SECONDS, clock.wall())
        """GPUs, allocation, utilisation and GPU-seconds by owner and pool over time (in memory, lost on restart)."""

    async def start(self) -> None:
        """Serves at once as a standby; leads once the lease is held. A lease that cannot be lost (one coordinator per
        state dir) is held at once: start() returns leading. A shared one is waited for in the background."""
        try:
            make_state_dir(self.state_dir)
        except OSError as error:
            raise RuntimeError(f"cannot use state dir {self.state_dir}: {error.strerror or error}") from None
        await self._serve_standing_by()
        if self.leadership.can_lapse:
            self._tasks.append(asyncio.create_task(self._lead_when_elected()))
        else:
            await self._lead()

    def _store_and_lease(self, lease: Lease | None) -> tuple[JobStore, Lease]:
        """The store of the settings and its lease; `lease`, if given, replaces the store's own (tests)."""
        settings = self.settings
        client, agents = settings.advertised_addresses(listen_port(settings.listen), listen_port(settings.agent_listen))
        store, own_lease = open_store(
            settings.store_url,
            self.state_dir,
            lease_seconds=settings.leader_lease_seconds,
            advertised_address=advertised_addresses(client, agents),
            clock=self.clock,
        )
        return store, lease or own_lease

    async def _serve_standing_by(self) -> None:
        """Builds every part and binds the ports; every call but health and reflection is refused until `_lead`."""
        settings = self.settings
        self.jobs = JobManager(
            self.cluster,
            self.store,
            config=settings.scheduler_config(),
            recovery_policy=settings.recovery_policy(),
            stop_grace_seconds=settings.stop_grace_period,
            preemption_grace_seconds=settings.preemption_grace_seconds,
            launch_timeout_seconds=settings.launch_timeout_seconds,
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
        self.agents = AgentService(self.cluster, self.epoch)
        self.agents.leadership = self.leadership
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
        self.job_telemetry = JobTelemetry(self.jobs, self.cluster, settings.telemetry_config(), settings.straggler_window_seconds)
        self.agents.on_progress.append(self.job_telemetry.on_progress)
        self.jobs.take_in_progress = self.job_telemetry.take_in
        self.agents.on_register.append(lambda node_id, register: self.garbage.registered())
        interceptors = [*(self.metrics.interceptors() if self.metrics is not None else ()), StandbyInterceptor(self._refusal)]
        self.server = grpc.aio.server(
            options=server_options(
                settings.max_message_bytes, settings.handshake_timeout, connection_cap(settings.max_connections)
            ),
            interceptors=interceptors,
        )
        # Every service, the stock health and reflection ones included, parses its own requests
        # (coordinator/api/request_parsing.py), so malformed bytes get INVALID_ARGUMENT naming the type, never UNKNOWN.
        add_strict_service(self.server, AGENT_SERVICE, self.agents)
        self.cluster_service = ClusterService(
            self.cluster, self.epoch, self.guard, jobs_by_state=self.jobs.jobs_by_state, persist_drain=self.jobs.persist_drain
        )
        self.cluster_service.usage = self.usage
        add_strict_service(self.server, CLUSTER_SERVICE, self.cluster_service)
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
        self.advertised = settings.advertised_addresses(self.port, self.agent_port)
        for name in ("", *SERVICE_NAMES):  # the stock servicer starts with "" SERVING
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.local_socket is not None:
            self.local_socket.prepare()
            self.server.add_insecure_port(self.local_socket.grpc_address)
        if self.metrics is not None:
            self.metrics.serve(self.settings.metrics_listen)
        await self.server.start()
        if self.local_socket is not None:
            await self.local_socket.start()
        log.info("coordinator standing by", port=self.port, agent_port=self.agent_port, advertised=self.advertised)

    def _refusal(self) -> Refusal | None:
        return current_refusal(self.leadership, self.advertised[0])

    async def _lead_when_elected(self) -> None:
        try:
            await self._lead()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the store would not open: the next run (a restart) tries again, as a standby
            log.exception("cannot lead")
            self.leadership.step_down(f"could not start leading: {type(error).__name__}: {error}")

    async def _lead(self) -> None:
        """Holds the lease, opens the store with its epoch and restores from it exactly as after a restart, then serves."""
        await self.leadership.acquire()
        self._tasks.append(asyncio.create_task(self.leadership.hold()))
        self._tasks.append(asyncio.create_task(self._step_down_when_lost()))
        try:
            await self.jobs.start()
        except OSError as error:
            raise RuntimeError(f"cannot use state dir {self.state_dir}: {error.strerror or error}") from None
        # The coordinator epoch: SQLite's epoch file, or a shared store's lease's (PostgreSQL's open() returns it), which
        # rises with every new leader.
        epoch = self.jobs.epoch if isinstance(self.lease, LocalLease) else self.lease.epoch
        self.epoch = self.agents.epoch = self.cluster_service.epoch = epoch
        self.leadership.leader = LeaderInfo(self.advertised[0], self.epoch)
        self.leadership.lead()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._supervise("liveness", lambda: liveness_loop(self.cluster, self.garbage))))
        self._tasks.append(asyncio.create_task(self._supervise("scheduler", self.jobs.run)))
        self._tasks.append(asyncio.create_task(self._supervise("job telemetry", self.job_telemetry.run)))
        if self.settings.history_retention_days:
            retention = self.settings.history_retention_days * 86400
            self._tasks.append(
                asyncio.create_task(self._supervise("history retention", lambda: prune_history(self.jobs, self.clock, retention)))
            )
        usage = functools.partial(run_usage_sampler, self.usage, self.cluster, self.jobs, self.clock, SAMPLE_INTERVAL_SECONDS)
        self._tasks.append(asyncio.create_task(self._supervise("usage", usage)))
        self.leading.set()
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
        warn_about_exposure(self.settings, self.guard.enabled)

    async def _step_down_when_lost(self) -> None:
        """Once the lease is lost: nothing more is scheduled or told to agents, and `stepped_down` wakes the daemon."""
        await self.leadership.stepped_down.wait()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await cancel_until_done(self._tasks)
        for node in self.cluster.nodes.values():
            if node.session is not None:
                node.session.close(f"this coordinator no longer leads ({self.leadership.reason}); reconnect")
        self.stepped_down.set()

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

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health NOT_SERVING, streams closed, in-flight calls given `grace` seconds, the store flushed,
        then the lease given up so that a standby takes over at once."""
        await self.health.enter_graceful_shutdown()
        await cancel_until_done(self._tasks)
        for node in self.cluster.nodes.values():
            if node.session is not None:
                node.session.close("coordinator shutting down")
        if self.local_socket is not None:
            await self.local_socket.close()
        if self.server is not None:
            await self.server.stop(grace)
        try:  # after a step-down the writes are fenced, and the database may be out of reach
            await asyncio.wait_for(self.store.close(), STORE_CLOSE_SECONDS)
        except Exception as error:  # noqa: BLE001 - nothing is left to save it for: the daemon exits
            log.warning("job store did not close cleanly", error=f"{type(error).__name__}: {error}")
        if self.leadership.role is Role.LEADING:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.lease.release(), STORE_CLOSE_SECONDS)
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
