"""The SDK's interactive sessions: InteractiveService/Attach, Exec and PortForward over a `Client`.

    with client.attach("j-000042", rows=40, columns=120) as session:
        session.send(b"echo hi\\n")
        for output in session:          # SessionOutput messages: started, data, error_data, ended
            ...

A session's input is sent from whatever thread calls send(); its output is read by iterating
it. The stream goes to the coordinator that leads (the one that last served a call of the client).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import Any, Self

import grpc

from gpuorch.errors import from_rpc_error
from gpuorch.v1 import interactive_pb2, interactive_pb2_grpc

SESSION_METHODS = {"attach": "Attach", "exec": "Exec", "port_forward": "PortForward"}


class Session:
    """One interactive stream: send() input, iterate the output; close() ends it (the coordinator sees the stream end)."""

    def __init__(self, client: Any, method: str, open_session: interactive_pb2.OpenSession) -> None:
        if not client.leader:
            client.get_job(open_session.job_id)  # finds the leader among several coordinators (and the job)
        link = client.link(client.leader or client.addresses[0])
        self.address = link.address
        self._inputs: queue.SimpleQueue[interactive_pb2.SessionInput | None] = queue.SimpleQueue()
        self._inputs.put(interactive_pb2.SessionInput(open=open_session))
        stub = interactive_pb2_grpc.InteractiveServiceStub(link.channel)
        self._call = getattr(stub, method)(self._requests(), metadata=link.metadata)
        self.ended: interactive_pb2.SessionEnded | None = None
        """The session's last message, once it came."""

    def _requests(self) -> Iterator[interactive_pb2.SessionInput]:
        while True:
            item = self._inputs.get()
            if item is None:
                return
            yield item

    def send(self, data: bytes) -> None:
        if data:
            self._inputs.put(interactive_pb2.SessionInput(data=data))

    def resize(self, rows: int, columns: int) -> None:
        self._inputs.put(interactive_pb2.SessionInput(resize=interactive_pb2.TerminalSize(rows=rows, columns=columns)))

    def end_input(self) -> None:
        """No more input (the remote stdin is closed; a forwarded connection is shut down for writing)."""
        self._inputs.put(interactive_pb2.SessionInput(end_of_input=True))

    def signal(self, signum: int) -> None:
        """Exec without a terminal: signals the remote process's group."""
        self._inputs.put(interactive_pb2.SessionInput(signal=signum))

    def __iter__(self) -> Iterator[interactive_pb2.SessionOutput]:
        try:
            for output in self._call:
                if output.WhichOneof("payload") == "ended":
                    self.ended = output.ended
                yield output
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._closed():
                return
            raise from_rpc_error(error, self.address) from None

    def _closed(self) -> bool:
        return self._call.done()

    def close(self) -> None:
        self._inputs.put(None)
        self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _size(rows: int, columns: int) -> interactive_pb2.TerminalSize:
    return interactive_pb2.TerminalSize(rows=rows, columns=columns)


class InteractiveCalls:
    """attach, exec and port_forward, mixed into the blocking Client."""

    def attach(self, job_id: str, *, rows: int = 0, columns: int = 0) -> Session:
        """The terminal of an interactive job's rank 0 (see InteractiveService/Attach)."""
        return Session(self, "Attach", interactive_pb2.OpenSession(job_id=job_id, size=_size(rows, columns)))

    def exec(self, job_id: str, argv: Sequence[str], *, rank: int = 0, tty: bool = False, rows: int = 0, columns: int = 0):
        """Runs argv beside a running rank, as the job's owner with the rank's environment (InteractiveService/Exec)."""
        open_session = interactive_pb2.OpenSession(job_id=job_id, rank=rank, argv=list(argv), tty=tty, size=_size(rows, columns))
        return Session(self, "Exec", open_session)

    def port_forward(self, job_id: str, port: int, *, rank: int = 0) -> Session:
        """One TCP connection to `port` on the loopback of the rank's node (InteractiveService/PortForward)."""
        return Session(self, "PortForward", interactive_pb2.OpenSession(job_id=job_id, rank=rank, port=port))
