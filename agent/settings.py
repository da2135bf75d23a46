"""The agent's settings: TOML (--config), GPUORCH_* env vars and flags, in that order."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuorch.addresses import parse_address_list
from gpuorch.metrics import parse_listen
from gpuorch.pools import DEFAULT_POOL, pool_name_problem


@dataclass
class AgentSettings:
    coordinator: str = "127.0.0.1:50051"
    """HOST[:PORT] of the coordinator, or a comma-separated list of coordinators: the agent follows their leader."""
    node_id: str = ""
    """Unique id of this node; empty = the hostname."""
    state_dir: str = "/var/lib/gpuorch/agent"
    """Where rank logs and the record of running ranks live."""
    simulate_gpus: int = 0
    """Simulate this many GPUs instead of reading NVML (laptops, CI, benchmarks)."""
    simulate_faults_file: str = ""
    """JSON file of injected faults for simulated GPUs; empty = <state_dir>/simulated-faults.json."""
    heartbeat_interval: float = 0.0
    """Seconds between heartbeats; 0 = what the coordinator asks for."""
    advertise_address: str = ""
    """Address other nodes reach this one on; empty = the one the coordinator is reached from."""
    pool: str = DEFAULT_POOL
    """The node pool this node serves: jobs that ask for a pool run only on its nodes."""
    reconnect_initial: float = 0.1
    """First reconnect delay in seconds; doubles per failure."""
    reconnect_max: float = 3.0
    """Cap of the reconnect delay in seconds."""
    metrics_listen: str = ""
    """host:port to serve Prometheus /metrics on (e.g. 0.0.0.0:9401); empty = no metrics endpoint."""
    tls_ca: str = ""
    """PEM CA that signed the coordinator's certificate; turns TLS on. Empty with tls_cert = the system's CAs."""
    tls_cert: str = ""
    """PEM client certificate of this node, for mutual TLS: node_id must be one of its names."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    allowed_users: list[str] = field(default_factory=list)
    """Owners whose jobs may run on this node: user names, or @group for a group's members; empty = any user."""
    allow_root_ranks: bool = False
    """When the agent runs as root: also start ranks as root (jobs owned by root or by no one). Off = refused."""
    single_user: bool = False
    """The node is one user's: every rank runs as the agent's own user (root too), whatever owner the job names."""
    cgroup_root: str = ""
    """cgroup v2 directory the agent puts each rank's cgroup in, the agent's alone; empty = the agent's own
    cgroup when systemd delegated it (Delegate=yes), else none; "off" = no cgroups."""
    default_pids_max: int = 0
    """pids.max of a rank's cgroup when its job sets none; 0 = no limit."""
    default_memory_max_bytes: int = 0
    """memory.max of a rank's cgroup, in bytes, when its job sets none; 0 = no limit."""
    max_log_bytes: int = 1 << 30
    """A rank's log is rotated to rank-N.log.1 (one kept) when it grows past this; 0 = never."""
    log_level: str = "info"
    log_format: str = "auto"
    """json, console, or auto (console on a terminal)."""

    def validate(self) -> None:
        """Raises ValueError naming the first setting out of range."""
        if self.simulate_gpus < 0:
            raise ValueError(f"simulate_gpus must be >= 0, got {self.simulate_gpus}")
        if self.heartbeat_interval != 0 and not 0.05 <= self.heartbeat_interval <= 300:
            raise ValueError(f"heartbeat_interval must be between 0.05 and 300 seconds, got {self.heartbeat_interval}")
        if self.reconnect_initial <= 0 or self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_initial must be > 0 and reconnect_max >= reconnect_initial")
        problem = pool_name_problem(self.pool) if self.pool else "pool must not be empty (the default pool is 'default')"
        if problem:
            raise ValueError(problem)
        parse_address_list(self.coordinator)  # AddressError (a ValueError) names the bad entry
        if self.metrics_listen:
            parse_listen(self.metrics_listen)
        for entry in self.allowed_users:
            if not entry.lstrip("@"):
                raise ValueError(f"allowed_users: {entry!r} names no user or group")
        if self.default_pids_max < 0 or self.default_memory_max_bytes < 0:
            raise ValueError("default_pids_max and default_memory_max_bytes must be >= 0 (0 = no limit)")
        if self.max_log_bytes != 0 and self.max_log_bytes < 4096:
            raise ValueError(f"max_log_bytes must be 0 (no cap) or at least 4096, got {self.max_log_bytes}")
        if self.cgroup_root not in ("", "off") and not self.cgroup_root.startswith("/"):
            raise ValueError(f'cgroup_root must be empty, "off" or an absolute path, got {self.cgroup_root!r}')
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
