"""One address in front of several coordinators, as a load balancer that health-checks them is.

Each new TCP connection goes to the coordinator that answers grpc.health.v1 "" SERVING (the leader:
standbys answer NOT_SERVING), waiting for one while none does; when the leader changes, the connections to the others are closed,
as a load balancer drains a backend that fails its checks. Agents, which take one coordinator
address, reach whichever coordinator leads through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import free_port

CHECK_SECONDS = 0.1
CHECK_TIMEOUT_SECONDS = 0.5
LEADER_WAIT_SECONDS = 10.0
"""A connection made while no coordinator leads waits this long for one, then is closed."""


class LeaderProxy:
    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.leader: str | None = None
        self._connections: dict[str, set[asyncio.StreamWriter]] = {backend: set() for backend in backends}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-proxy", daemon=True)

    def start(self) -> LeaderProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._checker = asyncio.create_task(self._check())
        self._ready.set()

    async def _serving(self, channel: grpc.aio.Channel) -> bool:
        try:
            request = health_pb2.HealthCheckRequest(service="")
            response = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=CHECK_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _check(self) -> None:
        channels = {backend: grpc.aio.insecure_channel(backend) for backend in self.backends}
        while True:
            answers = await asyncio.gather(*(self._serving(channel) for channel in channels.values()))
            serving = [backend for backend, ok in zip(self.backends, answers, strict=True) if ok]
            leader = serving[0] if serving else None
            if leader is None:
                self.leader = None
            elif leader != self.leader:
                self.leader = leader
                for backend, writers in self._connections.items():
                    if backend != leader:
                        for writer in list(writers):
                            writer.close()
            await asyncio.sleep(CHECK_SECONDS)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        waited = 0.0
        while (backend := self.leader) is None and waited < LEADER_WAIT_SECONDS:  # held, as a balancer queues it
            await asyncio.sleep(CHECK_SECONDS)
            waited += CHECK_SECONDS
        if backend is None:
            writer.close()
            return
        try:
            host, port = backend.rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._connections[backend].update((writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            self._connections[backend].difference_update((writer, upstream_writer))
            writer.close()
            upstream_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, RuntimeError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
