"""Why a job waits, or can never run, in one line for operators, naming the numbers."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from coordinator.scheduler.capacity import _Pool
from coordinator.scheduler.types import JobRequest, NodeView

_GIB = 1 << 30
_MIB = 1 << 20
_MAX_NAMES = 8
DEFAULT_POOL = "default"


# --- reasons ------------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_bytes(n: int) -> str:
    unit, name = (_GIB, "GiB") if n >= _GIB else (_MIB, "MiB")
    value = n / unit
    return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"


def _requirements(job: JobRequest) -> str:
    text = f" in pool {job.pool!r}" if job.pool != DEFAULT_POOL else ""
    if job.min_memory_per_gpu_bytes > 0:
        text += f" with >= {_fmt_bytes(job.min_memory_per_gpu_bytes)}"
    if job.gpu_model:
        text += f" matching {job.gpu_model!r}"
    if job.excluded_gpus:
        text += f" other than the {_plural(len(job.excluded_gpus), 'GPU')} it straggled on"
    return text


def _names(ids: Sequence[str]) -> str:
    if len(ids) <= _MAX_NAMES:
        return ", ".join(ids)
    return f"{', '.join(ids[:_MAX_NAMES])} and {len(ids) - _MAX_NAMES} more"


def _invalid(job: JobRequest) -> str | None:
    if job.gpus <= 0:
        return f"asks for {job.gpus} GPUs; needs at least 1"
    if job.gpus_per_node < 0:
        return f"gpus_per_node is {job.gpus_per_node}; must be 0 (any) or positive"
    if job.gpus_per_node and job.gpus % job.gpus_per_node:
        return f"gpus ({job.gpus}) is not a multiple of gpus_per_node ({job.gpus_per_node})"
    return None


def _capacity_reason(job: JobRequest, pool: _Pool, known_pools: Collection[str] = ()) -> str:
    if job.pool not in known_pools and known_pools:
        return (
            f"asks for pool {job.pool!r}, which no registered node is in "
            f"(known pools: {_names(sorted(known_pools))}); it waits for an agent started with --pool {job.pool}"
        )
    req = _requirements(job)
    k = job.gpus_per_node
    if k:
        n = job.gpus // k
        free_nodes = pool.nodes_with_free(k) + sum(1 for c in pool.held.values() if c >= k)
        has = "node has" if free_nodes == 1 else "nodes have"
        head = f"needs {_plural(k, 'GPU')} per node on {_plural(n, 'node')}{req}; "
        exist_nodes = pool.nodes_with_exist(k)
        if exist_nodes < n:
            has_all = "node has" if exist_nodes == 1 else "nodes have"
            return head + f"only {exist_nodes} {has_all} {k} at all ({free_nodes} with {k} free)"
        return head + f"only {free_nodes} {has} {k} free"
    free = pool.total_free + pool.held_free()
    return (
        f"needs {_plural(job.gpus, 'GPU')}{req}; {free} {'is' if free == 1 else 'are'} free, "
        f"{pool.exist_total} {'exists' if pool.exist_total == 1 else 'exist'}"
    )


# --- capacity at submit ---------------------------------------------------------------------------------


def request_of_spec(spec: Any) -> JobRequest:
    """The scheduler's view of a submitted JobSpec (gpuorch.v1.JobSpec), before it has an id."""
    return JobRequest(
        job_id="",
        gpus=spec.gpus,
        gpus_per_node=spec.gpus_per_node,
        min_memory_per_gpu_bytes=spec.requirements.min_memory_per_gpu_bytes,
        gpu_model=spec.requirements.gpu_model,
        pool=spec.pool or DEFAULT_POOL,
    )


def too_big_for_cluster(job: JobRequest, nodes: Sequence[NodeView]) -> str | None:
    """Why `job` can never run on the known cluster, naming the numbers; None if it could, or if no
    node has registered yet (a coordinator that just started knows nothing of its cluster).

    Capacity is every GPU of every registered node, whatever its state: unhealthy GPUs, drained,
    SUSPECT and DOWN nodes count, because they may come back; only the job's own requirements
    (model, minimum memory, GPUs per node) narrow the pool. So this refuses what no repair or
    resume could ever place, and the scheduler's pending reason covers what waits for capacity.
    Only the job's node pool counts; a pool no node has registered in is not refused (its nodes
    may not have started yet): the job waits with a reason naming the known pools.
    """
    nodes = [node for node in nodes if node.pool == job.pool]
    if not nodes or job.gpus <= 0 or job.gpus_per_node < 0 or (job.gpus_per_node and job.gpus % job.gpus_per_node):
        return None  # no cluster known yet, or a spec validation will refuse with its own reason
    model = job.gpu_model.lower()
    eligible = [
        sum(
            1
            for g in node.gpus
            if g.memory_total_bytes >= job.min_memory_per_gpu_bytes and (not model or model in g.model.lower())
        )
        for node in nodes
    ]
    total, req, k = sum(eligible), _requirements(job), job.gpus_per_node
    if k:
        wide_enough = sum(1 for count in eligible if count >= k)
        if wide_enough < job.gpus // k:
            widest = max(eligible)
            return (
                f"needs {_plural(k, 'GPU')}{req} per node on {_plural(job.gpus // k, 'node')}, "
                f"but only {wide_enough} of the {_plural(len(nodes), 'known node')} "
                f"{'has' if wide_enough == 1 else 'have'} {k} (the most on one node is {widest})"
            )
        return None
    if total < job.gpus:
        all_gpus = sum(len(node.gpus) for node in nodes)
        of_which = "" if total == all_gpus else f" of {all_gpus}"
        have = "has" if len(nodes) == 1 else "have"
        such = " such" if req else ""
        return (
            f"needs {_plural(job.gpus, 'GPU')}{req}, "
            f"but the {_plural(len(nodes), 'known node')} {have} {total}{of_which}{such} GPUs in all"
        )
    return None
