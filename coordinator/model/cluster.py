"""The cluster as the coordinator holds it in memory: node and device records, agent sessions,
liveness transitions, and the device allocations. Plain data; the rules that change it are in
coordinator/rules/ (liveness.py, health.py, job_machine.py) and coordinator/control/cluster_view.py
applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from coordinator.model.jobs import RankKey
from coordinator.model.node_state import HEALTHY, DeviceHealth, Liveness, NodeLiveness
from coordinator.model.telemetry import TelemetryHistory
from gpuorch.v1 import agent_pb2, cluster_pb2


def public_state(state: Liveness, drained: bool, busy: bool) -> cluster_pb2.NodeState:
    """The NodeState operators see: liveness first, then the operator's drain."""
    if state is Liveness.SUSPECT:
        return cluster_pb2.NODE_STATE_SUSPECT
    if state is Liveness.DOWN:
        return cluster_pb2.NODE_STATE_DOWN
    if drained:
        return cluster_pb2.NODE_STATE_DRAINING if busy else cluster_pb2.NODE_STATE_DRAINED
    return cluster_pb2.NODE_STATE_READY


class Session(Protocol):
    """One agent stream, as the records see it (control/node_links.AgentSession is the one there is)."""

    node_id: str
    session_id: int
    close_reason: str | None

    def send(self, message: agent_pb2.CoordinatorMessage) -> None: ...

    def close(self, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class DeviceRecord:
    info: cluster_pb2.DeviceInfo
    history: TelemetryHistory
    memory_total: int = 0
    """info.memory_total_bytes, read once (message fields are slow to read in loops over every GPU)."""
    sample: tuple | None = None
    """Latest telemetry as a tuple in SAMPLE_FIELDS order; None before the first heartbeat."""
    health: DeviceHealth = HEALTHY
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
    session: Session | None = None
    drained: bool = False
    drain_reason: str = ""
    agent_version: str = ""
    pool: str = "default"
    """The node pool the agent registered with (its --pool)."""

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
    session: Session | None


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

    def __contains__(self, uuid: object) -> bool:
        # Mapping's own goes through __getitem__ and a caught KeyError, ~20x slower than the dict's; the
        # scheduler's node views ask `uuid in allocations` for every GPU of every node whose allocation changed.
        return uuid in self._holders

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
        versions = self._versions  # inline `changed`: taken and given back once per rank
        versions[node_id] = versions.get(node_id, 0) + 1

    def release(self, uuid: str, holder: tuple[str, int], node_id: str) -> bool:
        """Gives `uuid` back if `holder` holds it; returns whether it did."""
        if self._holders.get(uuid) != holder:
            return False
        del self._holders[uuid]
        versions = self._versions
        versions[node_id] = versions.get(node_id, 0) + 1
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
