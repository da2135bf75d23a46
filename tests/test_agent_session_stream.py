"""The agent's end of a session stream (agent/interactive/relay.py) against a stand-in coordinator on loopback.

A session's last message must reach the coordinator however slowly the coordinator reads it: found by
tests/test_interactive_e2e.py, where `gpuctl run`'s client exited 255 ("connection lost") after `exit 0`
in about one full CI run in two. The agent, once it had written `ended`, cancelled its own read of the
client's input; cancelling a grpc.aio client call's read cancels the whole call, and a message the
coordinator had not read yet was lost with it.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import grpc

from agent.interactive.relay import NodeSessions
from gpuorch.v1 import interactive_pb2, interactive_pb2_grpc

SLOW_READ_SECONDS = 0.5
"""How long the stand-in coordinator waits after `hello` before it reads on: the agent is done by then."""


class SlowCoordinator(interactive_pb2_grpc.SessionRelayServiceServicer):
    """Reads a node's session stream slowly, and keeps what it read and how the stream ended."""

    def __init__(self) -> None:
        self.outputs: list[interactive_pb2.SessionOutput] = []
        self.over = asyncio.Event()

    async def NodeRelay(self, request_iterator, context):
        try:
            hello = await context.read()
            assert hello.WhichOneof("payload") == "hello", hello
            await asyncio.sleep(SLOW_READ_SECONDS)
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                self.outputs.append(message.output)
                if message.output.WhichOneof("payload") == "ended":
                    return  # the relay ends the stream once it has the last message, as the real one does
        finally:
            self.over.set()


async def test_a_forwarded_connection_the_node_closes_at_once_still_delivers_ended_to_a_slow_coordinator(tmp_path):
    closing = socket.create_server(("127.0.0.1", 0))
    closing.setblocking(False)
    port = closing.getsockname()[1]

    async def accept_and_close() -> None:
        connection, _ = await asyncio.get_running_loop().sock_accept(closing)
        connection.close()  # the forwarded connection ends at once: the node's side ends the session

    accepting = asyncio.ensure_future(accept_and_close())
    server = grpc.aio.server()
    coordinator = SlowCoordinator()
    interactive_pb2_grpc.add_SessionRelayServiceServicer_to_server(coordinator, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channel = grpc.aio.insecure_channel(address)
    supervisor = SimpleNamespace(state=SimpleNamespace(root=tmp_path))
    sessions = NodeSessions(supervisor, terminals=None, channel=lambda: channel, node_id="n1")  # type: ignore[arg-type]
    try:
        sessions.open(interactive_pb2.NodeSessionRequest(
            session_id=1, secret=b"x", kind=interactive_pb2.SESSION_KIND_PORT_FORWARD, job_id="j-000001", port=port))  # fmt: skip
        await asyncio.wait_for(coordinator.over.wait(), 10)
        await asyncio.wait_for(asyncio.gather(*sessions._tasks, return_exceptions=True), 10)
    finally:
        accepting.cancel()
        closing.close()
        await sessions.close()
        await channel.close()
        await server.stop(None)
    kinds = [output.WhichOneof("payload") for output in coordinator.outputs]
    assert kinds == ["started", "ended"], coordinator.outputs
    assert coordinator.outputs[-1].ended.message == "the connection was closed on the node"
