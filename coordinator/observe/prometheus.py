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

The one thing the coordinator does not keep is how RPCs ended; `RpcMetrics` (rpc_metrics.py), a
gRPC server interceptor, counts them per RPC (not per message: an agent's whole
AgentService/Connect stream is one RPC, so heartbeats cost it nothing).

Per-GPU telemetry uses the names and labels of NVIDIA's dcgm-exporter where one
exists (DCGM_FI_DEV_*; labels gpu, UUID, device, modelName, Hostname, pci_bus_id),
plus `node`, so panels built for dcgm-exporter work on the coordinator's endpoint.
Everything else is gpuorch_*.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import grpc
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

import gpuorch
from coordinator.model.job_telemetry import STEP_SECONDS_BUCKETS
from coordinator.observe.fleet_series import JOB_STATES, LATENCY_QUANTILES, NODE_STATES, FleetSeries
from coordinator.observe.read_model import Snapshot, snapshot
from coordinator.observe.rpc_metrics import GO_CODE_NAMES, RpcMetrics, rpc_labels
from gpuorch.logs import get_logger
from gpuorch.metrics import MetricsServer, new_registry, on_loop
from gpuorch.v1 import job_pb2

log = get_logger("coordinator.metrics")


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


def families(state: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
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
    yield from job_telemetry_families(state)
    yield GaugeMetricFamily(
        "gpuorch_metrics_snapshot_seconds",
        "How long this scrape held the coordinator's event loop to copy its state.",
        value=state.held_seconds,
    )


def job_telemetry_families(state: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
    """What running jobs' ranks report through gpuorch.worker.report_progress(), labelled by job and owner: running
    jobs only, so the series end with their jobs and their number stays bounded by what the cluster runs."""
    labels = ["job", "owner"]
    steps = CounterMetricFamily("gpuorch_job_steps", "The step a running job's ranks reached (its highest).", labels=labels)
    seconds = HistogramMetricFamily(
        "gpuorch_job_step_seconds", "Step times of a running job's ranks, one observation per rank and step.", labels=labels
    )
    samples = GaugeMetricFamily(
        "gpuorch_job_samples_per_second", "Samples per second of a running job, every rank's together.", labels=labels
    )
    stragglers = GaugeMetricFamily(
        "gpuorch_job_stragglers", "Ranks of a running job's attempt flagged as stragglers.", labels=labels
    )
    idle = GaugeMetricFamily("gpuorch_job_idle", "1 while a running job's GPUs have been idle for idle_minutes.", labels=labels)
    for row in state.job_telemetry:
        names = [row.job_id, row.owner]
        steps.add_metric(names, row.step)
        cumulative, buckets = 0, []
        for bound, count in zip(STEP_SECONDS_BUCKETS, row.bucket_counts, strict=True):
            cumulative += count
            buckets.append((f"{bound:g}", cumulative))
        buckets.append(("+Inf", row.steps_timed))
        seconds.add_metric(names, buckets, row.step_seconds_sum)
        samples.add_metric(names, row.samples_per_second)
        stragglers.add_metric(names, row.stragglers)
        idle.add_metric(names, 1.0 if row.idle else 0.0)
    yield from (steps, seconds, samples, stragglers, idle)


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
