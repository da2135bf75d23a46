"""Pure rules about jobs: what a valid spec is, each rank's environment, and what an exit means.

No I/O here. The job lifecycle that uses them is drawn once, in coordinator/rules/job_machine.py.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Sequence

from coordinator.model.jobs import FINAL_STATES, RankOutcome
from gpuorch.pools import DEFAULT_POOL, pool_name_problem
from gpuorch.v1 import agent_pb2, job_pb2

__all__ = ["FINAL_STATES", "RankOutcome"]

BACKENDS = ("nccl", "gloo")
MAX_GPUS = 4096
MAX_ARGV_BYTES = 64 * 1024
MAX_ENV_BYTES = 128 * 1024
MAX_ENV_VARS = 512
MAX_NAME_LENGTH = 256
MAX_OWNER_LENGTH = 128
MAX_WORKING_DIR_BYTES = 4096
"""Linux's PATH_MAX."""
MAX_TIME_LIMIT_SECONDS = 365 * 86400
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InvalidSpec(ValueError):
    """A JobSpec field is wrong; the message names it."""


def validate_spec(spec: job_pb2.JobSpec) -> None:
    """Raises InvalidSpec naming the first bad field of a submitted spec."""
    if not spec.argv:
        raise InvalidSpec("spec.argv is empty: give the program to run and its arguments")
    if not spec.argv[0]:
        raise InvalidSpec("spec.argv[0] is empty: it must name the program to run")
    argv_bytes = sum(len(arg.encode()) + 1 for arg in spec.argv)
    if argv_bytes > MAX_ARGV_BYTES:
        raise InvalidSpec(f"spec.argv is {argv_bytes} bytes; the limit is {MAX_ARGV_BYTES}")
    if any("\0" in arg for arg in spec.argv):
        raise InvalidSpec("spec.argv contains a NUL character")
    if len(spec.env) > MAX_ENV_VARS:
        raise InvalidSpec(f"spec.env has {len(spec.env)} variables; the limit is {MAX_ENV_VARS}")
    env_bytes = sum(len(key.encode()) + len(value.encode()) + 2 for key, value in spec.env.items())
    if env_bytes > MAX_ENV_BYTES:
        raise InvalidSpec(f"spec.env is {env_bytes} bytes; the limit is {MAX_ENV_BYTES}")
    for key, value in spec.env.items():
        if not ENV_NAME.match(key):
            raise InvalidSpec(
                f"spec.env has an invalid variable name {key[:64]!r} (letters, digits and _, not starting with a digit)"
            )
        if "\0" in value:
            raise InvalidSpec(f"spec.env[{key!r}] contains a NUL character")
    if spec.gpus < 1:
        raise InvalidSpec("spec.gpus must be at least 1")
    if spec.gpus > MAX_GPUS:
        raise InvalidSpec(f"spec.gpus is {spec.gpus}; the limit is {MAX_GPUS}")
    if spec.min_gpus > spec.gpus:
        raise InvalidSpec(f"spec.min_gpus ({spec.min_gpus}) is larger than spec.gpus ({spec.gpus})")
    if spec.gpus_per_node and spec.gpus % spec.gpus_per_node:
        raise InvalidSpec(f"spec.gpus_per_node ({spec.gpus_per_node}) does not divide spec.gpus ({spec.gpus})")
    if spec.backend and spec.backend not in BACKENDS:
        raise InvalidSpec(f"spec.backend {spec.backend[:32]!r} is unknown: use nccl or gloo")
    if len(spec.name) > MAX_NAME_LENGTH:
        raise InvalidSpec(f"spec.name is {len(spec.name)} characters; the limit is {MAX_NAME_LENGTH}")
    if len(spec.owner) > MAX_OWNER_LENGTH:
        raise InvalidSpec(f"spec.owner is {len(spec.owner)} characters; the limit is {MAX_OWNER_LENGTH}")
    if spec.working_dir and not os.path.isabs(spec.working_dir):
        raise InvalidSpec(f"spec.working_dir {spec.working_dir[:128]!r} must be an absolute path")
    if len(spec.working_dir.encode()) > MAX_WORKING_DIR_BYTES:
        raise InvalidSpec(f"spec.working_dir is {len(spec.working_dir.encode())} bytes; the limit is {MAX_WORKING_DIR_BYTES}")
    if "\0" in spec.working_dir:
        raise InvalidSpec("spec.working_dir contains a NUL character")
    if spec.submit_dir and not os.path.isabs(spec.submit_dir):
        raise InvalidSpec(f"spec.submit_dir {spec.submit_dir[:128]!r} must be an absolute path")
    if len(spec.submit_dir.encode()) > MAX_WORKING_DIR_BYTES:
        raise InvalidSpec(f"spec.submit_dir is {len(spec.submit_dir.encode())} bytes; the limit is {MAX_WORKING_DIR_BYTES}")
    if "\0" in spec.submit_dir:
        raise InvalidSpec("spec.submit_dir contains a NUL character")
    problem = pool_name_problem(spec.pool)
    if problem:
        raise InvalidSpec(f"spec.pool: {problem}")
    if spec.time_limit_seconds > MAX_TIME_LIMIT_SECONDS:
        raise InvalidSpec(
            f"spec.time_limit_seconds is {spec.time_limit_seconds}; the limit is {MAX_TIME_LIMIT_SECONDS} (one year)"
        )
    if len(spec.requirements.gpu_model) > MAX_NAME_LENGTH:
        raise InvalidSpec(
            f"spec.requirements.gpu_model is {len(spec.requirements.gpu_model)} characters; the limit is {MAX_NAME_LENGTH}"
        )
    if not (0 <= spec.gpu_memory_fraction <= 1):  # NaN fails both
        raise InvalidSpec(f"spec.gpu_memory_fraction is {spec.gpu_memory_fraction}; it must be in (0, 1], or 0 for no limit")
    if not (0 <= spec.idle_timeout_minutes <= MAX_TIME_LIMIT_SECONDS / 60):
        raise InvalidSpec(f"spec.idle_timeout_minutes is {spec.idle_timeout_minutes}; it must be >= 0 minutes (0 = the pool's)")
    if spec.on_straggler not in job_pb2.StragglerAction.values():
        raise InvalidSpec(f"spec.on_straggler {spec.on_straggler} is unknown: use STRAGGLER_ACTION_RESTART or leave it unset")


def normalized(spec: job_pb2.JobSpec) -> job_pb2.JobSpec:
    """The spec with defaults made explicit, so users see what gpuorch will do, and fields this
    coordinator does not know (from a newer client, or junk) dropped rather than stored."""
    result = job_pb2.JobSpec()
    result.CopyFrom(spec)
    result.DiscardUnknownFields()
    result.backend = spec.backend or "nccl"
    result.min_gpus = spec.min_gpus or spec.gpus
    result.pool = spec.pool or DEFAULT_POOL
    return result


def node_environment(job: job_pb2.Job, placement: job_pb2.Placement, node: job_pb2.NodeAssignment) -> dict[str, str]:
    """What every rank of the job on `node` shares: the job's env, then the torchrun contract.

    CUDA_VISIBLE_DEVICES names the gang's GPUs on the node by uuid, in local-rank
    order: `cuda:LOCAL_RANK` is then the rank's own GPU, and uuids cannot be
    misread the way indexes can (CUDA orders devices fastest-first by default,
    NVML by PCI bus).
    """
    return {**_job_environment(job, placement), **_node_variables(node)}


def _job_environment(job: job_pb2.Job, placement: job_pb2.Placement) -> dict[str, str]:
    """The part of node_environment every node of the placement shares (built once per launch)."""
    spec = job.spec
    env = dict(spec.env)
    world_size, attempt, job_id = str(placement.world_size), job.attempt, job.job_id
    env.update(
        {
            "MASTER_ADDR": placement.master_addr,
            "MASTER_PORT": str(placement.master_port),
            "WORLD_SIZE": world_size,
            "GROUP_WORLD_SIZE": str(len(placement.nodes)),
            "ROLE_WORLD_SIZE": world_size,
            "TORCHELASTIC_RESTART_COUNT": str(max(0, attempt - 1)),
            "TORCHELASTIC_RUN_ID": job_id,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUORCH_JOB_ID": job_id,
            "GPUORCH_ATTEMPT": str(attempt),
            "GPUORCH_BACKEND": spec.backend or "nccl",
        }
    )
    if spec.gpu_memory_fraction:
        env["GPUORCH_GPU_MEMORY_FRACTION"] = f"{spec.gpu_memory_fraction:g}"
    return env


def _node_variables(node: job_pb2.NodeAssignment) -> dict[str, str]:
    """The part of node_environment that differs between the placement's nodes."""
    uuids, node_rank = node.device_uuids, str(node.node_rank)
    return {
        "LOCAL_WORLD_SIZE": str(len(uuids)),
        "NODE_RANK": node_rank,
        "GROUP_RANK": node_rank,
        "CUDA_VISIBLE_DEVICES": ",".join(uuids),
        "GPUORCH_NODE_ID": node.node_id,
    }


def rank_variables(node: job_pb2.NodeAssignment, local_rank: int) -> dict[str, str]:
    """The variables that differ between ranks on one node."""
    return _rank_variables(node.first_rank + local_rank, local_rank)


def _rank_variables(rank: int, local_rank: int) -> dict[str, str]:
    text = str(rank)
    return {"RANK": text, "LOCAL_RANK": str(local_rank), "ROLE_RANK": text}


@functools.lru_cache(maxsize=16384)
def _rank_launch(rank: int, local_rank: int, capacity_text: str) -> agent_pb2.RankLaunch:
    """One rank's part of a launch, built once and copied into each launch that has it (a copy is done in C; filling
    its env map from Python costs twice as much). Never changed: only copied from. `capacity_text` "": none."""
    env = _rank_variables(rank, local_rank)
    if capacity_text:
        env["GPUORCH_DEVICE_CAPACITY"] = capacity_text
    return agent_pb2.RankLaunch(rank=rank, local_rank=local_rank, env=env)


def rank_environment(
    job: job_pb2.Job, placement: job_pb2.Placement, node: job_pb2.NodeAssignment, local_rank: int
) -> dict[str, str]:
    """Everything one rank gets, the same contract as torchrun, so unmodified scripts run."""
    return {**node_environment(job, placement, node), **rank_variables(node, local_rank)}


def launch_envelopes(
    job: job_pb2.Job,
    attempt_env: dict[str, str] | None = None,
    stop_grace_seconds: float = 0.0,
    rank_capacities: Sequence[float] = (),
    dependency_results_json: str = "",
) -> dict[str, agent_pb2.CoordinatorMessage]:
    """The message to each node of the job's current placement, keyed by node id: its LaunchTask.

    `attempt_env` adds what the coordinator knows of this attempt (GPUORCH_RESTART_REASON,
    GPUORCH_CHECKPOINT_DIR); `stop_grace_seconds` is the grace the agent gives a rank at its time limit;
    `rank_capacities` (by rank) each rank's GPU capacity (GPUORCH_DEVICE_CAPACITY, and every rank's in
    GPUORCH_DEVICE_CAPACITIES, for gpuorch.worker.shard); `dependency_results_json` what a dependent job is told
    of its dependencies.

    Built in place inside the message that is sent (wrapping a built LaunchTask copies it whole), its env map filled
    key by key (a map given to a constructor is filled through Python's MutableMapping.update, half again as slow),
    and each rank's part copied from one built before: a launch's maps are most of its cost."""
    placement, spec = job.placement, job.spec
    shared = _job_environment(job, placement)
    shared.update(attempt_env or {})
    capacity_texts: list[str] = []
    if rank_capacities:
        capacity_texts = [f"{capacity:g}" for capacity in rank_capacities]
        shared["GPUORCH_DEVICE_CAPACITIES"] = ",".join(capacity_texts)
    messages = {}
    for node in placement.nodes:
        message = agent_pb2.CoordinatorMessage(
            launch_task=agent_pb2.LaunchTask(
                job_id=job.job_id,
                attempt=job.attempt,
                argv=spec.argv,
                working_dir=spec.working_dir,
                submit_dir=spec.submit_dir,
                pids_max=spec.pids_max,
                memory_max_bytes=spec.memory_max_bytes,
                time_limit_seconds=spec.time_limit_seconds,
                stop_grace_seconds=stop_grace_seconds,
                interactive=spec.interactive,
                owner=spec.owner,
                dependency_results_json=dependency_results_json,
            )
        )
        launch = message.launch_task
        env = launch.env
        for key, value in shared.items():
            env[key] = value
        for key, value in _node_variables(node).items():
            env[key] = value
        ranks, first = launch.ranks, node.first_rank
        for local_rank in range(len(node.device_uuids)):
            rank = first + local_rank
            ranks.add().CopyFrom(_rank_launch(rank, local_rank, capacity_texts[rank] if capacity_texts else ""))
        messages[node.node_id] = message
    return messages


CLEAN_EXIT = RankOutcome(False, "exited with code 0")
"""Most ranks' end: one record for all (a clean exit's description is never shown), not a string per rank."""


def rank_outcome(status: agent_pb2.TaskStatus, node_id: str) -> RankOutcome:
    """What one rank's end means for its attempt."""
    if status.state == agent_pb2.TASK_STATE_EXITED and not (status.exit_code or status.signal or status.time_limited):
        return CLEAN_EXIT
    where = f"rank {status.rank} on node {node_id}"
    if status.time_limited:  # before the exit code: a rank that exits 0 at its SIGTERM still ran out of time
        return RankOutcome(
            True, f"{where} was stopped at the job's time limit" + (f" ({status.message})" if status.message else "")
        )
    if status.state == agent_pb2.TASK_STATE_FAILED_TO_START:
        return RankOutcome(True, f"{where} failed to start: {status.message}")
    if status.state == agent_pb2.TASK_STATE_REJECTED:
        return RankOutcome(True, f"{where} was rejected by its agent: {status.message}")
    if status.signal:
        return RankOutcome(
            True, f"{where} was killed by signal {status.signal}" + (f" ({status.message})" if status.message else "")
        )
    if status.exit_code != 0:
        return RankOutcome(True, f"{where} exited with code {status.exit_code}")
    return RankOutcome(False, f"{where} exited with code 0")


def tail_lines_scan(data: bytes, data_offset: int, lines_left: int, at_end: bool) -> tuple[int | None, int]:
    """One step of finding where the last N lines of a log begin, reading it backwards in chunks.

    `data` is the chunk at byte `data_offset` of the log, `at_end` says it runs to the log's end
    (the first chunk read), `lines_left` how many lines are still to be counted. Returns (the byte
    offset where the wanted lines begin, 0) once found, or (None, lines still to count) when the chunk
    before this one must be read next. The log's start is always a line start; the newline that ends
    the log starts no line, and a last line without its newline counts as a line.
    """
    end = len(data) - 1 if at_end and data.endswith(b"\n") else len(data)
    while lines_left > 0:
        newline = data.rfind(b"\n", 0, end)
        if newline < 0:
            return (0, 0) if data_offset == 0 else (None, lines_left)
        lines_left -= 1
        end = newline
        if lines_left == 0:
            return data_offset + newline + 1, 0
    return data_offset + len(data), 0


JOB_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
JOB_ID_RANDOM_CHARACTERS = 6
"""30 random bits in every job id, so that no one can name (and plant a checkpoint directory for) the next job."""


def new_job_id(sequence: int) -> str:
    """`j-<sequence>-<random>`, e.g. j-000123-k7f3q2: ordered and readable by its sequence, unguessable by the rest."""
    bits = secrets.randbits(5 * JOB_ID_RANDOM_CHARACTERS)  # one read of the OS's randomness, not one per character
    suffix = "".join(JOB_ID_ALPHABET[(bits >> (5 * index)) & 31] for index in range(JOB_ID_RANDOM_CHARACTERS))
    return f"j-{sequence:06d}-{suffix}"
