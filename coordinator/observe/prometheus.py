"""Prometheus metrics of the coordinator (`--metrics-listen HOST:PORT`).

Everything but RPC outcomes is read at scrape time from state the coordinator keeps
anyway (the ClusterView, the JobManager, HeartbeatStats): heartbeat ingest, the
scheduler and the job manager do no metrics work at all. A scrape copies references
to that state on the event loop (`snapshot`: per node, nothing per GPU; a few ms at
16,000 GPUs) and does the rest in the HTTP server's thread, in ~1 ms slices that let
go of the GIL in between so heartbeat ingest keeps going: the cluster-wide metrics
through a prometheus_client Collector (`CoordinatorCollector`, `families`), the
per-node and per-GPU series straight to text (`FleetSeries`, ~14x cheaper than
prometheus_client's generic formatter, which needs seconds per scrape at 8,000 GPUs).

The one thing the coordinator does not keep is how RPCs ended; `RpcMetrics`, a
gRPC server interceptor, counts them per RPC (not per message: an agent's whole
AgentService/Connect stream is one RPC, so heartbeats cost it nothing).

Per-GPU telemetry uses the names and labels of NVIDIA's dcgm-exporter where one
exists (DCGM_FI_DEV_*; labels gpu, UUID, device, modelName, Hostname, pci_bus_id),
plus `node`, so panels built for dcgm-exporter work on the coordinator's endpoint.
Everything else is gpuorch_*.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import structlog
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import gpuorch
from coordinator.model.cluster import public_state
from coordinator.model.telemetry import SAMPLE_FIELDS, HeartbeatStats
from coordinator.rules.liveness import Liveness
from gpuorch.metrics import MetricsServer, new_registry, on_loop
from gpuorch.v1 import cluster_pb2, job_pb2

log = structlog.get_logger("coordinator.metrics")

MIB = 1024 * 1024
NODE_STATES = [name.removeprefix("NODE_STATE_") for name, value in cluster_pb2.NodeState.items() if value]
JOB_STATES = [name.removeprefix("JOB_STATE_") for name, value in job_pb2.JobState.items() if value]
LATENCY_QUANTILES = ("0.5", "0.9", "0.99")
FIELD = {name: position for position, name in enumerate(SAMPLE_FIELDS)}
"""Position of each telemetry field in a DeviceRecord.sample tuple."""
LOST, MEMORY_USED = FIELD["lost"], FIELD["memory_used_bytes"]
GPU_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id", "node")
"""dcgm-exporter's labels (gpu = index, device = nvidia<index>), and the gpuorch node id."""


# -- RPCs ----------------------------------------------------------------------------------------


def _code_name(code) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpc versions hand back the number
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


def _outcome(error: BaseException | None, context) -> str:
    """The status code an RPC ended with, as its client sees it."""
    if error is None:
        return _code_name(context.code())
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away (or its deadline passed)
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        return _code_name(context.code())
    return "UNKNOWN"  # what grpc answers for an exception that escapes a handler


GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}
"""(request streaming, response streaming) -> grpc_type, as go-grpc-prometheus names them."""
GO_CODE_NAMES = {
    "OK": "OK", "CANCELLED": "Canceled", "UNKNOWN": "Unknown", "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "RESOURCE_EXHAUSTED": "ResourceExhausted", "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted", "OUT_OF_RANGE": "OutOfRange", "UNIMPLEMENTED": "Unimplemented", "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable", "DATA_LOSS": "DataLoss", "UNAUTHENTICATED": "Unauthenticated",
}  # fmt: skip
"""grpc_code values as the Prometheus gRPC ecosystem writes them (Go's codes.Code.String()), so its dashboards and
alerts (grpc_code!="OK", grpc_code="Unavailable") work on gpuorch's series unchanged."""


def rpc_labels(method: str, types: dict[str, str]) -> list[str]:
    """[grpc_type, grpc_service, grpc_method] of a full method name ("/gpuorch.v1.JobService/SubmitJob")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return [types.get(method, "unary"), service or "unknown", name]


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts RPCs started per method and handled per (method, final status code).

    Runs once per RPC, never per message: the handler is wrapped (once per method,
    cached) so that its end is seen; request streams are passed through untouched.
    Counts are plain ints on the event loop, read by the collector on the loop.
    """

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.handled: dict[tuple[str, str], int] = {}
        self.types: dict[str, str] = {"unknown": "unary"}
        """Full method name -> grpc_type (unary, client_stream, server_stream, bidi_stream)."""
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:  # unknown method: counted under one name, so callers cannot grow the label set
            self._count("unknown", "UNIMPLEMENTED")
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _count(self, method: str, code: str) -> None:
        self.started[method] = self.started.get(method, 0) + 1
        key = (method, code)
        self.handled[key] = self.handled.get(key, 0) + 1

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self.types[method] = GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        if handler.request_streaming and handler.response_streaming:
            behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behaviour, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behaviour, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        started, handled = self.started, self.handled

        def finished(code: str) -> None:
            key = (method, code)
            handled[key] = handled.get(key, 0) + 1

        if inspect.isasyncgenfunction(behaviour):

            async def observed(request, context):
                started[method] = started.get(method, 0) + 1
                try:
                    async for response in behaviour(request, context):
                        yield response
                except BaseException as error:
                    finished(_outcome(error, context))
                    raise
                finished(_outcome(None, context))

        elif inspect.iscoroutinefunction(behaviour):

            async def observed(request, context):
                started[method] = started.get(method, 0) + 1
                try:
                    response = await behaviour(request, context)
                except BaseException as error:
                    finished(_outcome(error, context))
                    raise
                finished(_outcome(None, context))
                return response

        else:
            return handler  # a synchronous handler (none in gpuorch): left alone, not counted
        return make(observed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


# -- the snapshot: copied on the event loop ------------------------------------------------------


@dataclass(slots=True)
class NodeRow:
    node_id: str
    hostname: str
    liveness: Liveness
    drained: bool
    last_heard_wall: float
    """Wall time of its last heartbeat (or registration)."""
    records: list
    """The node's DeviceRecords. Read off the loop: the fields read here (info, health, sample) are
    replaced whole, never changed in place, so a read sees the old value or the new one."""
    state: str = ""
    """Public state name (READY, SUSPECT, DOWN, DRAINING, DRAINED); set by Snapshot.resolve."""
    gpus: list[tuple] = field(default_factory=list)
    """(uuid, DeviceInfo, healthy, allocated, sample) per GPU, by index; set by Snapshot.resolve.
    `sample` is DeviceRecord.sample: the latest telemetry in SAMPLE_FIELDS order, or None."""


@dataclass(slots=True)
class Snapshot:
    now_wall: float
    epoch: int
    heartbeats: HeartbeatStats
    """A private copy of the cluster's HeartbeatStats."""
    allocations: dict[str, tuple[str, int]]
    nodes: list[NodeRow] = field(default_factory=list)
    job_entries: list = field(default_factory=list)
    """Every JobEntry (finished ones too: there may be 100,000s, so they are counted off the loop)."""
    job_states: dict[int, int] = field(default_factory=dict)
    """JobState value -> jobs in it; set by Snapshot.resolve."""
    pending_since: list[float] = field(default_factory=list)
    """Wall time each pending job has been waiting since (submission, or the end of its last attempt)."""
    pending_gpus: int = 0
    placements: int = 0
    restarts_by_reason: dict[str, int] = field(default_factory=dict)
    decision_seconds: list[float] = field(default_factory=list)
    launch_latencies: list[float] = field(default_factory=list)
    rpc_started: dict[str, int] = field(default_factory=dict)
    rpc_handled: dict[tuple[str, str], int] = field(default_factory=dict)
    rpc_types: dict[str, str] = field(default_factory=dict)
    job_owners: dict[str, str] = field(default_factory=dict)
    """Job id -> owner of each job holding a GPU; set by Snapshot.resolve."""
    held_seconds: float = 0.0
    """How long taking this snapshot held the event loop."""

    def resolve(self) -> Snapshot:
        """The per-node, per-GPU and per-job work, done off the loop: node states, GPU rows, job counts."""
        allocations = self.allocations
        self.nodes.sort(key=lambda node: node.node_id)
        done = 0
        for node in self.nodes:
            gpus = [
                (record.info.uuid, record.info, record.health.healthy, record.info.uuid in allocations, record.sample)
                for record in node.records
            ]
            gpus.sort(key=lambda gpu: gpu[1].index)
            busy = any(gpu[3] for gpu in gpus)
            node.state = _NODE_STATE_NAMES[public_state(node.liveness, node.drained, busy)]
            node.gpus = gpus
            done += len(gpus)
            if done >= SLICE_ROWS:
                done = 0
                _pause()
        # JobManager.jobs_by_state's count; a job's state is one field, read whole.
        job_states: collections.Counter = collections.Counter()
        for chunk in _slices(self.job_entries, 10 * SLICE_ROWS):
            job_states.update([entry.job.state for entry in chunk])
        self.job_states = dict(job_states)
        holding = {job_id for job_id, _attempt in allocations.values()}
        self.job_owners = {entry.job.job_id: entry.job.spec.owner for entry in self.job_entries if entry.job.job_id in holding}
        return self


def snapshot(coordinator, rpc: RpcMetrics | None) -> Snapshot:
    """Copies what the metrics need. Runs on the event loop between heartbeats, so it copies
    references, per node, and C-level copies of dicts; nothing per GPU, nothing formatted."""
    cluster = coordinator.cluster
    started = cluster.clock.monotonic()
    result = Snapshot(
        now_wall=cluster.clock.wall(),
        epoch=coordinator.epoch,
        heartbeats=copy.deepcopy(cluster.heartbeats),
        allocations=cluster.allocations.copy(),
    )
    result.nodes = [
        NodeRow(
            node_id,
            node.hostname,
            node.liveness.state,
            node.drained,
            node.last_heartbeat_wall or node.registered_wall,
            list(node.devices.values()),
        )
        for node_id, node in cluster.nodes.items()
    ]
    jobs = getattr(coordinator, "jobs", None)
    if jobs is not None:
        result.job_entries = list(jobs.jobs.values())
        for entry in jobs.pending.values():
            job = entry.job
            since = job.submit_time
            if job.attempts and job.attempts[-1].HasField("end_time"):
                since = job.attempts[-1].end_time
            result.pending_since.append(since.ToNanoseconds() / 1e9)
            result.pending_gpus += job.spec.gpus
        result.placements = jobs.placements
        result.restarts_by_reason = dict(jobs.restarts_by_reason)
        result.decision_seconds = list(jobs.decision_seconds)
        result.launch_latencies = list(jobs.launch_latencies)
    if rpc is not None:
        result.rpc_started = dict(rpc.started)
        result.rpc_handled = dict(rpc.handled)
        result.rpc_types = dict(rpc.types)
    result.held_seconds = cluster.clock.monotonic() - started
    return result


_NODE_STATE_NAMES = {
    value: cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_") for value in cluster_pb2.NodeState.values()
}


# -- cluster-wide metric families: built off the loop ------------------------------------------------


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (as HeartbeatStats computes its p99)."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _latency_gauge(name: str, documentation: str, values: list[float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["quantile"])
    ordered = sorted(values)
    for q in LATENCY_QUANTILES:
        family.add_metric([q], _quantile(ordered, float(q)) if ordered else math.nan)
    return family


def families(state: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Every coordinator metric except the per-node and per-GPU series (see FleetSeries), from a resolved snapshot."""
    info = GaugeMetricFamily(
        "gpuorch_coordinator_info", "Always 1; the coordinator's version and epoch as labels.", labels=["version", "epoch"]
    )
    info.add_metric([gpuorch.__version__, str(state.epoch)], 1)
    yield info

    # nodes
    nodes = GaugeMetricFamily("gpuorch_nodes", "Nodes known to the coordinator, by state.", labels=["state"])
    counts = dict.fromkeys(NODE_STATES, 0)
    for node in state.nodes:
        counts[node.state] = counts.get(node.state, 0) + 1
    for name, count in counts.items():
        nodes.add_metric([name], count)
    yield nodes

    # GPUs by node state, health and allocation
    gpus = GaugeMetricFamily(
        "gpuorch_gpus",
        "GPUs by the state of their node, health and allocation. Free = node_state READY, healthy, not allocated.",
        labels=["node_state", "healthy", "allocated"],
    )
    gpu_counts: dict[tuple[str, str, str], int] = {}
    for healthy in ("true", "false"):  # the series dashboards and alerts use always exist, at 0 when there is none
        for allocated in ("true", "false"):
            gpu_counts[("READY", healthy, allocated)] = 0
    for node in state.nodes:
        for _, _, healthy, allocated, _ in node.gpus:
            key = (node.state, "true" if healthy else "false", "true" if allocated else "false")
            gpu_counts[key] = gpu_counts.get(key, 0) + 1
    for key, count in sorted(gpu_counts.items()):
        gpus.add_metric(list(key), count)
    yield gpus

    # jobs and the queue
    jobs = GaugeMetricFamily("gpuorch_jobs", "Jobs the coordinator knows, by state.", labels=["state"])
    for name in JOB_STATES:
        jobs.add_metric([name], state.job_states.get(job_pb2.JobState.Value(f"JOB_STATE_{name}"), 0))
    yield jobs
    yield GaugeMetricFamily(
        "gpuorch_queue_length", "Jobs waiting to be placed (new, or restarting).", value=len(state.pending_since)
    )
    yield GaugeMetricFamily(
        "gpuorch_queue_pending_gpus", "GPUs asked for by the jobs waiting to be placed.", value=state.pending_gpus
    )
    oldest = min(state.pending_since, default=None)
    yield GaugeMetricFamily(
        "gpuorch_queue_oldest_pending_age_seconds",
        "How long the longest-waiting pending job has waited (since submission or its last attempt's end); 0 when none.",
        value=max(0.0, state.now_wall - oldest) if oldest is not None else 0.0,
    )
    yield CounterMetricFamily(
        "gpuorch_placements_total", "Attempts placed on GPUs since the coordinator started.", value=state.placements
    )
    restarts = CounterMetricFamily(
        "gpuorch_job_restarts_total", "Job restarts since the coordinator started, by reason.", labels=["reason"]
    )
    for reason, count in sorted(state.restarts_by_reason.items()):
        restarts.add_metric([reason], count)
    yield restarts
    yield _latency_gauge(
        "gpuorch_scheduling_decision_seconds",
        "Duration of the recent (last 1000) scheduling passes that placed something, by quantile; NaN before any.",
        state.decision_seconds,
    )
    yield _latency_gauge(
        "gpuorch_launch_latency_seconds",
        "Recent (last 1000) times from placement to every rank's process running, by quantile; NaN before any.",
        state.launch_latencies,
    )

    # heartbeats
    rate, p50_ms, p99_ms = state.heartbeats.summary(state.now_wall)
    lag = GaugeMetricFamily(
        "gpuorch_heartbeat_lag_seconds",
        "Heartbeat ingest lag (applied - sent, wall clocks) over the last 10 s, by quantile.",
        labels=["quantile"],
    )
    lag.add_metric(["0.5"], p50_ms / 1000)
    lag.add_metric(["0.99"], p99_ms / 1000)
    yield lag
    yield GaugeMetricFamily("gpuorch_heartbeats_per_second", "Heartbeats applied per second over the last 10 s.", value=rate)

    # RPCs
    # RPCs, with go-grpc-prometheus's names and labels, so the gRPC ecosystem's dashboards and alerts apply.
    started = CounterMetricFamily(
        "grpc_server_started_total", "RPCs started on the server.", labels=["grpc_type", "grpc_service", "grpc_method"]
    )
    for method, count in sorted(state.rpc_started.items()):
        started.add_metric(rpc_labels(method, state.rpc_types), count)
    yield started
    handled = CounterMetricFamily(
        "grpc_server_handled_total",
        "RPCs completed on the server, whatever their status code.",
        labels=["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    )
    for (method, code), count in sorted(state.rpc_handled.items()):
        handled.add_metric([*rpc_labels(method, state.rpc_types), GO_CODE_NAMES.get(code, code)], count)
    yield handled
    yield GaugeMetricFamily(
        "gpuorch_metrics_snapshot_seconds",
        "How long this scrape held the coordinator's event loop to copy its state.",
        value=state.held_seconds,
    )


class CoordinatorCollector(Collector):
    """The cluster-wide metrics as a prometheus_client pull collector: reads the live state at collect()."""

    def __init__(self, coordinator, loop: asyncio.AbstractEventLoop, rpc: RpcMetrics | None = None) -> None:
        self.coordinator = coordinator
        self.loop = loop
        self.rpc = rpc

    def take(self) -> Snapshot:
        """A snapshot of the coordinator, copied on its event loop (call from another thread)."""
        return on_loop(self.loop, lambda: snapshot(self.coordinator, self.rpc)).resolve()

    def collect(self, state: Snapshot | None = None):
        yield from families(state if state is not None else self.take())


# -- per-node and per-GPU series, written straight to text -------------------------------------


def _number(value) -> str:
    if type(value) is int:
        return str(value)
    if math.isnan(value):
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.6g}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_UTILIZATION, _MEMORY_UTILIZATION, _TEMPERATURE, _POWER, _LAST_XID, _ECC_CORRECTED, _ECC_UNCORRECTED, _XID_COUNT = (
    FIELD[name]
    for name in (
        "gpu_utilization_percent", "memory_utilization_percent", "temperature_celsius", "power_watts",
        "last_xid", "ecc_corrected_errors", "ecc_uncorrected_errors", "xid_count",
    )
)  # fmt: skip

# (name, type, help, value from (memory total MiB, sample)): dcgm-exporter's names, types and units.
TELEMETRY_SERIES = (
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda total, sample: sample[_UTILIZATION]),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", lambda total, sample: sample[_MEMORY_UTILIZATION]),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", lambda total, sample: sample[MEMORY_USED] // MIB),
    (
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        lambda total, sample: max(0, total - sample[MEMORY_USED] // MIB),
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda total, sample: sample[_TEMPERATURE]),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda total, sample: sample[_POWER]),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Value of the last XID error encountered (0 = none).",
        lambda total, sample: sample[_LAST_XID],
    ),
    # Counters named as dcgm-exporter names them (prometheus_client's formatter would append _total).
    (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "counter",
        "Total number of single-bit volatile ECC errors.",
        lambda total, sample: sample[_ECC_CORRECTED],
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        "Total number of double-bit volatile ECC errors.",
        lambda total, sample: sample[_ECC_UNCORRECTED],
    ),
    (
        "gpuorch_gpu_xid_errors_total",
        "counter",
        "Critical XID errors seen by the agent since it started.",
        lambda total, sample: sample[_XID_COUNT],
    ),
)


class FleetSeries:
    """Per-node and per-GPU series, written straight to exposition text.

    One coordinator exports every node and GPU of the fleet: at 16,000 GPUs that is
    ~200,000 series, which prometheus_client's generic formatter (label validation and
    escaping per sample) takes seconds of CPU to write, contending for the GIL with
    heartbeat ingest all the while. Here each GPU's label set is escaped once and kept
    while the GPU's registration stands, and a line is one string join.
    """

    def __init__(self) -> None:
        self._labels: dict[str, tuple] = {}
        """uuid -> (DeviceInfo, node id, hostname, label text, memory total MiB); replaced whole, never
        changed in place, so concurrent scrapes may share it."""

    def render(self, state: Snapshot) -> bytes:
        out: list[bytes] = []

        def header(name: str, kind: str, documentation: str) -> None:
            out.append(f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n".encode())

        nodes = [(f'node="{_escape(node.node_id)}"', node) for node in state.nodes]
        header("gpuorch_node_state", "gauge", "1 for the state each node is in, 0 for the others.")
        for chunk in _slices(nodes, SLICE_ROWS // len(NODE_STATES)):
            out.append(
                "".join(
                    [
                        f'gpuorch_node_state{{{labels},state="{name}"}} {1 if name == node.state else 0}\n'
                        for labels, node in chunk
                        for name in NODE_STATES
                    ]
                ).encode()
            )
        header("gpuorch_node_heartbeat_age_seconds", "gauge", "Seconds since each node's last heartbeat (or registration).")
        now = state.now_wall
        for chunk in _slices(nodes):
            out.append(
                "".join(
                    [
                        f"gpuorch_node_heartbeat_age_seconds{{{labels}}} {_number(max(0.0, now - node.last_heard_wall))}\n"
                        for labels, node in chunk
                    ]
                ).encode()
            )

        previous, current = self._labels, {}
        everyone: list[tuple[str, int, bool, bool]] = []  # (labels, memory total MiB, healthy, allocated)
        everyone_by_uuid: list[tuple[str, str, bool]] = []  # (uuid, labels, allocated)
        reporting: list[tuple[str, int, tuple]] = []  # (labels, memory total MiB, sample) of GPUs with a current reading
        done = 0
        for node in state.nodes:
            live = node.liveness is Liveness.READY
            for uuid, info, healthy, allocated, sample in node.gpus:
                cached = previous.get(uuid)
                if cached is None or cached[0] is not info or cached[1] != node.node_id or cached[2] != node.hostname:
                    index = info.index
                    text = (
                        f'gpu="{index}",UUID="{_escape(uuid)}",device="nvidia{index}",modelName="{_escape(info.name)}",'
                        f'Hostname="{_escape(node.hostname)}",pci_bus_id="{_escape(info.pci_bus_id)}",'
                        f'node="{_escape(node.node_id)}"'
                    )
                    cached = (info, node.node_id, node.hostname, text, info.memory_total_bytes // MIB)
                current[uuid] = cached
                labels, total = cached[3], cached[4]
                everyone.append((labels, total, healthy, allocated))
                everyone_by_uuid.append((uuid, labels, allocated))
                if live and sample is not None and not sample[LOST]:
                    reporting.append((labels, total, sample))
            done += len(node.gpus)
            if done >= SLICE_ROWS:
                done = 0
                _pause()
        self._labels = current
        header("gpuorch_gpu_healthy", "gauge", "1 if the GPU may get work, 0 if it is unhealthy or quarantined.")
        for chunk in _slices(everyone):
            out.append(
                "".join([f"gpuorch_gpu_healthy{{{labels}}} {1 if healthy else 0}\n" for labels, _, healthy, _ in chunk]).encode()
            )
        header(
            "gpuorch_gpu_allocated",
            "gauge",
            "1 with the job and its owner as labels if an attempt holds the GPU, else 0 without them (one series per GPU).",
        )
        # Only a held GPU carries job and owner: as many such series as GPUs, however many jobs have run.
        holders = {job_id: f',job="{_escape(job_id)}",owner="{_escape(owner)}"' for job_id, owner in state.job_owners.items()}
        for chunk in _slices(everyone_by_uuid):
            out.append(
                "".join(
                    [
                        f"gpuorch_gpu_allocated{{{labels}{holders.get(state.allocations[uuid][0], '')}}} 1\n"
                        if allocated
                        else f"gpuorch_gpu_allocated{{{labels}}} 0\n"
                        for uuid, labels, allocated in chunk
                    ]
                ).encode()
            )
        header("DCGM_FI_DEV_FB_TOTAL", "gauge", "Framebuffer memory total (in MiB).")
        for chunk in _slices(everyone):
            out.append("".join([f"DCGM_FI_DEV_FB_TOTAL{{{labels}}} {total}\n" for labels, total, _, _ in chunk]).encode())
        for name, kind, documentation, value in TELEMETRY_SERIES:
            header(name, kind, documentation)
            for chunk in _slices(reporting):
                out.append(
                    "".join([f"{name}{{{labels}}} {_number(value(total, sample))}\n" for labels, total, sample in chunk]).encode()
                )
        return b"".join(out)


SLICE_ROWS = 1000
"""Series written between two pauses (~1 ms of work): a scrape's thread never holds the GIL long,
so the event loop, which needs it for every heartbeat, is never kept waiting long."""
PAUSE_SECONDS = 0.0002


def _pause() -> None:
    time.sleep(PAUSE_SECONDS)  # lets go of the GIL; the loop's waiting threads take it


def _slices(rows: list, size: int = SLICE_ROWS) -> Iterator[list]:
    for start in range(0, len(rows), size):
        if start:
            _pause()
        yield rows[start : start + size]


# -- wiring --------------------------------------------------------------------------------------


class CoordinatorMetrics:
    """The coordinator's metrics endpoint: the RPC interceptor now, the HTTP server at `serve`."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator
        self.rpc = RpcMetrics()
        self.registry = new_registry()
        """Process and Python runtime metrics."""
        self.collector: CoordinatorCollector | None = None
        self.fleet = FleetSeries()
        self.server: MetricsServer | None = None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.rpc]

    def page(self) -> bytes:
        """One scrape: a single snapshot of the coordinator, then everything formatted from it."""
        assert self.collector is not None
        state = self.collector.take()
        return b"".join(
            (
                generate_latest(self.registry),
                generate_latest(_Fixed(list(self.collector.collect(state)))),
                self.fleet.render(state),
            )
        )

    def serve(self, listen: str) -> None:
        """Starts /metrics on `listen` (call on the coordinator's event loop); RuntimeError with the reason when it cannot."""
        self.collector = CoordinatorCollector(self.coordinator, asyncio.get_running_loop(), self.rpc)
        try:
            self.server = MetricsServer(listen, self.page)
        except (OSError, ValueError) as error:
            raise RuntimeError(str(error)) from None
        log.info("metrics serving", listen=listen, port=self.server.port, path="/metrics")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class _Fixed(Collector):
    def __init__(self, metrics: list) -> None:
        self.metrics = metrics

    def collect(self):
        return self.metrics
