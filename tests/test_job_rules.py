"""Pure job rules: spec validation, the rank environment contract, what an exit means."""

from __future__ import annotations

import re

import pytest

from coordinator.rules import job_rules as jobs
from gpuorch.v1 import agent_pb2, job_pb2


def spec(**fields) -> job_pb2.JobSpec:
    base = {"argv": ["python", "train.py"], "gpus": 4}
    base.update(fields)
    return job_pb2.JobSpec(**base)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"argv": []}, "spec.argv is empty"),
        ({"argv": [""]}, "spec.argv[0] is empty"),
        ({"argv": ["x" * 70_000]}, "spec.argv is 70001 bytes; the limit is 65536"),
        ({"gpus": 0}, "spec.gpus must be at least 1"),
        ({"gpus": 5000}, "spec.gpus is 5000; the limit is 4096"),
        ({"min_gpus": 8}, "spec.min_gpus (8) is larger than spec.gpus (4)"),
        ({"gpus_per_node": 3}, "spec.gpus_per_node (3) does not divide spec.gpus (4)"),
        ({"backend": "mpi"}, "spec.backend 'mpi' is unknown: use nccl or gloo"),
        ({"env": {"1BAD": "x"}}, "invalid variable name '1BAD'"),
        ({"env": {f"V{i}": "x" for i in range(600)}}, "spec.env has 600 variables; the limit is 512"),
        ({"env": {"BIG": "x" * 200_000}}, "spec.env is 200005 bytes; the limit is 131072"),
        ({"working_dir": "relative/dir"}, "must be an absolute path"),
        ({"working_dir": "/" + "d" * 5000}, "spec.working_dir is 5001 bytes; the limit is 4096"),
        ({"working_dir": "/tmp/\0x"}, "spec.working_dir contains a NUL character"),
        ({"name": "n" * 300}, "spec.name is 300 characters"),
        ({"submit_dir": "home/al"}, "spec.submit_dir 'home/al' must be an absolute path"),
        ({"submit_dir": "/" + "d" * 5000}, "spec.submit_dir is 5001 bytes; the limit is 4096"),
        ({"submit_dir": "/tmp/\0x"}, "spec.submit_dir contains a NUL character"),
    ],
)
def test_invalid_specs_name_the_field(fields, message):
    with pytest.raises(jobs.InvalidSpec) as caught:
        jobs.validate_spec(spec(**fields))
    assert message in str(caught.value)


def with_unknown_field(base: job_pb2.JobSpec, size: int) -> job_pb2.JobSpec:
    """`base` carrying a field this coordinator does not know (number 999, `size` bytes), as a newer client might send."""
    tag_and_length = bytes([0xBA, 0x3E]) + _varint(size)  # field 999, length-delimited
    result = job_pb2.JobSpec()
    result.ParseFromString(base.SerializeToString() + tag_and_length + b"u" * size)
    return result


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_unknown_fields_are_not_kept():
    """Every field a spec has is bounded; one it does not have could carry anything, so it is dropped."""
    large = with_unknown_field(spec(), 600_000)
    kept = jobs.normalized(large)
    assert kept.ByteSize() < 100 and list(kept.argv) == ["python", "train.py"]
    jobs.validate_spec(kept)


def test_valid_spec_passes_and_defaults_are_made_explicit():
    jobs.validate_spec(spec(gpus_per_node=2, backend="gloo", env={"A": "1"}, working_dir="/tmp"))
    normalized = jobs.normalized(spec())
    assert normalized.backend == "nccl" and normalized.min_gpus == 4


def placed_job() -> job_pb2.Job:
    job = job_pb2.Job(job_id="j-000007", spec=spec(env={"USER_VAR": "u", "RANK": "ignored"}, backend="gloo"), attempt=2)
    job.placement.master_addr = "10.0.0.1"
    job.placement.master_port = 29500
    job.placement.world_size = 4
    job.placement.nodes.add(node_id="a", node_rank=0, device_uuids=["GPU-a3", "GPU-a1"], first_rank=0, device_indexes=[3, 1])
    job.placement.nodes.add(node_id="b", node_rank=1, device_uuids=["GPU-b0", "GPU-b2"], first_rank=2, device_indexes=[0, 2])
    return job


def test_rank_environment_is_torchruns_contract():
    job = placed_job()
    env = jobs.rank_environment(job, job.placement, job.placement.nodes[1], local_rank=1)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == "4" and env["RANK"] == "3" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["NODE_RANK"] == "1" and env["GROUP_RANK"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-b0,GPU-b2", "the gang's GPUs on the node, in local-rank order"
    assert env["GPUORCH_JOB_ID"] == "j-000007" and env["GPUORCH_ATTEMPT"] == "2" and env["GPUORCH_BACKEND"] == "gloo"
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert env["USER_VAR"] == "u" and env["RANK"] == "3", "gpuorch's variables win over the user's"


def launch_tasks(job, *args) -> dict:
    """Each node's LaunchTask, out of the messages sent."""
    return {node_id: message.launch_task for node_id, message in jobs.launch_envelopes(job, *args).items()}


def test_launch_messages_cover_every_rank_once():
    launches = launch_tasks(placed_job())
    assert sorted(launches) == ["a", "b"]
    ranks = sorted(rank.rank for launch in launches.values() for rank in launch.ranks)
    assert ranks == [0, 1, 2, 3]
    assert [r.local_rank for r in launches["a"].ranks] == [0, 1]
    merged = {**launches["b"].env, **launches["b"].ranks[1].env}
    assert merged == jobs.rank_environment(placed_job(), placed_job().placement, placed_job().placement.nodes[1], 1)
    assert launches["b"].attempt == 2 and list(launches["b"].argv) == ["python", "train.py"]


def test_every_rank_of_every_launch_gets_its_own_environment_and_capacity_however_often_launches_are_built():
    """Ranks' parts are copied from ones built before: two jobs' launches must not share or mix them."""
    job = placed_job()
    capacities = [1.0, 0.5, 2.0, 1.0]
    attempt_env = {"GPUORCH_RESTART_REASON": "rank_exit"}
    for _ in range(2):  # the second time from the parts built the first time
        envelopes = jobs.launch_envelopes(job, attempt_env, 5.0, capacities)
        for node in job.placement.nodes:
            launch = envelopes[node.node_id].launch_task
            assert [rank.rank for rank in launch.ranks] == [node.first_rank + i for i in range(len(node.device_uuids))]
            for local_rank, rank in enumerate(launch.ranks):
                expected = {
                    **jobs.rank_environment(job, job.placement, node, local_rank),
                    **attempt_env,
                    "GPUORCH_DEVICE_CAPACITIES": "1,0.5,2,1",
                    "GPUORCH_DEVICE_CAPACITY": f"{capacities[rank.rank]:g}",
                }
                assert {**launch.env, **rank.env} == expected
                assert rank.local_rank == local_rank
    plain = launch_tasks(job)  # no capacities: no capacity variables
    assert all("GPUORCH_DEVICE_CAPACITY" not in rank.env for launch in plain.values() for rank in launch.ranks)
    envelopes["a"].launch_task.ranks[0].env["RANK"] = "changed by a caller"
    assert launch_tasks(job)["a"].ranks[0].env["RANK"] == "0", "a launch's ranks are its own copies"


@pytest.mark.parametrize(
    "status, failed, text",
    [
        (dict(state=agent_pb2.TASK_STATE_EXITED, exit_code=0), False, "exited with code 0"),
        (dict(state=agent_pb2.TASK_STATE_EXITED, exit_code=3), True, "rank 1 on node n2 exited with code 3"),
        (dict(state=agent_pb2.TASK_STATE_EXITED, signal=9), True, "killed by signal 9"),
        (
            dict(state=agent_pb2.TASK_STATE_FAILED_TO_START, message="cannot execute 'x'"),
            True,
            "failed to start: cannot execute 'x'",
        ),
        (dict(state=agent_pb2.TASK_STATE_REJECTED, message="stale"), True, "rejected by its agent: stale"),
    ],
)
def test_rank_outcome(status, failed, text):
    outcome = jobs.rank_outcome(agent_pb2.TaskStatus(rank=1, **status), "n2")
    assert outcome.failed is failed and text in outcome.description


def test_launch_messages_carry_the_submit_dir_and_the_limits():
    job = placed_job()
    job.spec.submit_dir = "/home/al/exp"
    job.spec.pids_max = 512
    job.spec.memory_max_bytes = 64 * 1024**3
    for launch in launch_tasks(job).values():
        assert launch.submit_dir == "/home/al/exp" and launch.working_dir == ""
        assert launch.pids_max == 512 and launch.memory_max_bytes == 64 * 1024**3


def _tail_by_chunks(log: bytes, lines: int, chunk: int) -> bytes:
    """What GetJobLogs does with tail_lines: scan back from the end `chunk` bytes at a time."""
    offset = max(0, len(log) - chunk)
    start, left = jobs.tail_lines_scan(log[offset:], offset, lines, at_end=True)
    while start is None:
        before = max(0, offset - chunk)
        start, left = jobs.tail_lines_scan(log[before:offset], before, left, at_end=False)
        offset = before
    return log[start:]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
@pytest.mark.parametrize(
    "log",
    [b"", b"\n", b"one", b"one\n", b"one\ntwo\nthree\n", b"one\ntwo\nthree", b"\n\n\nx\n", b"a\n" * 50 + b"tail without newline"],
)
def test_tail_lines_counts_lines_across_chunks(log, chunk):
    for lines in (1, 2, 3, 10, 1000):
        expected = b"".join(log.splitlines(keepends=True)[-lines:])
        assert _tail_by_chunks(log, lines, chunk) == expected, (log, lines, chunk)


def test_a_job_id_is_its_sequence_and_six_random_characters_of_the_alphabet():
    from coordinator.rules.job_rules import JOB_ID_ALPHABET, new_job_id

    ids = [new_job_id(123) for _ in range(2000)]
    assert all(re.fullmatch(r"j-000123-[a-z2-7]{6}", job_id) for job_id in ids), ids[:5]
    assert len(set(ids)) > 1990, "30 random bits: repeats among 2,000 are rare"
    for position in range(6):  # every character of the alphabet turns up in every position
        assert {job_id[9 + position] for job_id in ids} == set(JOB_ID_ALPHABET), position
