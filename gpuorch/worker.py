"""Helpers imported inside a rank process. torch is imported here, never by the daemons.

gpuorch gives every rank the same environment as torchrun (MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
CUDA_VISIBLE_DEVICES) plus GPUORCH_JOB_ID, GPUORCH_ATTEMPT and
GPUORCH_BACKEND, so a plain `torch.distributed.init_process_group("nccl")`
works; these helpers add the defaults a job usually wants.

    from gpuorch import worker
    rank, world_size = worker.init_process_group()
    device = worker.device()
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import numbers
import operator
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gpuorch.arrays import MAX_RESULT_BYTES
from gpuorch.sharding import parse_capacities, shard_bounds

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 600.0


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def local_rank() -> int:
    return _int_env("LOCAL_RANK", 0)


def job_id() -> str:
    return os.environ.get("GPUORCH_JOB_ID", "")


def attempt() -> int:
    return _int_env("GPUORCH_ATTEMPT", 1)


def backend() -> str:
    """The job's backend: GPUORCH_BACKEND, else nccl when CUDA is usable, else gloo (e.g. under torchrun on a CPU)."""
    chosen = os.environ.get("GPUORCH_BACKEND")
    if chosen:
        return chosen
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def gpu_memory_fraction() -> float | None:
    """The share of its GPU's memory this rank may allocate (GPUORCH_GPU_MEMORY_FRACTION, --gpu-memory-fraction);
    None when the job set no budget. ValueError for a value outside (0, 1]."""
    value = os.environ.get("GPUORCH_GPU_MEMORY_FRACTION", "")
    if not value:
        return None
    fraction = float(value)
    if not 0 < fraction <= 1:
        raise ValueError(f"GPUORCH_GPU_MEMORY_FRACTION must be in (0, 1], got {value!r}")
    return fraction


_budgeted_devices: set[int] = set()


def _apply_memory_budget(torch: Any, index: int) -> None:
    """Caps this process's CUDA allocator on the device at the job's fraction, once per device. A rank over it
    fails with CUDA's out-of-memory error: an exit like any other, restarted (or not) as its job says."""
    fraction = gpu_memory_fraction()
    if fraction is not None and index not in _budgeted_devices:
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        _budgeted_devices.add(index)


def device():
    """This rank's torch device: cuda:LOCAL_RANK when the rank has a GPU (with the job's memory budget applied),
    else the CPU."""
    import torch

    if torch.cuda.is_available():
        _apply_memory_budget(torch, local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_process_group(backend_name: str | None = None, timeout_seconds: float | None = None) -> tuple[int, int]:
    """Initialises torch.distributed from the environment gpuorch (or torchrun) set; returns (rank, world size).

    Selects the rank's GPU first, so NCCL binds each rank to its own device. The
    timeout (GPUORCH_TIMEOUT_SECONDS, default 600 s) bounds how long a collective or
    the rendezvous may hang before the rank fails instead of hanging forever.
    """
    import torch
    import torch.distributed as dist

    chosen = backend_name or backend()
    timeout = timeout_seconds or float(os.environ.get("GPUORCH_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_SECONDS))
    if chosen == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        _apply_memory_budget(torch, local_rank())
    options: dict[str, Any] = {}
    if chosen == "nccl" and torch.cuda.is_available():
        options["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend=chosen, init_method="env://", timeout=datetime.timedelta(seconds=timeout), **options)
    return dist.get_rank(), dist.get_world_size()


def checkpoint_dir() -> str:
    """GPUORCH_CHECKPOINT_DIR: the same directory for every attempt of the job, to resume from."""
    return os.environ.get("GPUORCH_CHECKPOINT_DIR", "")


@dataclass(frozen=True)
class RestartReason:
    """Why this attempt was started, parsed from GPUORCH_RESTART_REASON.

    kind is "" for a first attempt, else "rank_exit", "rank_start", "node_down", "gpu_unhealthy", "hang",
    "launch_timeout" (node_id: where a rank of the attempt before did not start in time),
    "straggler" (a rank's GPU held the gang back; this attempt runs without it), or "preempted" (the attempt
    before was preempted for higher-priority work: resume from your checkpoint).
    """

    kind: str = ""
    rank: int | None = None
    exit_code: int | None = None
    """The failed rank's exit code (128+N for signal N), for rank_exit."""
    node_id: str = ""
    gpu_uuid: str = ""
    raw: str = ""

    @property
    def is_restart(self) -> bool:
        return bool(self.kind)

    @property
    def preempted(self) -> bool:
        """The attempt before was preempted (not a failure: it used no restart of max_restarts)."""
        return self.kind == "preempted"


def restart_reason() -> RestartReason:
    """Why this attempt runs, so a workload can adapt (e.g. halve its batch size after an OOM exit)."""
    raw = os.environ.get("GPUORCH_RESTART_REASON", "")
    kind, _, rest = raw.partition(":")
    if kind == "rank_exit":
        rank, _, code = rest.partition(":")
        return RestartReason(kind, rank=int(rank), exit_code=int(code), raw=raw)
    if kind == "rank_start":
        return RestartReason(kind, rank=int(rest), raw=raw)
    if kind in ("node_down", "launch_timeout"):
        return RestartReason(kind, node_id=rest, raw=raw)
    if kind in ("gpu_unhealthy", "straggler"):
        return RestartReason(kind, gpu_uuid=rest, raw=raw)
    return RestartReason(kind, raw=raw)


_stop_requested = threading.Event()


def stop_on_sigterm() -> threading.Event:
    """Turns SIGTERM into a request to stop: the returned event is set and the process goes on. gpuorch stops
    a rank with SIGTERM, then SIGKILL after a grace: `preemption_grace_seconds` (30 s by default) when the job
    is preempted for higher-priority work, `stop_grace_period` otherwise. Check the event between steps; when it
    is set, write a checkpoint into checkpoint_dir() and exit (examples/preemptible.py)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _stop_requested.set())
    return _stop_requested


MAX_SCALARS = 16
"""Most scalars one report may carry (heartbeats stay small)."""
MAX_SCALAR_NAME = 64


@dataclass
class _Progress:
    """This rank's steps since its last write (one rank per process)."""

    last_write: float = 0.0
    """Monotonic time of the last write; 0 = none yet."""
    step: int = 0
    samples: int = 0
    window_start: float = 0.0
    """Monotonic time the current window began (the last write, or the first call)."""
    window_first_step: int = 0
    compute_seconds: float = 0.0
    """Seconds spent inside compute() during the current window."""
    timed: bool = False
    """compute() was used in the current window: its time is the step time."""
    scalars: dict[str, float] | None = None
    """The scalars of the latest call that passed any: written with every report until newer ones come."""


_progress = _Progress()


@contextlib.contextmanager
def compute() -> Iterator[None]:
    """Times this rank's own compute for report_progress(): wrap the step's work, not its collectives.

    In a gang that all-reduces every step, each rank waits for the slowest, so every rank's wall time per
    step is the same; the time inside compute() is what tells a slow GPU (a straggler) from its peers."""
    started = time.monotonic()
    try:
        yield
    finally:
        _progress.compute_seconds += time.monotonic() - started
        _progress.timed = True


def _checked_scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    if len(scalars) > MAX_SCALARS:
        raise ValueError(f"report_progress takes at most {MAX_SCALARS} scalars, got {len(scalars)}")
    checked = {}
    for name, value in scalars.items():
        if len(name) > MAX_SCALAR_NAME:
            raise ValueError(f"scalar name {name[:32]!r}... is longer than {MAX_SCALAR_NAME} characters")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats and ints too
            raise TypeError(f"scalar {name!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"scalar {name!r} must be finite, got {value}")
        checked[name] = float(value)
    return checked


def _count(name: str, value: Any) -> int:
    """A step or sample count as an int >= 0 (numpy's ints too); TypeError/ValueError naming it otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} (the write interval is min_interval_seconds=...)") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


def report_progress(step: int | None = None, samples: int | None = None, *, min_interval_seconds: float = 1.0,
                    **scalars: float) -> None:  # fmt: skip
    """Tells gpuorch this rank made progress: call it once a step. Local and cheap: no network, and at most one
    small file write per `min_interval_seconds` (GPUORCH_PROGRESS_FILE, which the agent reads for its heartbeats).

    `step`: the step reached (default: the number of calls); `samples`: samples this step processed (summed);
    keyword scalars (e.g. loss=0.12, at most 16, numbers only): rank 0's latest are shown on the job (a call without
    any keeps the last ones). The step time is
    the time inside compute() when the rank uses it, else the wall time between calls. A job with a progress
    timeout is restarted (reason "hang") when no rank reported progress for that long; stragglers and
    throughput come from the step times. Outside gpuorch it does nothing."""
    path = os.environ.get("GPUORCH_PROGRESS_FILE")
    if not path:
        return
    step = _count("step", step) if step is not None else None
    samples = _count("samples", samples) if samples is not None else None
    checked = _checked_scalars(scalars) if scalars else {}
    now, state = time.monotonic(), _progress
    if not state.window_start:
        state.window_start = now
    state.step = step if step is not None else state.step + 1
    state.samples += samples or 0
    if checked:
        state.scalars = checked
    if state.last_write and now - state.last_write < min_interval_seconds:
        return
    steps = state.step - state.window_first_step
    spent = state.compute_seconds if state.timed else now - state.window_start
    document: dict[str, Any] = {"step": state.step, "samples": state.samples, "step_seconds": spent / steps if steps > 0 else 0.0}
    if state.scalars:
        document["scalars"] = state.scalars
    state.last_write, state.window_start, state.window_first_step = now, now, state.step
    state.compute_seconds, state.timed = 0.0, False
    # Rewritten in place (the agent made the file, the directory is the agent's): one small write, whose mtime is
    # the progress stamp; a reader that catches it half-written keeps what it read before.
    try:
        with open(path, "r+") as file:
            file.write(json.dumps(document, separators=(",", ":")))
            file.truncate()
    except FileNotFoundError:
        with open(path, "w") as file:
            file.write(json.dumps(document, separators=(",", ":")))


# -- arrays, results and shares of work --------------------------------------------------------------


def array_index() -> int | None:
    """This task's index in its job array (GPUORCH_ARRAY_INDEX); None outside an array."""
    value = os.environ.get("GPUORCH_ARRAY_INDEX", "")
    return int(value) if value else None


def report_result(result: Mapping[str, Any]) -> None:
    """Reports this rank's result, a JSON object of at most 64 KiB, e.g. {"loss": 0.12, "lr": 3e-4}: stored with
    the task when the rank exits (rank 0's wins), shown by `gpuctl results ARRAY`, and handed to jobs that run
    `--after` this one (GPUORCH_DEPENDENCY_RESULTS). A later call replaces an earlier one. Raises TypeError for
    what is not a JSON object, ValueError when it is larger than 64 KiB; outside gpuorch it does nothing."""
    if not isinstance(result, Mapping):
        raise TypeError(f"report_result wants a mapping (a JSON object), got {type(result).__name__}")
    text = json.dumps(dict(result), allow_nan=False, separators=(",", ":"))
    size = len(text.encode())
    if size > MAX_RESULT_BYTES:
        raise ValueError(f"the result is {size} bytes as JSON; the limit is {MAX_RESULT_BYTES} (64 KiB)")
    path = os.environ.get("GPUORCH_RESULT_FILE")
    if not path:
        return
    # The agent made the file for this rank (its directory is the agent's): rewritten in place; read once the rank ended.
    with open(path, "w") as file:
        file.write(text)


def dependency_results() -> dict[str, Any]:
    """What GPUORCH_DEPENDENCY_RESULTS holds (the results of the jobs this one ran --after): {"dependencies":
    [...], "results": [{"job_id", "array_id", "index", "state", "result"}, ...], "truncated": bool}. Empty outside."""
    path = os.environ.get("GPUORCH_DEPENDENCY_RESULTS", "")
    if not path:
        return {}
    with open(path) as file:
        return json.load(file)


def device_capacity() -> float:
    """This rank's GPU's relative throughput (GPUORCH_DEVICE_CAPACITY, H100 = 1.0); 1.0 when not told."""
    return float(os.environ.get("GPUORCH_DEVICE_CAPACITY") or 1.0)


def shard(items: Iterable[T], by: str = "uniform", max_per_rank: int | None = None) -> list[T]:
    """This rank's share of `items`: a contiguous slice, the same split on every rank (deterministic).

    by="uniform": equal shares (they differ by at most one). by="capacity": shares in proportion to each rank's
    GPU throughput (GPUORCH_DEVICE_CAPACITIES), so ranks on mixed GPUs finish at about the same time; without
    that variable (outside gpuorch) every rank counts 1.0. `max_per_rank` caps every share; what a capped
    rank cannot take goes to the others (ValueError if the ranks cannot hold every item)."""
    if by not in ("uniform", "capacity"):
        raise ValueError(f"shard(by={by!r}): use 'uniform' or 'capacity'")
    every = list(items)
    rank, world_size = _int_env("RANK", 0), _int_env("WORLD_SIZE", 1)
    capacities = os.environ.get("GPUORCH_DEVICE_CAPACITIES", "")
    weights = parse_capacities(capacities, world_size) if by == "capacity" and capacities else [1.0] * world_size
    start, end = shard_bounds(len(every), rank, weights, max_per_rank)
    return every[start:end]
