"""The coordinator's settings: TOML (--config), GPUORCH_* env vars and flags, in that order."""

from __future__ import annotations

import dataclasses
import grp
from dataclasses import dataclass
from typing import Any

from coordinator.rules.job_telemetry import TelemetryConfig, telemetry_config
from coordinator.rules.quotas import QuotaPolicy, parse_quotas
from coordinator.rules.recovery import RecoveryPolicy
from coordinator.scheduler import POLICIES, PreemptionRule, Quotas, SchedulerConfig
from coordinator.scheduler.prediction import RuntimePredictor
from coordinator.store.api import RECENT_ENDED_JOBS
from coordinator.store.open_url import parse_store_url
from gpuorch.metrics import parse_listen
from gpuorch.sharding import DEFAULT_DEVICE_CAPACITY
from gpuorch.tls import is_loopback_host

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
"""Hosts of a listen address that mean every interface: they name no machine to reach."""


def advertised_listen(listen: str, bound_port: int) -> str:
    """What a listen address tells others to reach: host and the bound port; '' when its host is a wildcard, or its
    port is not known yet (0: the kernel picks one at bind)."""
    host = listen.rsplit(":", 1)[0]
    return "" if host in WILDCARD_HOSTS or not bound_port else f"{host}:{bound_port}"


def address_problem(address: str) -> str | None:
    """Why an advertised host:port cannot be one (None when it is, or when it is empty: not set)."""
    if not address:
        return None
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT with a port from 1 to 65535"
    if host in WILDCARD_HOSTS:
        return "names no machine (a wildcard host): give the name or address other machines reach this one at"
    return None


@dataclass
class CoordinatorSettings:
    listen: str = "127.0.0.1:50051"
    """host:port of the gRPC API (agents, SDK, gpuctl, grpcurl)."""
    state_dir: str = "/var/lib/gpuorch/coordinator"
    """Where the job store and the epoch live (with store_url empty), and the local socket and relay."""
    store_url: str = ""
    """Where jobs, drains and the epoch are kept: empty = SQLite at <state_dir>/jobs.db; sqlite:PATH = SQLite at PATH;
    postgresql://USER@HOST/DATABASE?sslmode=verify-full = PostgreSQL, which several coordinators may share (one leads)."""
    leader_lease_seconds: float = 3.0
    """With PostgreSQL: a leader that has not renewed its lease for this long (dead, frozen, cut off) loses it, and a
    standby takes over. It renews every third of it."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats that the coordinator asks agents for."""
    node_grace_period: float = 10.0
    """Seconds a node whose stream closed may take to re-register before it is DOWN."""
    missed_heartbeats: int = 3
    """Heartbeat intervals of silence on an open stream after which a node is DOWN."""
    telemetry_history: int = 100
    """Samples of telemetry kept per GPU."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    scheduler_policy: str = "las"
    """Order of the queue: las (the default: priority, then least attained service, preemptive), priority (ties by
    submit time), fcfs, sjf (estimated runtime, aged), fair_share (owner's usage). las won on the Philly trace in
    gpuorch-sim (README, Simulator): within 1.02x of oracle SRTF's average JCT, priority 1.14x."""
    priority_classes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Named priority classes, TOML tables: [priority_classes.high] priority = 100, preempts = ["low", "normal"].
    A job's class is the highest whose priority its priority reaches; a class may preempt running preemptible jobs
    of the lower classes it names (which must be every class below some point). Empty = no preemption by priority."""
    score_memory_weight: float = 0.6
    """Device selection: weight of a GPU's free memory fraction."""
    score_utilization_weight: float = 0.4
    """Device selection: weight of a GPU's idleness (1 - utilisation)."""
    score_temperature_threshold: float = 80.0
    """Device selection: degrees C above which a GPU's score is penalised."""
    score_temperature_penalty: float = 0.02
    """Device selection: score penalty per degree above the threshold."""
    stop_grace_period: float = 10.0
    """Seconds between SIGTERM and SIGKILL when ranks are stopped."""
    preemption_grace_seconds: float = 30.0
    """Seconds between SIGTERM and SIGKILL when a job is preempted for higher-priority work: its time to checkpoint."""
    launch_timeout_seconds: float = 120.0
    """An attempt with a rank not started this long after its launch fails (launch_timeout, restartable); 0: never."""
    restart_backoff_base: float = 1.0
    """Seconds before a job's second restart (the first is immediate); doubles per restart."""
    restart_backoff_max: float = 60.0
    """Cap of the restart backoff in seconds."""
    device_recovery_seconds: float = 300.0
    """A GPU that was unhealthy gets work again only after being healthy this long (or gpuctl resume)."""
    checkpoint_root: str = ""
    """GPUORCH_CHECKPOINT_DIR of a job is <checkpoint_root>/<job id>: put it on storage every node
    mounts. Empty = <state_dir>/checkpoints (enough for a single machine)."""
    metrics_listen: str = ""
    """host:port to serve Prometheus /metrics on (e.g. 0.0.0.0:9400); empty = no metrics endpoint."""
    advertise_address: str = ""
    """host:port that clients reach this coordinator at, which the other coordinators sharing its store name when this
    one leads (in their UNAVAILABLE answers and the gpuorch-leader metadata). Empty = listen, unless its host is a
    wildcard (0.0.0.0, ::), which names no machine: then nobody is named, and callers try every address they know."""
    advertise_agent_address: str = ""
    """host:port that agents reach this coordinator at, when they use agent_listen. Empty = agent_listen, unless its
    host is a wildcard (then, as for advertise_address, it is not named)."""
    tls_cert: str = ""
    """PEM certificate (chain) of the gRPC port; with tls_key, turns TLS on."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA that signs agents' client certificates; turns on mutual TLS for agents, whose node id
    must then be a name in their certificate. Agents connect to agent_listen (if set), else to listen,
    which then asks every client for a certificate."""
    agent_listen: str = ""
    """host:port where agents connect with mutual TLS (needs tls_client_ca); people keep using listen
    with TLS and tokens. Empty = agents use listen."""
    tokens_file: str = ""
    """TOML file of [[tokens]] (user, role, sha256): clients must send a bearer token; empty = no tokens."""
    local_socket: str = "<state_dir>/gpuorch.sock"
    """Unix socket for clients on this machine (gpuctl --coordinator unix:PATH): the owner of what they submit is
    the user the kernel says they run as (SO_PEERCRED), with or without tokens. Empty = none."""
    local_socket_group: str = ""
    """Group of local_socket (mode 0660); empty = mode 0666, every local user may connect."""
    local_admins: list[str] = dataclasses.field(default_factory=lambda: ["root"])
    """Users who are admins when they connect through local_socket."""
    tokenless_tcp_clients: bool = True
    """With tokens_file empty: serve clients over TCP anyway, each of whom may act as any user and as admin (true),
    or refuse them so that only local_socket serves clients and every job's owner is authenticated (false).
    Agents and health checks connect over TCP either way."""
    allowed_nodes: list[str] = dataclasses.field(default_factory=list)
    """Node ids that may register; empty = any node (with mutual TLS: any with a node certificate of tls_client_ca)."""
    insecure: bool = False
    """Serve an address other than loopback without all of TLS, tokens and agent certificates. Without it,
    a coordinator that lacks any of the three listens on loopback only."""
    max_pending_jobs_per_user: int = 1000
    """Pending jobs one owner may have queued; a submission beyond it gets RESOURCE_EXHAUSTED. 0 = no limit."""
    quotas: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[quotas.users.NAME] and [quotas.groups.NAME] tables of max_gpus (running) and max_pending_jobs; NAME "*" is
    everyone not named. A user's max_pending_jobs overrides max_pending_jobs_per_user. See coordinator/rules/quotas.py."""
    groups: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[groups] table: group = ["user", ...]; a user is in at most one group (for group quotas)."""
    runtime_prediction_quantile: float = 0.8
    """A job with no estimate and no time limit is predicted to run this quantile of the recent runtimes of similar
    finished jobs (same owner, name and GPUs; else owner and GPUs; pool and GPUs; pool; cluster). Higher: fewer
    under-estimates, less backfill."""
    runtime_prediction_min_samples: int = 3
    """Finished jobs a tier of the prediction needs before it answers."""
    runtime_prediction_default: float = 0.0
    """Seconds predicted when no tier has enough samples; 0 = unknown."""
    start_estimate_interval_seconds: float = 5.0
    """Every pending job's estimated start time is recomputed at most this often (the scheduler run forward on
    estimated runtimes); 0 = no estimates."""
    max_streams_per_client: int = 64
    """Open server streams (watches, log reads, health watches, reflection) per client (user, or peer host
    without tokens). 0 = no limit."""
    max_streams: int = 1000
    """Open server streams of all clients together. 0 = no limit."""
    interactive_attach_grace_seconds: float = 60.0
    """An interactive job (gpuctl run) with no client attached for longer than this is cancelled; a job's own
    attach_grace_seconds overrides it. Reconnect within it with `gpuctl attach`."""
    max_user_priority: int = 100
    """Highest priority a user (not an admin) may give a job, at submit or later."""
    handshake_timeout: float = 5.0
    """Seconds a new connection has to finish its TLS (and HTTP/2) handshake before it is closed."""
    max_connections: int = 0
    """Open connections the gRPC ports accept in all (grpcio has no cap per peer). 0 = the open-file limit
    (raised to its hard limit, up to 65536) less 256 kept for the job store, logs and metrics."""
    history_retention_days: float = 90.0
    """Ended jobs are kept in the job history (gpuctl history, ListJobs) this many days after they end, then
    deleted (checked hourly and at start). 0 = keep them forever."""
    recent_ended_jobs: int = RECENT_ENDED_JOBS
    """Ended jobs kept in memory (the most recent; at most what the store's open returns): older ones are read
    from the store's history indexes when asked for."""
    device_capacity: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[device_capacity] table: GPU model = relative throughput (H100 = 1.0), matched as a substring of the GPU's name,
    the longest match winning; extends or overrides gpuorch.sharding's table. Ranks get it as GPUORCH_DEVICE_CAPACITY
    (and every rank's as GPUORCH_DEVICE_CAPACITIES) for gpuorch.worker.shard(by="capacity")."""
    straggler_ratio: float = 1.3
    """A rank whose step time stays above this x its job's median for straggler_windows windows is a straggler."""
    straggler_windows: int = 5
    straggler_window_seconds: float = 10.0
    """How often running jobs' step telemetry is judged (stragglers, idleness) and their figures refreshed."""
    idle_utilization_percent: float = 5.0
    idle_minutes: float = 30.0
    """A running job whose every GPU stays under idle_utilization_percent this long is flagged idle."""
    idle_timeout_minutes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[idle_timeout_minutes] pool = minutes idle after which its jobs are cancelled (a job's --idle-timeout wins)."""
    log_level: str = "info"
    log_format: str = "auto"
    """json, console, or auto (console on a terminal)."""

    def quota_policy(self) -> QuotaPolicy:
        """The quotas and groups settings, parsed; raises ValueError naming what is wrong."""
        return parse_quotas(self.quotas, self.groups)

    @property
    def local_socket_path(self) -> str:
        """local_socket with <state_dir> filled in; empty = no local socket."""
        return self.local_socket.replace("<state_dir>", self.state_dir.rstrip("/") or "/")

    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler's settings (the policy, GPU scores, running-GPU quotas, preemption rules): what the
        coordinator runs, and what the simulator runs without --policy."""
        max_gpus_per_owner, max_gpus_per_group = self.quota_policy().max_gpus()
        return SchedulerConfig(
            policy=self.scheduler_policy,
            memory_weight=self.score_memory_weight,
            utilization_weight=self.score_utilization_weight,
            temperature_threshold_celsius=self.score_temperature_threshold,
            temperature_penalty_per_degree=self.score_temperature_penalty,
            quotas=Quotas(max_gpus_per_owner=max_gpus_per_owner, max_gpus_per_group=max_gpus_per_group),
            preemption=self.preemption_rules(),
        )

    def runtime_predictor(self) -> RuntimePredictor:
        """Runtime prediction as the settings ask (the coordinator's and the simulator's)."""
        return RuntimePredictor(
            quantile=self.runtime_prediction_quantile,
            min_samples=self.runtime_prediction_min_samples,
            default_seconds=self.runtime_prediction_default,
        )

    def device_capacities(self) -> dict[str, float]:
        """gpuorch.sharding's table with the device_capacity setting over it; raises ValueError naming a bad entry."""
        if not isinstance(self.device_capacity, dict):
            raise ValueError("device_capacity must be a TOML table of GPU model = relative throughput, e.g. A100 = 0.5")
        for model, value in self.device_capacity.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"device_capacity.{model} must be a number > 0 (H100 = 1.0), got {value!r}")
        return {**DEFAULT_DEVICE_CAPACITY, **{model: float(value) for model, value in self.device_capacity.items()}}

    def telemetry_config(self) -> TelemetryConfig:
        """The straggler and idle settings, checked; raises ValueError naming the one out of range."""
        return telemetry_config(self.straggler_ratio, self.straggler_windows, self.straggler_window_seconds,
                                self.idle_utilization_percent, self.idle_minutes, self.idle_timeout_minutes)  # fmt: skip

    def recovery_policy(self) -> RecoveryPolicy:
        return RecoveryPolicy(backoff_base_seconds=self.restart_backoff_base, backoff_max_seconds=self.restart_backoff_max)

    def missing_protections(self) -> list[str]:
        """What a port open to other machines needs and these settings lack, each saying what it exposes.

        Any one of them lets whoever reaches the port act as someone else: without TLS, read
        tokens off the wire; without tokens, submit jobs as any user (ranks run as that user);
        without agent certificates, register as a node and receive its jobs.
        """
        missing = []
        if not self.tls_cert:
            missing.append("TLS is off (tls_cert, tls_key)")
        if not self.tokens_file:
            missing.append("clients are not authenticated (tokens_file)")
        if not self.tls_client_ca:
            missing.append("agents are not authenticated (tls_client_ca)")
        return missing

    def advertised_addresses(self, port: int, agent_port: int) -> tuple[str, str]:
        """(client, agent) addresses other coordinators name for this one, given the ports bound (for a listen port
        of 0); the agent address is '' when agents use listen. '' where nothing names this machine."""
        client = self.advertise_address or advertised_listen(self.listen, port)
        if not self.agent_listen:
            return client, ""
        return client, self.advertise_agent_address or advertised_listen(self.agent_listen, agent_port)

    def validate(self) -> None:
        """Raises ValueError naming the first setting out of range."""
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if self.node_grace_period < 0:
            raise ValueError(f"node_grace_period must be >= 0, got {self.node_grace_period}")
        if self.missed_heartbeats < 1:
            raise ValueError(f"missed_heartbeats must be >= 1, got {self.missed_heartbeats}")
        if self.telemetry_history < 1:
            raise ValueError(f"telemetry_history must be >= 1, got {self.telemetry_history}")
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(f"max_message_bytes must be >= 65536, got {self.max_message_bytes}")
        if self.scheduler_policy not in POLICIES:
            raise ValueError(f"scheduler_policy {self.scheduler_policy!r} is unknown: use one of {', '.join(POLICIES)}")
        self.preemption_rules()
        self.telemetry_config()
        if self.history_retention_days < 0:
            raise ValueError(f"history_retention_days must be >= 0 (0 = keep forever), got {self.history_retention_days}")
        if not 0 <= self.recent_ended_jobs <= RECENT_ENDED_JOBS:
            raise ValueError(f"recent_ended_jobs must be between 0 and {RECENT_ENDED_JOBS}, got {self.recent_ended_jobs}")
        if self.interactive_attach_grace_seconds <= 0:
            raise ValueError(f"interactive_attach_grace_seconds must be > 0, got {self.interactive_attach_grace_seconds}")
        if self.stop_grace_period < 0:
            raise ValueError(f"stop_grace_period must be >= 0, got {self.stop_grace_period}")
        if self.preemption_grace_seconds < 0:
            raise ValueError(f"preemption_grace_seconds must be >= 0, got {self.preemption_grace_seconds}")
        if self.launch_timeout_seconds < 0:
            raise ValueError(f"launch_timeout_seconds must be >= 0 (0: no timeout), got {self.launch_timeout_seconds:g}")
        if ":" not in self.listen:
            raise ValueError(f"listen must be HOST:PORT, got {self.listen!r}")
        parse_store_url(self.store_url, self.state_dir)
        if not self.leader_lease_seconds > 0:
            raise ValueError(f"leader_lease_seconds must be > 0, got {self.leader_lease_seconds}")
        if self.metrics_listen:
            parse_listen(self.metrics_listen)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS with client certificates")
        if self.agent_listen and not self.tls_client_ca:
            raise ValueError("agent_listen is the mutual-TLS port for agents: it needs tls_client_ca (and tls_cert, tls_key)")
        if self.agent_listen and ":" not in self.agent_listen:
            raise ValueError(f"agent_listen must be HOST:PORT, got {self.agent_listen!r}")
        for name in ("advertise_address", "advertise_agent_address"):
            problem = address_problem(getattr(self, name))
            if problem:
                raise ValueError(f"{name} {getattr(self, name)!r} {problem}")
        if self.advertise_agent_address and not self.agent_listen:
            raise ValueError("advertise_agent_address is where agents reach agent_listen: it needs agent_listen")
        if parse_store_url(self.store_url, self.state_dir).engine == "postgresql":
            port = self.listen.rpartition(":")[2]
            if not self.advertised_addresses(int(port) if port.isdigit() else 0, 0)[0]:
                raise ValueError(
                    f"listen {self.listen!r} names no machine to reach (a wildcard host, or port 0), and with a PostgreSQL "
                    "store_url the other coordinators name the leader's address to callers: set advertise_address"
                )
        missing = self.missing_protections()
        # agent_listen is a port of the same server: every service answers there too.
        for name, address in (("listen", self.listen), ("agent_listen", self.agent_listen)):
            if address and missing and not self.insecure and not is_loopback_host(address.rsplit(":", 1)[0]):
                raise ValueError(
                    f"{name} {address!r} is not a loopback address and {' and '.join(missing)}: set them, "
                    f"or {name} on 127.0.0.1, or pass --insecure to serve the network anyway"
                )
        if self.local_socket_group:
            try:
                grp.getgrnam(self.local_socket_group)
            except KeyError:
                raise ValueError(f"local_socket_group {self.local_socket_group!r} is not a group on this machine") from None
        if self.handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be > 0 seconds, got {self.handshake_timeout}")
        if self.max_connections < 0:
            raise ValueError(f"max_connections must be >= 0 (0 = from the open-file limit), got {self.max_connections}")
        self.quota_policy()
        self.device_capacities()
        if not 0 < self.runtime_prediction_quantile <= 1:
            raise ValueError(f"runtime_prediction_quantile must be in (0, 1], got {self.runtime_prediction_quantile}")
        if self.runtime_prediction_min_samples < 1:
            raise ValueError(f"runtime_prediction_min_samples must be >= 1, got {self.runtime_prediction_min_samples}")
        if self.runtime_prediction_default < 0:
            raise ValueError(f"runtime_prediction_default must be >= 0 (0 = unknown), got {self.runtime_prediction_default}")
        if self.start_estimate_interval_seconds < 0:
            raise ValueError(f"start_estimate_interval_seconds must be >= 0, got {self.start_estimate_interval_seconds}")
        for name in ("max_pending_jobs_per_user", "max_streams_per_client", "max_streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit), got {getattr(self, name)}")

    def preemption_rules(self) -> tuple[PreemptionRule, ...]:
        """The scheduler's preemption rules from priority_classes; raises ValueError naming what is wrong."""
        classes = self.priority_classes
        if not isinstance(classes, dict):
            raise ValueError("priority_classes must be TOML tables, e.g. [priority_classes.high] priority = 100")
        priorities: dict[str, int] = {}
        for name, table in classes.items():
            if not isinstance(table, dict):
                raise ValueError(f"priority_classes.{name} must be a table with priority (and preempts), got {table!r}")
            unknown = set(table) - {"priority", "preempts"}
            if unknown:
                raise ValueError(f"priority_classes.{name}: unknown key {sorted(unknown)[0]!r} (known: preempts, priority)")
            priority = table.get("priority")
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise ValueError(f"priority_classes.{name}.priority must be an integer, got {priority!r}")
            priorities[name] = priority
        by_priority = sorted(priorities.items(), key=lambda item: item[1])
        rules = []
        for name, table in classes.items():
            preempts = table.get("preempts", [])
            if not isinstance(preempts, list) or not all(isinstance(v, str) for v in preempts):
                raise ValueError(f"priority_classes.{name}.preempts must be a list of class names, got {preempts!r}")
            if not preempts:
                continue
            for victim in preempts:
                if victim not in priorities:
                    raise ValueError(f"priority_classes.{name} preempts {victim!r}, which is not a priority class")
                if priorities[victim] >= priorities[name]:
                    raise ValueError(
                        f"priority_classes.{name} (priority {priorities[name]}) preempts {victim} (priority "
                        f"{priorities[victim]}): a class may preempt only lower ones"
                    )
            top = max(priorities[v] for v in preempts)
            for other, priority in by_priority:
                if priority <= top and other not in preempts:
                    raise ValueError(
                        f"priority_classes.{name} preempts classes up to priority {top} but not {other} (priority {priority}), "
                        "which ranks below them: name it too"
                    )
            above = min(priority for _, priority in by_priority if priority > top)
            rules.append(PreemptionRule(min_priority=priorities[name], preempts_below_priority=above))
        return tuple(sorted(rules, key=lambda rule: rule.min_priority))
