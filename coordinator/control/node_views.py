"""The scheduler's view of every node, cached between passes.

A pass asks for every node's view; building 16,000 GPU views from the cluster's records each pass
would cost more than the pass. Each GPU's two possible views (free, taken) are built once per
telemetry refresh or health change; an allocation change only re-picks between them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.model.cluster import NodeRecord
from coordinator.model.telemetry import GPU_UTILIZATION, MEMORY_USED, SAMPLE_FIELDS, TEMPERATURE

TELEMETRY_REFRESH_SECONDS = 5.0
"""A node's cached scheduler view is rebuilt for fresher telemetry at most this often (scores need
trends, not every sample); allocation, health and drain changes rebuild it at once."""
IDLE_SAMPLE = (0,) * len(SAMPLE_FIELDS)
"""What the scheduler assumes of a GPU that has not reported telemetry yet."""


@dataclass(eq=False)
class _CachedView:
    key: tuple
    """What the GPU views were built from: the node record, schedulable, health version, telemetry epoch."""
    pairs: list[tuple[str, scheduler.GpuView, scheduler.GpuView]]
    allocation_version: int
    view: scheduler.NodeView | None


class NodeViewCache:
    """Node id -> its cached views."""

    def __init__(self) -> None:
        self._cached: dict[str, _CachedView] = {}

    def views(self, cluster: ClusterView, monotonic_now: float) -> list[scheduler.NodeView]:
        """The scheduler's view of every node of the cluster now."""
        telemetry_epoch = int(monotonic_now // TELEMETRY_REFRESH_SECONDS)
        allocations = cluster.allocations
        held = allocations.held
        views = []
        for node in cluster.nodes.values():
            allocation_version = allocations.version(node.node_id)
            key = (id(node), node.schedulable, node.health_version, telemetry_epoch if node.last_sequence else 0)
            cached = self._cached.get(node.node_id)
            if cached is None or cached.key != key:
                cached = self._cached[node.node_id] = _CachedView(key, gpu_view_pairs(node), -1, None)
            elif cached.allocation_version == allocation_version and cached.view is not None:
                views.append(cached.view)
                continue
            cached.view = scheduler.NodeView(
                node_id=node.node_id,
                schedulable=node.schedulable,
                pool=node.pool,
                gpus=tuple(taken if uuid in held else free for uuid, free, taken in cached.pairs),
            )
            cached.allocation_version = allocation_version
            views.append(cached.view)
        return views


def gpu_view_pairs(node: NodeRecord) -> list[tuple[str, scheduler.GpuView, scheduler.GpuView]]:
    """(uuid, view when free, view when taken) for every GPU of the node."""
    pairs = []
    for uuid, record in node.devices.items():
        sample = record.sample or IDLE_SAMPLE
        free = scheduler.GpuView(
            uuid=uuid,
            index=record.info.index,
            model=record.info.name,
            memory_total_bytes=record.memory_total,
            memory_used_bytes=sample[MEMORY_USED],
            utilization_percent=sample[GPU_UTILIZATION],
            temperature_celsius=sample[TEMPERATURE],
            healthy=record.health.healthy,
            free=True,
        )
        pairs.append((uuid, free, replace(free, free=False)))
    return pairs
