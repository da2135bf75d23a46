"""AgentService/Connect: one long-lived stream per agent.

The handler reads in one task and writes from the session's outbox in the
handler itself, so the rest of the coordinator talks to a node by putting
messages in `session.outbox` and never touches gRPC.

The service is registered through coordinator.api.request_parsing: `context.read()` returns
parsed AgentMessages and raises MalformedRequest for a frame that is not one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc

from coordinator.api.request_parsing import MalformedRequest
from coordinator.control.cluster_view import ClusterView
from coordinator.control.leadership import Leadership
from coordinator.control.node_links import AgentSession
from coordinator.rules import liveness
from coordinator.rules.registration import InvalidMessage, validate_register
from gpuorch.logs import get_logger
from gpuorch.tls import peer_identities
from gpuorch.v1 import agent_pb2, agent_pb2_grpc

log = get_logger("coordinator.agents")

TaskStatusHandler = Callable[[str, agent_pb2.TaskStatus], None]


class StreamEnded(Exception):
    """The coordinator ends a stream; carries the status to end it with (None = OK)."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, cluster: ClusterView, epoch: int) -> None:
        self.cluster = cluster
        self.epoch = epoch
        self.on_register: list[Callable[[str, agent_pb2.Register], None]] = []
        self.on_task_status: list[TaskStatusHandler] = []
        self.on_log_chunk: list[Callable[[str, agent_pb2.LogChunk], None]] = []
        self.on_progress: list[Callable[[str, Sequence[agent_pb2.RankProgress]], None]] = []
        """Called once per heartbeat with its rank reports (node id, reports), not once per report."""
        self.identity_problem: Callable[[str, list[str]], str | None] = lambda node_id, names: None
        """(node id, names in the peer's verified certificate) -> why it may not register as that node, or None."""
        self.owners_authenticated = False
        """Told to agents in RegisterAck: every job's owner was authenticated (set from the Guard)."""
        self.leadership: Leadership | None = None
        """Nothing is written to an agent unless this coordinator leads and may act (control/leadership.py)."""

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        kind = first.WhichOneof("payload")
        if kind != "register":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message on AgentService/Connect must be a register, got {kind or 'an empty message'}",
            )
        try:
            validate_register(first.register)
        except InvalidMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        refusal = self.identity_problem(
            first.register.node_id, peer_identities({key: list(values) for key, values in context.auth_context().items()})
        )
        if refusal is not None:
            log.warning("registration refused", node=first.register.node_id, peer=context.peer(), reason=refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        node, session, replaced = self.cluster.register(first.register)
        if replaced is not None:
            replaced.close("replaced by a newer stream of the same node (the agent restarted)")
        # The node is READY from here on. Its reconciliation (what the agent runs against what the
        # coordinator expects, fencing stale ranks) runs in this same step, before the first await:
        # no scheduling pass can place work on the node before it is reconciled.
        try:
            for callback in self.on_register:
                callback(node.node_id, first.register)
        except Exception as error:  # a bug must cost one stream, never the daemon; the agent re-registers
            log.exception("error reconciling a registration", node=node.node_id)
            session.close(f"internal error reconciling the registration: {error}")
            self.cluster.stream_closed(session)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "internal error reconciling the registration; reconnect")
        log.info(
            "node registered",
            node=node.node_id,
            gpus=len(node.devices),
            heartbeat_interval=node.liveness.heartbeat_interval,
            peer=context.peer(),
        )
        try:
            await context.write(
                agent_pb2.CoordinatorMessage(
                    register_ack=agent_pb2.RegisterAck(
                        heartbeat_interval_seconds=node.liveness.heartbeat_interval,
                        coordinator_epoch=self.epoch,
                        drained=node.drained,
                        owners_authenticated=self.owners_authenticated,
                        # The agent acts on nothing more from a stream it was silent on for longer than this.
                        down_after_seconds=liveness.silence_limit(node.liveness, self.cluster.policy),
                    )
                )
            )
        except BaseException:
            session.close("stream broken before the registration was acknowledged")
            self.cluster.stream_closed(session)  # SUSPECT now, not DOWN after missed heartbeats
            raise
        ending: StreamEnded | None = None
        reader = asyncio.create_task(self._read(context, session))
        try:
            while True:
                message = await session.outbox.get()
                if message is None:
                    break
                leadership = self.leadership
                if leadership is not None and not leadership.may_act() and not await leadership.until_may_act():
                    # Stepped down: the leader tells agents what to do now.
                    session.close(f"this coordinator no longer leads ({leadership.reason}); reconnect")
                    break
                await context.write(message)
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(failure, StreamEnded):
                ending = failure
            else:
                ending = StreamEnded(grpc.StatusCode.UNAVAILABLE, session.close_reason or "closed by the coordinator")
        finally:
            reader.cancel()
            self.cluster.stream_closed(session)
            log.info("node stream closed", node=session.node_id, session=session.session_id, reason=session.close_reason)
        if ending is not None and ending.code is not None:
            await context.abort(ending.code, ending.details)

    async def _read(self, context: grpc.aio.ServicerContext, session: AgentSession) -> None:
        """Applies every message after the registration; ends the session when the stream ends."""
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    session.close("stream ended by the agent (process exited or connection closed)")
                    raise StreamEnded(None, "stream ended by the agent")
                kind = message.WhichOneof("payload")
                if kind == "heartbeat":
                    heartbeat = message.heartbeat
                    self.cluster.heartbeat(session, heartbeat)
                    if reports := heartbeat.progress:
                        for on_progress in self.on_progress:
                            on_progress(session.node_id, reports)
                elif kind == "task_status":
                    self.cluster.touch(session)
                    for on_task_status in self.on_task_status:
                        on_task_status(session.node_id, message.task_status)
                elif kind == "log_chunk":
                    self.cluster.touch(session)
                    for on_log_chunk in self.on_log_chunk:
                        on_log_chunk(session.node_id, message.log_chunk)
                elif kind == "register":
                    raise InvalidMessage("register may only be the first message of a stream")
                else:
                    raise InvalidMessage("empty AgentMessage: set one of register, heartbeat, task_status, log_chunk")
        except (InvalidMessage, MalformedRequest) as error:
            session.close(str(error))
            raise StreamEnded(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except StreamEnded:
            raise
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as error:
            # The peer went away; the handler's finally marks the node.
            session.close(f"stream broken: {error}")
            raise StreamEnded(grpc.StatusCode.UNAVAILABLE, "stream broken") from None
        except Exception as error:  # a bug must cost one stream, never the daemon
            log.exception("error handling agent message", node=session.node_id)
            session.close(f"internal error handling a message: {error}")
            raise StreamEnded(grpc.StatusCode.UNAVAILABLE, "internal error handling a message; reconnect") from None
