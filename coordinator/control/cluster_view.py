"""The coordinator's view of the cluster: applies what agent streams report and the passage of time to
the node and device records (coordinator/model/cluster.py), through the pure node rules
(rules/liveness.py, rules/health.py), and turns the records into wire messages.

Fed by the agent streams (coordinator/api/agent_service.py) and read by the ClusterService, the
scheduling loop, the failure detector and the metrics.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.control.node_links import AgentSession
from coordinator.model.cluster import Allocations, DeviceRecord, NodeRecord, Session, Transition, public_state
from coordinator.model.telemetry import (
    ECC_UNCORRECTED,
    GPU_UTILIZATION,
    LAST_XID,
    LOST,
    MEMORY_USED,
    POWER,
    TEMPERATURE,
    HeartbeatStats,
    TelemetryHistory,
    sample_of,
    telemetry_of,
)
from coordinator.rules import health, liveness
from coordinator.rules.liveness import Liveness, LivenessPolicy
from coordinator.rules.registration import InvalidMessage
from gpuorch.clock import SYSTEM_CLOCK, Clock, stamp_seconds
from gpuorch.pools import DEFAULT_POOL
from gpuorch.v1 import agent_pb2, cluster_pb2


def _timestamp(wall: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(wall * 1e9))
    return stamp


class ClusterView:
    """Nodes and devices, keyed by node id and device uuid."""

    def __init__(
        self,
        *,
        policy: LivenessPolicy,
        default_heartbeat_interval: float,
        history_length: int = 100,
        device_recovery_seconds: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.policy = policy
        self.default_heartbeat_interval = default_heartbeat_interval
        self.history_length = history_length
        self.device_recovery_seconds = device_recovery_seconds
        self.clock = clock
        self.nodes: dict[str, NodeRecord] = {}
        self.heartbeats = HeartbeatStats()
        self._session_ids = itertools.count(1)
        self.drained: dict[str, str] = {}
        """Node id -> operator's reason, for drained nodes; outlives the node's streams (and, stored, restarts)."""
        self.allocations = Allocations()
        """Device uuid -> (job id, attempt) holding it; changed by the job rules, read here for views."""
        self.listeners: list[Callable[[Transition], None]] = []
        """Called for every liveness transition (the failure detector and metrics hook in here)."""
        self.device_listeners: list[Callable[[str, str, health.DeviceHealth], None]] = []
        """Called with (node id, device uuid, health) when a device turns unhealthy."""

    # -- events from agent streams ------------------------------------------------------------

    def register(self, register: agent_pb2.Register) -> tuple[NodeRecord, AgentSession, Session | None]:
        """Applies a validated registration. Returns (node, new session, replaced session or None)."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        interval = register.heartbeat_interval_seconds or self.default_heartbeat_interval
        session = AgentSession(register.node_id, next(self._session_ids))
        devices = {}
        previous = self.nodes.get(register.node_id)
        for info in register.devices:
            devices[info.uuid] = DeviceRecord(
                info=info, history=TelemetryHistory(self.history_length), memory_total=info.memory_total_bytes
            )
        state = liveness.registered(now, interval)
        replaced = previous.session if previous is not None else None
        node = NodeRecord(
            node_id=register.node_id,
            hostname=register.hostname,
            addresses=list(register.addresses),
            devices=devices,
            liveness=state,
            last_seen=now,
            deadline=liveness.next_deadline(state, now, self.policy),
            registered_wall=wall,
            session=session,
            drained=register.node_id in self.drained,
            drain_reason=self.drained.get(register.node_id, ""),
            agent_version=register.agent_version,
            pool=register.pool or DEFAULT_POOL,
        )
        self.nodes[node.node_id] = node
        if previous is not None and previous.liveness.state is not Liveness.READY:
            self._emit(Transition(node.node_id, previous.liveness.state, Liveness.READY, "registered", None))
        return node, session, replaced

    def heartbeat(self, session: AgentSession, heartbeat: agent_pb2.Heartbeat) -> None:
        """Records a heartbeat. Hot path: one per node per interval, so it stays lean."""
        node = self.nodes.get(session.node_id)
        if node is None or node.session is not session:
            return  # a superseded stream; its node has a newer one
        now, wall = self.clock.monotonic(), self.clock.wall()
        node.last_seen = now
        node.deadline = now + liveness.silence_limit(node.liveness, self.policy)
        node.last_sequence = heartbeat.sequence
        node.last_heartbeat_wall = wall
        devices = node.devices
        for sample in heartbeat.devices:
            record = devices.get(sample.uuid)
            if record is None:
                raise InvalidMessage(f"heartbeat names device {sample.uuid!r}, which node {node.node_id!r} did not register")
            previous = record.sample
            current = record.sample = sample_of(sample)
            record.history.append(wall, current[GPU_UTILIZATION], current[MEMORY_USED], current[TEMPERATURE], current[POWER])
            if (
                previous is None
                or record.last_unhealthy_at is not None
                or current[LOST]
                or current[LAST_XID] != previous[LAST_XID]
                or current[ECC_UNCORRECTED] != previous[ECC_UNCORRECTED]
                or current[TEMPERATURE] != previous[TEMPERATURE]
            ):
                self._judge(node, record, now)
        if heartbeat.HasField("sent_time"):
            self.heartbeats.record(wall, wall - stamp_seconds(heartbeat.sent_time))

    def _judge(self, node: NodeRecord, record: DeviceRecord, now: float) -> None:
        """Re-assesses a device from its latest telemetry, keeping recently unhealthy ones quarantined."""
        sample = record.sample
        if sample is None:
            return  # nothing reported yet: nothing to judge
        assessed = health.assess_device(
            lost=sample[LOST],
            last_xid=sample[LAST_XID],
            ecc_uncorrected_errors=sample[ECC_UNCORRECTED],
            temperature_celsius=sample[TEMPERATURE],
            temperature_limit_celsius=record.info.temperature_limit_celsius,
        )
        if not assessed.healthy:
            record.last_unhealthy_at, record.last_unhealthy_reason = now, assessed.reason
        effective = health.quarantined(
            assessed, record.last_unhealthy_at, record.last_unhealthy_reason, now, self.device_recovery_seconds
        )
        if effective.healthy:
            record.last_unhealthy_at = None
        turned_unhealthy = record.health.healthy and not effective.healthy
        if effective.healthy != record.health.healthy:
            node.health_version += 1
        record.health = effective
        if turned_unhealthy:
            for listener in self.device_listeners:
                listener(node.node_id, record.info.uuid, effective)

    def touch(self, session: AgentSession) -> None:
        """Any message from the agent proves it alive."""
        node = self.nodes.get(session.node_id)
        if node is not None and node.session is session:
            node.last_seen = self.clock.monotonic()
            node.deadline = node.last_seen + liveness.silence_limit(node.liveness, self.policy)

    def stream_closed(self, session: AgentSession) -> None:
        """The stream of `session` ended, for whatever reason."""
        node = self.nodes.get(session.node_id)
        if node is None or node.session is not session:
            return
        node.session = None
        before = node.liveness
        node.liveness = liveness.stream_closed(before, self.clock.monotonic(), session.close_reason or "stream closed")
        node.deadline = liveness.next_deadline(node.liveness, node.last_seen, self.policy)
        if node.liveness.state is not before.state:
            self._emit(Transition(node.node_id, before.state, node.liveness.state, node.liveness.reason, None))

    # -- time ---------------------------------------------------------------------------------

    def tick(self) -> list[Transition]:
        """Applies the passage of time to every node whose deadline has come."""
        now = self.clock.monotonic()
        transitions = []
        for node in self.nodes.values():
            if node.deadline > now:
                continue
            before = node.liveness
            after = liveness.expire(before, node.last_seen, now, self.policy)
            node.liveness = after
            node.deadline = liveness.next_deadline(after, node.last_seen, self.policy)
            if after is not before and after.state is not before.state:
                session = node.session if after.state is Liveness.DOWN else None
                transition = Transition(node.node_id, before.state, after.state, after.reason, session)
                transitions.append(transition)
                self._emit(transition)
        return transitions

    def excuse(self, stall_seconds: float) -> None:
        """The coordinator was held this long: no node's silence or grace period counts that time."""
        for node in self.nodes.values():
            node.liveness, node.last_seen = liveness.excused(node.liveness, node.last_seen, stall_seconds)
            node.deadline = liveness.next_deadline(node.liveness, node.last_seen, self.policy)

    def _emit(self, transition: Transition) -> None:
        for listener in self.listeners:
            listener(transition)

    # -- operators ----------------------------------------------------------------------------

    def get(self, node_id: str) -> NodeRecord:
        """The node; KeyError with an operator-facing message when unknown."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"node {node_id!r} is not known to the coordinator") from None

    def drain(self, node_id: str, reason: str) -> NodeRecord:
        node = self.get(node_id)
        node.drained = True
        node.drain_reason = self.drained[node_id] = reason or "drained by operator"
        return node

    def resume(self, node_id: str) -> NodeRecord:
        node = self.get(node_id)
        node.drained = False
        node.drain_reason = ""
        self.drained.pop(node_id, None)
        # An operator's resume also clears quarantined GPUs; ones still failing turn unhealthy again.
        for record in node.devices.values():
            record.last_unhealthy_at = None
            if record.sample is not None:
                self._judge(node, record, self.clock.monotonic())
        node.health_version += 1
        return node

    # -- wire views ---------------------------------------------------------------------------

    def busy(self, node: NodeRecord) -> bool:
        return any(uuid in self.allocations for uuid in node.devices)

    def state_of(self, node: NodeRecord) -> cluster_pb2.NodeState:
        return public_state(node.liveness.state, node.drained, self.busy(node))

    def node_proto(self, node: NodeRecord, include_history: bool = False) -> cluster_pb2.Node:
        """The wire view of a node; with `include_history`, every device's bounded telemetry history too."""
        message = cluster_pb2.Node(
            node_id=node.node_id,
            state=self.state_of(node),
            hostname=node.hostname,
            addresses=node.addresses,
            heartbeat_interval_seconds=node.liveness.heartbeat_interval,
            last_heartbeat_sequence=node.last_sequence,
            drained=node.drained,
            agent_version=node.agent_version,
            pool=node.pool,
            registered_time=_timestamp(node.registered_wall),
        )
        if node.last_heartbeat_wall:
            message.last_heartbeat_time.CopyFrom(_timestamp(node.last_heartbeat_wall))
        if node.liveness.state is not Liveness.READY:
            ago = self.clock.monotonic() - node.liveness.since
            message.state_reason = f"{node.liveness.reason} ({ago:.1f}s ago)"
        elif node.drained:
            message.state_reason = node.drain_reason
        for record in sorted(node.devices.values(), key=lambda device: device.info.index):
            job_id, attempt = self.allocations.get(record.info.uuid, ("", 0))
            device = message.devices.add(
                uuid=record.info.uuid,
                index=record.info.index,
                name=record.info.name,
                memory_total_bytes=record.info.memory_total_bytes,
                pci_bus_id=record.info.pci_bus_id,
                healthy=record.health.healthy,
                unhealthy_reason=record.health.reason,
                allocated_job_id=job_id,
                allocated_attempt=attempt,
            )
            if record.sample is not None:
                device.telemetry.CopyFrom(telemetry_of(record.info.uuid, record.sample))
            if include_history:
                for wall, utilization, memory_used, temperature, power in record.history.samples():
                    device.telemetry_history.add(
                        time=_timestamp(wall),
                        gpu_utilization_percent=utilization,
                        memory_used_bytes=int(memory_used),
                        temperature_celsius=temperature,
                        power_watts=power,
                    )
        return message

    def list_nodes(self, states: Iterable[int] = ()) -> list[cluster_pb2.Node]:
        wanted = set(states)
        return [
            self.node_proto(node) for node_id, node in sorted(self.nodes.items()) if not wanted or self.state_of(node) in wanted
        ]

    def status(self) -> cluster_pb2.ClusterStatus:
        """Totals for GetClusterStatus. Runs on the event loop over every GPU, so it adds up plain
        locals and touches the message once at the end."""
        by_state = {value: 0 for value in cluster_pb2.NodeState.values() if value != cluster_pb2.NODE_STATE_UNSPECIFIED}
        gpus_total = gpus_healthy = gpus_free = memory_total = memory_used = 0
        utilization_sum, utilization_count = 0.0, 0
        allocations = self.allocations
        for node in self.nodes.values():
            gpus_total += len(node.devices)
            busy = False
            ready = node.liveness.state is Liveness.READY
            for uuid, device in node.devices.items():
                allocated = uuid in allocations
                busy = busy or allocated
                if not ready:
                    continue
                memory_total += device.memory_total
                sample = device.sample
                if sample is not None:
                    memory_used += sample[MEMORY_USED]
                    utilization_sum += sample[GPU_UTILIZATION]
                    utilization_count += 1
                if device.health.healthy:
                    gpus_healthy += 1
                    if not allocated and not node.drained:
                        gpus_free += 1
            by_state[public_state(node.liveness.state, node.drained, busy)] += 1
        rate, p50, p99 = self.heartbeats.summary(self.clock.wall())
        return cluster_pb2.ClusterStatus(
            nodes_by_state={cluster_pb2.NodeState.Name(state): count for state, count in by_state.items()},
            nodes_total=len(self.nodes),
            gpus_total=gpus_total,
            gpus_healthy=gpus_healthy,
            gpus_free=gpus_free,
            memory_total_bytes=memory_total,
            memory_used_bytes=memory_used,
            mean_gpu_utilization_percent=utilization_sum / utilization_count if utilization_count else 0.0,
            heartbeats_per_second=rate,
            heartbeat_lag_p50_ms=p50,
            heartbeat_lag_p99_ms=p99,
        )
