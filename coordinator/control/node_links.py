"""The coordinator's side of the agent links: sending to a node's current stream, and log reads
matched to the node that was asked."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.rules.effects import AttemptOver
from gpuorch.v1 import agent_pb2

if TYPE_CHECKING:
    from coordinator.control.cluster_view import ClusterView

LOG_READ_TIMEOUT_SECONDS = 10.0
LOG_CHUNK_BYTES = 64 * 1024


@dataclass(eq=False)
class AgentSession:
    """One agent stream. The coordinator talks to a node through its current session."""

    node_id: str
    session_id: int
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    close_reason: str | None = None
    """Set when the coordinator ends the stream (superseded, declared down, shutting down)."""

    def send(self, message: agent_pb2.CoordinatorMessage) -> None:
        if self.close_reason is None:
            self.outbox.put_nowait(message)

    def close(self, reason: str) -> None:
        """Asks the stream's handler to end the RPC with `reason`."""
        if self.close_reason is None:
            self.close_reason = reason
            self.outbox.put_nowait(None)


def stop_message(job_id: str, attempt: int, grace: float, reason: str) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(
        stop_task=agent_pb2.StopTask(job_id=job_id, attempt=attempt, grace_seconds=grace, reason=reason)
    )


def attempt_over_message(job_id: str, attempt: int) -> agent_pb2.CoordinatorMessage:
    """Every rank of the attempt is accounted for: the agent may forget it (stop reporting its ends).
    An agent that predates ForgetAttempt ignores it and drops the ends after an hour."""
    return agent_pb2.CoordinatorMessage(forget_attempt=agent_pb2.ForgetAttempt(job_id=job_id, attempt=attempt))


class NodeLinks:
    def __init__(self, cluster: ClusterView) -> None:
        self.cluster = cluster
        self._log_requests: dict[int, tuple[str, asyncio.Future[agent_pb2.LogChunk]]] = {}
        """Log reads awaiting their chunk: request id -> (the node asked, the answer)."""
        self._log_request_ids = itertools.count(1)

    def send(self, node_id: str, message: agent_pb2.CoordinatorMessage) -> bool:
        """Queues a message on the node's current stream; False if it has none (it learns on re-registering)."""
        node = self.cluster.nodes.get(node_id)
        if node is None or node.session is None:
            return False
        node.session.send(message)
        return True

    def forget(self, effect: AttemptOver) -> None:
        """Tells the node it may forget the attempt: it stops listing its ranks' ends (their end must be durable)."""
        self.send(effect.node_id, attempt_over_message(effect.job_id, effect.attempt))

    async def read_log(self, node_id: str, read: agent_pb2.ReadLogs) -> agent_pb2.LogChunk:
        """Asks the node for a chunk of a log and waits for its answer. Raises ConnectionError with a reason."""
        node = self.cluster.nodes.get(node_id)
        if node is None or node.session is None:
            raise ConnectionError(f"node {node_id}, which holds the log of rank {read.rank}, is not connected")
        read.request_id = next(self._log_request_ids)
        answer: asyncio.Future[agent_pb2.LogChunk] = asyncio.get_running_loop().create_future()
        self._log_requests[read.request_id] = (node_id, answer)
        node.session.send(agent_pb2.CoordinatorMessage(read_logs=read))
        try:
            return await asyncio.wait_for(answer, LOG_READ_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ConnectionError(f"node {node_id} did not answer a log read within {LOG_READ_TIMEOUT_SECONDS:g}s") from None
        finally:
            self._log_requests.pop(read.request_id, None)

    def on_log_chunk(self, node_id: str, chunk: agent_pb2.LogChunk) -> None:
        asked, answer = self._log_requests.get(chunk.request_id, ("", None))
        if answer is not None and asked == node_id and not answer.done():  # only the node asked may answer
            answer.set_result(chunk)
