"""InteractiveService (users: Attach, Exec, PortForward) and SessionRelayService (agents: NodeRelay).

A client's call is checked like every other (authenticated; the job's owner or an admin; one
stream against the stream limits), then the session is asked of the rank's node
(coordinator/control/sessions.py) and, once the agent has connected it back, relayed message by
message in both directions. Every write is awaited before the next read, so neither end can make
the coordinator buffer more than a message per direction: a slow reader slows its writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

import grpc

from coordinator.api.auth import Action, Guard, StreamQuota
from coordinator.api.request_parsing import MalformedRequest, add_strict_service
from coordinator.control.job_manager import JobManager, JobNotFound
from coordinator.control.sessions import Relay, SessionTable, describe
from gpuorch.logs import get_logger
from gpuorch.tls import peer_identities
from gpuorch.v1 import interactive_pb2, interactive_pb2_grpc, job_pb2

log = get_logger("coordinator.interactive")

NODE_ANSWER_SECONDS = 45.0
"""How long a session waits for the node's agent to connect it back (an attach waits there for a starting rank)."""
NODE_FLUSH_SECONDS = 5.0
"""How long the relay still reads a node's stream that failed a write, for the messages the node sent before."""
MAX_EXEC_ARGV_BYTES = 128 * 1024

Kind = interactive_pb2.SessionKind
INTERACTIVE_SERVICE = interactive_pb2.DESCRIPTOR.services_by_name["InteractiveService"]
SESSION_RELAY_SERVICE = interactive_pb2.DESCRIPTOR.services_by_name["SessionRelayService"]


def open_problem(kind: interactive_pb2.SessionKind, open_session: interactive_pb2.OpenSession, job: job_pb2.Job) -> str | None:
    """Why this session cannot be opened on this job (checked before the node is asked), or None."""
    if job.state != job_pb2.JOB_STATE_RUNNING:
        return f"job {job.job_id} is {job_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_')}, not RUNNING"
    if kind == Kind.SESSION_KIND_ATTACH and not job.spec.interactive:
        return f"job {job.job_id} is not interactive (submitted without a terminal): use gpuctl exec to run a command beside it"
    if kind == Kind.SESSION_KIND_EXEC:
        if not open_session.argv or not open_session.argv[0]:
            return "open.argv is empty: give the command to run"
        if sum(len(arg.encode()) + 1 for arg in open_session.argv) > MAX_EXEC_ARGV_BYTES:
            return f"open.argv is longer than {MAX_EXEC_ARGV_BYTES} bytes"
        if any("\0" in arg for arg in open_session.argv):
            return "open.argv contains a NUL character"
    if kind == Kind.SESSION_KIND_PORT_FORWARD and not 1 <= open_session.port <= 65535:
        return f"open.port must be 1-65535, got {open_session.port}"
    return None


class InteractiveService(interactive_pb2_grpc.InteractiveServiceServicer):
    def __init__(self, manager: JobManager, sessions: SessionTable, guard: Guard, streams: StreamQuota) -> None:
        self.manager = manager
        self.sessions = sessions
        self.guard = guard
        self.streams = streams

    async def Attach(self, request_iterator, context):
        await self._session(Kind.SESSION_KIND_ATTACH, context)

    async def Exec(self, request_iterator, context):
        await self._session(Kind.SESSION_KIND_EXEC, context)

    async def PortForward(self, request_iterator, context):
        await self._session(Kind.SESSION_KIND_PORT_FORWARD, context)

    async def _session(self, kind: interactive_pb2.SessionKind, context) -> None:
        caller = await self.guard.authenticate(context)
        try:
            first = await context.read()
        except MalformedRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("payload") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first SessionInput must be `open`")
        open_session = first.open
        if not open_session.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "open.job_id is empty")
        try:
            entry = await self.manager.find(open_session.job_id)
        except JobNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.args[0])
        except RuntimeError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        await self.guard.permit(context, caller, Action.INTERACT, entry.job.spec.owner)
        problem = open_problem(kind, open_session, entry.job)
        if problem is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        rank = 0 if kind == Kind.SESSION_KIND_ATTACH else open_session.rank
        attempt = entry.job.attempt
        node_id = entry.node_of_rank(attempt, rank)
        if node_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job {entry.job.job_id} attempt {attempt} has no rank {rank}")
            return
        request = interactive_pb2.NodeSessionRequest(
            kind=kind, job_id=entry.job.job_id, attempt=attempt, rank=rank, argv=open_session.argv, tty=open_session.tty,
            size=open_session.size, port=open_session.port,
        )  # fmt: skip
        async with self.streams.slot(context, self.guard.client_key(context)):
            try:
                relay = self.sessions.start(node_id, request)
            except ConnectionError as error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            if kind == Kind.SESSION_KIND_ATTACH:
                self.sessions.attach(relay.job_id)
            log.info("session requested", caller=str(caller), **describe(relay))
            try:
                await self._relay(relay, context)
            finally:
                self.sessions.finish(relay)
                if kind == Kind.SESSION_KIND_ATTACH:
                    self.sessions.detach(relay.job_id)
                log.info("session over", **describe(relay))

    async def _relay(self, relay: Relay, context) -> None:
        try:
            node = await asyncio.wait_for(asyncio.shield(relay.node_stream), NODE_ANSWER_SECONDS)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"node {relay.node_id} did not open the session within {NODE_ANSWER_SECONDS:g}s"
            )

        async def client_to_node() -> None:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                if message.WhichOneof("payload") in ("open", None):
                    raise MalformedRequest("only the first SessionInput may be `open`, and each must set one field")
                await node.write(message)

        writing: list[asyncio.Future] = []
        """The write to the client in flight. Cancelling a grpc.aio write leaves the call unable to end (the client
        waits out its deadline, or forever), so the write is shielded from the relay's cancelling, and awaited."""

        async def write(output: interactive_pb2.SessionOutput) -> None:
            writing[:] = [asyncio.ensure_future(context.write(output))]
            await asyncio.shield(writing[0])

        async def node_to_client() -> None:
            while True:
                try:
                    message = await node.read()
                except (grpc.RpcError, MalformedRequest, asyncio.InvalidStateError):
                    message = grpc.aio.EOF  # the agent's stream broke: the client hears so
                if message is grpc.aio.EOF or message.WhichOneof("payload") != "output":
                    await write(interactive_pb2.SessionOutput(
                        ended=interactive_pb2.SessionEnded(message=f"node {relay.node_id} ended the session")))  # fmt: skip
                    return
                await write(message.output)
                if message.output.WhichOneof("payload") == "ended":
                    return

        to_node, to_client = asyncio.ensure_future(client_to_node()), asyncio.ensure_future(node_to_client())
        try:
            done, _ = await asyncio.wait([to_node, to_client], return_when=asyncio.FIRST_COMPLETED)
            if to_client not in done and _failure(to_node) is not None and not isinstance(_failure(to_node), MalformedRequest):
                # A write to the node failed: its stream is over. What it sent before (its `ended`, often) is still
                # read and relayed, and then the client hears the end; cancelling now would end the client's call
                # without `ended`, and gpuctl would report a lost connection.
                await asyncio.wait([to_client], timeout=NODE_FLUSH_SECONDS)
        finally:
            for task in (to_node, to_client):
                task.cancel()
            await asyncio.gather(to_node, to_client, *writing, return_exceptions=True)
        for task in done:
            failure = _failure(task)
            if isinstance(failure, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure))
            # A broken stream on either side ends the session; the other side's end says so or is gone.


def _failure(task: asyncio.Future) -> BaseException | None:
    """A finished relay task's exception (None when it returned or was cancelled)."""
    return None if task.cancelled() else task.exception()


class SessionRelayService(interactive_pb2_grpc.SessionRelayServiceServicer):
    def __init__(self, sessions: SessionTable) -> None:
        self.sessions = sessions
        self.identity_problem: Callable[[str, list[str]], str | None] = lambda node_id, names: None
        """(node id, names in the peer's verified certificate) -> why it may not speak for that node (as AgentService)."""

    async def NodeRelay(self, request_iterator, context):
        try:
            first = await context.read()
        except MalformedRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("payload") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first NodeSessionOutput must be `hello`")
        hello = first.hello
        relay = self.sessions.claim(hello.session_id, hello.secret)
        if relay is None or relay.node_id != hello.node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown session, or not this node's")
        refusal = self.identity_problem(
            relay.node_id, peer_identities({key: list(values) for key, values in context.auth_context().items()})
        )
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        relay.node_stream.set_result(context)
        with contextlib.suppress(asyncio.CancelledError):
            await relay.finished.wait()


def add_interactive_services(server, jobs: JobManager, guard: Guard, streams: StreamQuota, agents, clock, grace_seconds: float):
    """Adds InteractiveService and SessionRelayService to the server; returns the session table and the attach
    grace's loop (to run supervised)."""
    sessions = SessionTable(jobs.links, clock, grace_seconds)
    add_strict_service(server, INTERACTIVE_SERVICE, InteractiveService(jobs, sessions, guard, streams))
    relay = SessionRelayService(sessions)
    relay.identity_problem = agents.identity_problem  # a node's certificate must name the node, as on Connect
    add_strict_service(server, SESSION_RELAY_SERVICE, relay)
    return sessions, functools.partial(sessions.enforce_attach_grace, jobs)
