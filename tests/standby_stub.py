"""A standby coordinator stand-in for tests: a real grpc.aio server, in a process of its own, on a loopback port.

It answers as a standby does: grpc.health.v1 says NOT_SERVING for the gpuorch services, and every
other RPC (unary or streaming, AgentService/Connect included) fails UNAVAILABLE, with the leader in
the message and in the trailing metadata `gpuorch-leader` (and `gpuorch-leader-agents` when the
leader's agent address is given). It prints every method it is asked, so a test can tell that a
client or agent really called it.

    with StandbyStub(leader="127.0.0.1:50051") as stub:
        gpuorch.Client(f"{stub.address},127.0.0.1:50051").cluster_status()
        assert stub.calls == ["/gpuorch.v1.ClusterService/GetClusterStatus"]

Or by hand: python -m tests.standby_stub --port 50061 --leader 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gpuorch.leader import LEADER_AGENTS_METADATA_KEY, LEADER_METADATA_KEY
from tests.harness import Daemon, free_port, wait_for

GPUORCH_SERVICES = ("gpuorch.v1.AgentService", "gpuorch.v1.JobService", "gpuorch.v1.ClusterService")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
CALL_PREFIX = "call "
LISTENING = "listening"


def standby_message(leader: str | None) -> str:
    return f"this coordinator is a standby; the leader is {leader or 'not known yet'}"


def standby_trailers(leader: str | None, leader_agents: str | None) -> tuple[tuple[str, str], ...]:
    """`leader` "" = a standby that knows no leader yet (the key is sent empty); None = the key is left out."""
    pairs = []
    if leader is not None:
        pairs.append((LEADER_METADATA_KEY, leader))
    if leader_agents is not None:
        pairs.append((LEADER_AGENTS_METADATA_KEY, leader_agents))
    return tuple(pairs)


class AnswerEverythingAsStandby(grpc.GenericRpcHandler):
    def __init__(self, leader: str | None, leader_agents: str | None) -> None:
        self.message = standby_message(leader)
        self.trailers = standby_trailers(leader, leader_agents)

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return None  # the registered health service answers

        async def refuse(request_iterator, context) -> None:
            print(CALL_PREFIX + method, flush=True)
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.message, trailing_metadata=self.trailers)

        # One handler kind serves every method shape: the stand-in reads no request and answers at once.
        return grpc.stream_stream_rpc_method_handler(refuse)


async def serve(port: int, leader: str | None, leader_agents: str | None) -> None:
    server = grpc.aio.server()
    health = HealthServicer()
    for name in GPUORCH_SERVICES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_generic_rpc_handlers([AnswerEverythingAsStandby(leader, leader_agents)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(LISTENING, port, flush=True)
    await server.wait_for_termination()


class StandbyStub:
    """The stand-in as a real process; see the module docstring."""

    def __init__(self, leader: str | None = "", leader_agents: str | None = None, log_dir: Path | None = None) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "tests.standby_stub", "--port", str(self.port)]
        if leader is not None:
            argv += ["--leader", leader]
        if leader_agents is not None:
            argv += ["--leader-agents", leader_agents]
        directory = log_dir or Path(tempfile.mkdtemp(prefix="gpuorch-standby-"))
        self.daemon = Daemon("standby", argv, directory / f"standby-{self.port}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def calls(self) -> list[str]:
        """Methods asked, in order ("/gpuorch.v1.ClusterService/GetClusterStatus")."""
        lines = self.daemon.output().splitlines()
        return [line.removeprefix(CALL_PREFIX) for line in lines if line.startswith(CALL_PREFIX)]

    def agent_calls(self) -> list[str]:
        return [call for call in self.calls if call.startswith("/gpuorch.v1.AgentService/")]

    def start(self) -> Self:
        self.daemon.start()

        def listening() -> bool:
            if self.daemon.process is not None and self.daemon.process.poll() is not None:
                raise SystemExit(f"the standby stand-in exited:\n{self.daemon.output()[-2000:]}")
            return any(line.startswith(LISTENING) for line in self.daemon.output().splitlines())

        wait_for(listening, timeout=15, what="the standby stand-in to listen")
        return self

    def stop(self) -> None:
        self.daemon.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.standby_stub", description="a gpuorch standby stand-in")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--leader", default=None, help="the leader's client address (absent: no gpuorch-leader key)")
    parser.add_argument("--leader-agents", default=None, help="the leader's agent address (gpuorch-leader-agents)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.leader, args.leader_agents))


if __name__ == "__main__":
    main()
