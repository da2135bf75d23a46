"""Prometheus metrics of the agent (`--metrics-listen HOST:PORT`): its own liveness and work.

GPU telemetry is not repeated here: the coordinator exports every node's GPUs
under dcgm-exporter's names. The agent says whether it is connected to the
coordinator, how often it had to reconnect, how many heartbeats it sent and how
many ranks it runs — read at scrape time, on the agent's event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import gpuorch
from gpuorch.logs import get_logger
from gpuorch.metrics import MetricsServer, new_registry, on_loop

log = get_logger("agent.metrics")


@dataclass(frozen=True, slots=True)
class AgentState:
    node_id: str
    coordinator: str
    connected: bool
    registered: bool
    reconnects: int
    heartbeats_sent: int
    running_ranks: int


def snapshot(agent, supervisor) -> AgentState:
    """Runs on the event loop."""
    return AgentState(
        node_id=agent.node_id,
        coordinator=agent.coordinator,
        connected=agent.connected,
        registered=agent.registered.is_set(),
        reconnects=agent.reconnects,
        heartbeats_sent=agent.heartbeats_sent,
        running_ranks=supervisor.running_count(),
    )


def families(state: AgentState):
    info = GaugeMetricFamily(
        "gpuorch_agent_info",
        "Always 1; the agent's node id, version and coordinator as labels.",
        labels=["node", "version", "coordinator"],
    )
    info.add_metric([state.node_id, gpuorch.__version__, state.coordinator], 1)
    yield info
    yield GaugeMetricFamily(
        "gpuorch_agent_connected", "1 while the agent has a registered stream to the coordinator.", value=int(state.connected)
    )
    yield GaugeMetricFamily(
        "gpuorch_agent_registered",
        "1 once the agent has registered with the coordinator since it started.",
        value=int(state.registered),
    )
    yield CounterMetricFamily(
        "gpuorch_agent_reconnects", "Times the stream to the coordinator was lost or could not be opened.", value=state.reconnects
    )
    yield CounterMetricFamily(
        "gpuorch_agent_heartbeats_sent",
        "Heartbeats queued to the coordinator since the agent started.",
        value=state.heartbeats_sent,
    )
    yield GaugeMetricFamily(
        "gpuorch_agent_running_ranks", "Rank processes the agent supervises that are still running.", value=state.running_ranks
    )


class AgentCollector(Collector):
    def __init__(self, agent, supervisor, loop: asyncio.AbstractEventLoop) -> None:
        self.agent = agent
        self.supervisor = supervisor
        self.loop = loop

    def collect(self):
        yield from families(on_loop(self.loop, lambda: snapshot(self.agent, self.supervisor)))


def serve_metrics(listen: str, agent, supervisor) -> MetricsServer:
    """Starts /metrics on `listen` (call on the agent's event loop); OSError with the reason when it cannot."""
    registry = new_registry()
    registry.register(AgentCollector(agent, supervisor, asyncio.get_running_loop()))
    try:
        server = MetricsServer(listen, lambda: generate_latest(registry))
    except ValueError as error:
        raise OSError(str(error)) from None
    log.info("metrics serving", listen=listen, port=server.port, path="/metrics")
    return server
