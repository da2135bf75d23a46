"""The coordinator's relay of a session, over raw gRPC against a real coordinator and agent on loopback.

A session's call must end as soon as the client is done, whatever the relay was doing at that moment:
found by tests/test_fuzz.py, where an Attach that sent its `open` and half-closed at once hung until its
deadline about one time in three (the relay was cancelled in the middle of writing `started`).
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest

from coordinator.api.interactive_service import InteractiveService
from coordinator.control.sessions import Relay
from gpuorch.v1 import interactive_pb2, job_pb2
from tests.harness import LocalCluster, wait_for

DEADLINE_SECONDS = 5.0
QUIET_TERMINAL = "import os\nwhile True:\n    os.read(0, 65536)\n"
"""Rank 0 of the interactive job: reads and drops its terminal's input, prints nothing."""


@pytest.fixture
def running_interactive_job(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.start_coordinator()
    cluster.add_agent("n1", gpus=1)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    job_id = client.submit_job(argv=[sys.executable, "-c", QUIET_TERMINAL], gpus=1, interactive=True)
    wait_for(lambda: client.get_job(job_id).state == job_pb2.JOB_STATE_RUNNING, 30, 0.1, "the interactive job to run")
    yield cluster, job_id
    cluster.stop()


def test_a_session_the_client_half_closes_at_once_ends_at_once(running_interactive_job):
    cluster, job_id = running_interactive_job
    opening = interactive_pb2.SessionInput(open=interactive_pb2.OpenSession(job_id=job_id))
    outcomes = []
    with grpc.insecure_channel(cluster.address) as channel:
        attach = channel.stream_stream(
            "/gpuorch.v1.InteractiveService/Attach",
            request_serializer=interactive_pb2.SessionInput.SerializeToString,
            response_deserializer=interactive_pb2.SessionOutput.FromString,
        )
        for _ in range(40):  # it hung about one time in ten to three on a loaded machine
            if outcomes and outcomes[-1] != grpc.StatusCode.OK:
                break
            call = attach(iter([opening]), timeout=DEADLINE_SECONDS)
            try:
                for output in call:
                    assert output.WhichOneof("payload") != "ended" or not output.ended.message, output
                outcomes.append(call.code())
            except grpc.RpcError as error:
                outcomes.append(error.code())
    assert outcomes == [grpc.StatusCode.OK] * len(outcomes), "every session ends when its client is done, before its deadline"
    assert cluster.client().get_job(job_id).state == job_pb2.JOB_STATE_RUNNING, "detaching leaves the job running"


class StandInClientCall:
    """The client's side of a session, as InteractiveService sees it: keeps typing, keeps what it is sent."""

    def __init__(self) -> None:
        self.written: list[interactive_pb2.SessionOutput] = []

    async def read(self):
        await asyncio.sleep(0.01)
        return interactive_pb2.SessionInput(data=b"x")

    async def write(self, output) -> None:
        self.written.append(output)

    async def abort(self, code, details):
        raise AssertionError(f"the relay aborted the client's call: {code} {details}")


class NodeStreamThatFailsWrites:
    """A node's stream that is over for writing (the agent ended its call) but still has its `ended` to be read."""

    def __init__(self) -> None:
        self.unread = [interactive_pb2.NodeSessionOutput(output=interactive_pb2.SessionOutput(
            ended=interactive_pb2.SessionEnded(process_exited=True, exit_code=3)))]  # fmt: skip

    async def read(self):
        await asyncio.sleep(0.1)  # the node's last message comes a little after the client's next keystroke
        return self.unread.pop(0) if self.unread else grpc.aio.EOF

    async def write(self, message) -> None:
        raise RuntimeError("Failed grpc_call_start_batch: the call is over")


async def test_a_node_stream_that_fails_a_write_still_has_its_ended_relayed_to_the_client():
    # Found by test_interactive_e2e.py: `gpuctl run` exited 255 ("connection lost") after `exit 0` when a keystroke
    # reached a node stream that was over; the relay then stopped reading the node before its `ended` came.
    relay = Relay(1, b"secret", "n1", "j-000001", interactive_pb2.SESSION_KIND_ATTACH)
    relay.node_stream.set_result(NodeStreamThatFailsWrites())
    client = StandInClientCall()
    service = InteractiveService(manager=None, sessions=None, guard=None, streams=None)  # type: ignore[arg-type]
    await asyncio.wait_for(service._relay(relay, client), 10)
    kinds = [output.WhichOneof("payload") for output in client.written]
    assert kinds == ["ended"], client.written
    assert client.written[0].ended.process_exited and client.written[0].ended.exit_code == 3
