"""The coordinator's in-memory view of the cluster: nodes, devices, telemetry.

Fed by the agent streams (coordinator/agent_service.py) and read by the
ClusterService, the scheduler and the failure detector. Every decision it
applies comes from a pure function (liveness.py, health.py); this module only
keeps the records and turns them into wire messages.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.model.jobs import RankKey
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
from coordinator.rules.liveness import Liveness, LivenessPolicy, NodeLiveness
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.v1 import agent_pb2, cluster_pb2

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")
MAX_DEVICES_PER_NODE = 64
MIN_HEARTBEAT_INTERVAL = 0.05
MAX_HEARTBEAT_INTERVAL = 300.0


class InvalidMessage(ValueError):
    """An agent sent something the protocol does not allow; the text says what."""


def public_state(state: Liveness, drained: bool, busy: bool) -> cluster_pb2.NodeState.ValueType:
    """The NodeState operators see: liveness first, then the operator's drain."""
    if state is Liveness.SUSPECT:
        return cluster_pb2.NODE_STATE_SUSPECT
    if state is Liveness.DOWN:
        return cluster_pb2.NODE_STATE_DOWN
    if drained:
        return cluster_pb2.NODE_STATE_DRAINING if busy else cluster_pb2.NODE_STATE_DRAINED
    return cluster_pb2.NODE_STATE_READY


def validate_register(register: agent_pb2.Register) -> None:
    """Raises InvalidMessage naming the first thing wrong with a registration."""
    if not register.node_id:
        raise InvalidMessage("register.node_id is empty")
    if not NODE_ID_PATTERN.match(register.node_id):
        raise InvalidMessage(
            f"register.node_id {register.node_id[:80]!r} is not a valid node id "
            "(letters, digits, '.', '_', ':', '-'; at most 253 characters)"
        )
    interval = register.heartbeat_interval_seconds
    if interval != 0 and not (MIN_HEARTBEAT_INTERVAL <= interval <= MAX_HEARTBEAT_INTERVAL):
        raise InvalidMessage(
            f"register.heartbeat_interval_seconds {interval!r} is outside "
            f"[{MIN_HEARTBEAT_INTERVAL}, {MAX_HEARTBEAT_INTERVAL}] (or 0 for the coordinator's)"
        )
    if len(register.devices) > MAX_DEVICES_PER_NODE:
        raise InvalidMessage(f"register.devices has {len(register.devices)} devices; at most {MAX_DEVICES_PER_NODE}")
    seen: set[str] = set()
    for position, device in enumerate(register.devices):
        if not device.uuid:
            raise InvalidMessage(f"register.devices[{position}].uuid is empty")
        if device.uuid in seen:
            raise InvalidMessage(f"register.devices[{position}].uuid {device.uuid!r} appears twice")
        seen.add(device.uuid)


@dataclass(eq=False)
class AgentSession:
    """One agent stream. The coordinator talks to a node through its current session."""

    node_id: str
    session_id: int
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    close_reason: str | None = None
    """Set when the coordinator ends the stream (superseded, declared down, shutting down)."""

    def send(self, message: agent_pb2.CoordinatorMessage) -> None:
        if self.close_reason is None:
            self.outbox.put_nowait(message)

    def close(self, reason: str) -> None:
        """Asks the stream's handler to end the RPC with `reason`."""
        if self.close_reason is None:
            self.close_reason = reason
            self.outbox.put_nowait(None)


@dataclass(eq=False, slots=True)
class DeviceRecord:
    info: cluster_pb2.DeviceInfo
    history: TelemetryHistory
    memory_total: int = 0
    """info.memory_total_bytes, read once (message fields are slow to read in loops over every GPU)."""
    sample: tuple | None = None
    """Latest telemetry as a tuple in SAMPLE_FIELDS order; None before the first heartbeat."""
    health: health.DeviceHealth = health.HEALTHY
    last_unhealthy_at: float | None = None
    """Monotonic time the device was last seen unhealthy; None once it has recovered or was cleared."""
    last_unhealthy_reason: str = ""


@dataclass(eq=False, slots=True)
class NodeRecord:
    node_id: str
    hostname: str
    addresses: list[str]
    devices: dict[str, DeviceRecord]
    liveness: NodeLiveness
    last_seen: float
    """Monotonic time of the last message on the current stream."""
    deadline: float
    """Monotonic time at which liveness.expire must be consulted again."""
    registered_wall: float
    last_heartbeat_wall: float = 0.0
    health_version: int = 0
    """Increases whenever a device of the node turns healthy or unhealthy."""
    last_sequence: int = 0
    session: AgentSession | None = None
    drained: bool = False
    drain_reason: str = ""
    agent_version: str = ""

    @property
    def schedulable(self) -> bool:
        """Whether new work may be placed here."""
        return self.liveness.state is Liveness.READY and not self.drained


@dataclass(frozen=True, slots=True)
class Transition:
    """A node changed liveness state; `session` is set when its stream must be closed."""

    node_id: str
    before: Liveness
    after: Liveness
    reason: str
    session: AgentSession | None


class Allocations(Mapping[str, tuple[str, int]]):
    """Which attempt holds each device: the one home of GPU ownership.

    A device is taken when an attempt is placed and given back when the rank on it reports its end,
    or its node is declared DOWN; no device is ever given to two attempts. A rank of an attempt the
    coordinator no longer runs (fenced) holds the devices it may be on until its end is confirmed:
    those holds are kept here too, so nothing new is placed beside it.
    """

    def __init__(self) -> None:
        self._holders: dict[str, tuple[str, int]] = {}
        self._versions: dict[str, int] = {}
        """Node id -> increases whenever a device on it is taken or given back (the scheduler's view cache keys on it)."""
        self._fence_holds: dict[RankKey, tuple[str, tuple[str, ...]]] = {}
        """Fenced rank not yet confirmed gone -> (its node, the devices held for it)."""
        self._fence_holders: dict[str, set[RankKey]] = {}
        """Device uuid -> the fenced ranks it is held for; the device is given back when none is left."""

    def __getitem__(self, uuid: str) -> tuple[str, int]:
        return self._holders[uuid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

    def copy(self) -> dict[str, tuple[str, int]]:
        return dict(self._holders)

    def version(self, node_id: str) -> int:
        return self._versions.get(node_id, 0)

    def changed(self, node_id: str) -> None:
        self._versions[node_id] = self._versions.get(node_id, 0) + 1

    def take(self, uuid: str, holder: tuple[str, int], node_id: str, restoring: bool = False) -> None:
        """Gives `uuid` to `holder`; refuses a device another attempt holds (unless restoring stored attempts,
        where the later attempt wins)."""
        current = self._holders.get(uuid)
        if current is not None and current != holder and not restoring:
            raise AssertionError(f"device {uuid} is held by {current}; refusing to give it to {holder[0]}")
        self._holders[uuid] = holder
        self.changed(node_id)

    def release(self, uuid: str, holder: tuple[str, int], node_id: str) -> bool:
        """Gives `uuid` back if `holder` holds it; returns whether it did."""
        if self._holders.get(uuid) != holder:
            return False
        del self._holders[uuid]
        self.changed(node_id)
        return True

    # -- fence holds --

    @property
    def fencing(self) -> bool:
        return bool(self._fence_holds)

    def fenced(self, key: RankKey) -> bool:
        return key in self._fence_holds

    def fenced_on(self, node_id: str) -> list[RankKey]:
        return [key for key, (held_on, _) in self._fence_holds.items() if held_on == node_id]

    def hold_for_fenced(
        self, key: RankKey, node_id: str, candidates: Iterable[str], known_device: bool
    ) -> tuple[list[str], list[str]]:
        """Holds, for a fenced rank, every candidate device not held by a running attempt. Returns (held,
        devices it may be on that a running attempt holds, when its device was known: a double use)."""
        held, conflicts = [], []
        for candidate in candidates:
            holder = self._holders.get(candidate)
            if holder is None:
                self._holders[candidate] = (key[0], key[1])
            elif candidate not in self._fence_holders:
                if holder != (key[0], key[1]) and known_device:
                    conflicts.append(candidate)
                continue  # held by a running attempt, which gives it back only when its own rank there ends
            self._fence_holders.setdefault(candidate, set()).add(key)
            held.append(candidate)
        if held:
            self._fence_holds[key] = (node_id, tuple(held))
            self.changed(node_id)
        return held, conflicts

    def fence_confirmed(self, node_id: str, key: RankKey) -> bool:
        """A fenced rank is gone: gives back what it held. Returns whether anything was held for it."""
        hold = self._fence_holds.get(key)
        if hold is None or hold[0] != node_id:
            return False
        del self._fence_holds[key]
        for uuid in hold[1]:
            holders = self._fence_holders.get(uuid)
            if holders is None:
                continue
            holders.discard(key)
            if not holders:
                del self._fence_holders[uuid]
                self._holders.pop(uuid, None)
        self.changed(node_id)
        return True


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

    def register(self, register: agent_pb2.Register) -> tuple[NodeRecord, AgentSession, AgentSession | None]:
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
            self.heartbeats.record(wall, wall - heartbeat.sent_time.ToNanoseconds() / 1e9)

    def _judge(self, node: NodeRecord, record: DeviceRecord, now: float) -> None:
        """Re-assesses a device from its latest telemetry, keeping recently unhealthy ones quarantined."""
        sample = record.sample
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

    def state_of(self, node: NodeRecord) -> cluster_pb2.NodeState.ValueType:
        return public_state(node.liveness.state, node.drained, self.busy(node))

    def node_proto(self, node: NodeRecord) -> cluster_pb2.Node:
        message = cluster_pb2.Node(
            node_id=node.node_id,
            state=self.state_of(node),
            hostname=node.hostname,
            addresses=node.addresses,
            heartbeat_interval_seconds=node.liveness.heartbeat_interval,
            last_heartbeat_sequence=node.last_sequence,
            drained=node.drained,
            agent_version=node.agent_version,
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
