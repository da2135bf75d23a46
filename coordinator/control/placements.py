"""What a scheduler decision becomes on the wire: the attempt's Placement (node ranks, first ranks, device
indexes) and its rendezvous port, one not used by another live attempt whose rank 0 is on the same node."""

from __future__ import annotations

import random

from coordinator import scheduler
from coordinator.model.cluster import NodeRecord
from gpuorch.v1 import job_pb2


def placement_of(decision: scheduler.Decision, nodes: dict[str, NodeRecord], port: int) -> job_pb2.Placement:
    """The wire placement of a scheduler decision: node ranks, first ranks, device indexes, the rendezvous."""
    first = nodes[decision.nodes[0].node_id]
    placement = job_pb2.Placement(master_addr=first.addresses[0] if first.addresses else first.hostname, master_port=port)
    rank = 0
    for node_rank, share in enumerate(decision.nodes):
        devices = nodes[share.node_id].devices
        placement.nodes.add(
            node_id=share.node_id,
            node_rank=node_rank,
            device_uuids=share.gpu_uuids,
            first_rank=rank,
            device_indexes=[devices[uuid].info.index for uuid in share.gpu_uuids],
        )
        rank += len(share.gpu_uuids)
    placement.world_size = rank
    return placement


class RendezvousPorts:
    """MASTER_PORTs of attempts not yet over, by the node of their rank 0; new ones drawn from a range."""

    def __init__(self, port_range: tuple[int, int], rng: random.Random) -> None:
        self.port_range = port_range
        self.rng = rng
        """A seeded one makes placements repeatable (the simulator)."""
        self.in_use: dict[str, set[int]] = {}

    def take(self, node_id: str) -> int:
        """A free port for an attempt whose rank 0 runs on `node_id`, marked in use."""
        in_use = self.in_use.setdefault(node_id, set())
        low, high = self.port_range
        while True:
            port = self.rng.randrange(low, high)
            if port not in in_use:
                in_use.add(port)
                return port

    def note(self, node_id: str, port: int) -> None:
        """An attempt restored from the store holds this port."""
        self.in_use.setdefault(node_id, set()).add(port)

    def release(self, node_id: str, port: int) -> None:
        ports = self.in_use.get(node_id)
        if ports is not None:
            ports.discard(port)
