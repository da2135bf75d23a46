"""Splitting a job's work items between its ranks, uniformly or by each GPU's relative throughput.

Pure and deterministic: every rank computes the same split from the same inputs (the item count,
every rank's weight, the cap), so ranks need not talk to agree on it. The coordinator tells each rank
every rank's capacity (GPUORCH_DEVICE_CAPACITIES) from DEFAULT_DEVICE_CAPACITY, which its
`[device_capacity]` setting extends or overrides; gpuorch.worker.shard() reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_DEVICE_CAPACITY: dict[str, float] = {
    "B200": 2.0,
    "GH200": 1.2,
    "H200": 1.2,
    "H100": 1.0,
    "H800": 1.0,
    "A100": 0.5,
    "A800": 0.5,
    "L40S": 0.45,
    "L40": 0.35,
    "A40": 0.3,
    "V100": 0.25,
    "A10": 0.2,
    "L4": 0.15,
    "T4": 0.08,
}
"""Relative throughput by GPU model (H100 = 1.0), matched as a case-insensitive substring of the GPU's name,
the longest match winning ("A100" before "A10"). A model matching nothing counts 1.0."""


def capacity_of(model: str, table: Mapping[str, float] = DEFAULT_DEVICE_CAPACITY) -> float:
    """The relative throughput of a GPU by its name, e.g. "NVIDIA A100-SXM4-80GB" -> 0.5."""
    name = model.upper()
    matches = [key for key in table if key.upper() in name]
    return float(table[max(matches, key=len)]) if matches else 1.0


def split_counts(item_count: int, weights: Sequence[float], max_per_rank: int | None = None) -> list[int]:
    """How many of `item_count` items each rank takes, in proportion to its weight, none above `max_per_rank`.

    Largest remainders, ties to the lower rank; what a capped rank cannot take goes to the others by
    their weights. Raises ValueError when the ranks cannot hold every item or a weight is not positive."""
    if item_count < 0:
        raise ValueError(f"item_count must be >= 0, got {item_count}")
    if not weights:
        raise ValueError("there must be at least one rank")
    if any(not weight > 0 for weight in weights):
        raise ValueError(f"every rank's weight must be > 0, got {list(weights)}")
    if max_per_rank is not None:
        if max_per_rank < 0:
            raise ValueError(f"max_per_rank must be >= 0, got {max_per_rank}")
        if max_per_rank * len(weights) < item_count:
            raise ValueError(
                f"{len(weights)} ranks with max_per_rank={max_per_rank} hold {max_per_rank * len(weights)} items, "
                f"fewer than the {item_count} to split"
            )
    counts = [0] * len(weights)
    open_ranks = list(range(len(weights)))
    left = item_count
    while left and open_ranks:
        total = sum(weights[rank] for rank in open_ranks)
        shares = {rank: left * weights[rank] / total for rank in open_ranks}
        given = {rank: int(share) for rank, share in shares.items()}
        rest = left - sum(given.values())
        for rank in sorted(open_ranks, key=lambda rank: (-(shares[rank] - given[rank]), rank))[:rest]:
            given[rank] += 1
        capped = False
        for rank in open_ranks:
            room = max_per_rank - counts[rank] if max_per_rank is not None else given[rank]
            if given[rank] > room:
                given[rank], capped = room, True
        for rank in open_ranks:
            counts[rank] += given[rank]
        left -= sum(given.values())
        if not capped:
            break
        open_ranks = [rank for rank in open_ranks if max_per_rank is None or counts[rank] < max_per_rank]
    return counts


def shard_bounds(item_count: int, rank: int, weights: Sequence[float], max_per_rank: int | None = None) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of the items (ranks in order, each after the one before)."""
    if not 0 <= rank < len(weights):
        raise ValueError(f"rank {rank} is not one of the {len(weights)} ranks")
    counts = split_counts(item_count, weights, max_per_rank)
    start = sum(counts[:rank])
    return start, start + counts[rank]


def parse_capacities(text: str, world_size: int) -> list[float]:
    """GPUORCH_DEVICE_CAPACITIES ("1,1,0.5,0.5": one per global rank) -> weights; ValueError if it is not that."""
    try:
        values = [float(value) for value in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"GPUORCH_DEVICE_CAPACITIES {text[:64]!r} is not a comma-separated list of numbers") from None
    if len(values) != world_size:
        raise ValueError(f"GPUORCH_DEVICE_CAPACITIES has {len(values)} values for {world_size} ranks")
    return values
