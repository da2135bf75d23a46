"""Interactive sessions in flight: each pairs a client's stream with the stream the node's agent
opens back for it (SessionRelayService/NodeRelay), and the attach grace of interactive jobs.

A session is asked of the node on its Connect stream (CoordinatorMessage.open_session) with a
random secret; the agent's NodeRelay stream presents it, and only then is it paired with the
client. Bytes are relayed stream to stream (coordinator/api/interactive_service.py), each write
awaited, so HTTP/2 flow control carries a slow reader's backpressure from one end to the other.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from coordinator.control.job_manager import JobFinished, JobManager
from coordinator.control.node_links import NodeLinks
from coordinator.rules import attach_grace
from gpuorch.clock import Clock
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, interactive_pb2, job_pb2

log = get_logger("coordinator.sessions")

GRACE_CHECK_SECONDS = 1.0
SECRET_BYTES = 32


@dataclass(eq=False)
class Relay:
    """One session: which node must answer it, and the node's stream once it did."""

    session_id: int
    secret: bytes
    node_id: str
    job_id: str
    kind: int
    node_stream: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Set to the NodeRelay call's context when the agent connects the session back."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the session is over: the NodeRelay handler then ends the agent's stream."""


class SessionTable:
    """The sessions waiting for or relaying through a node, and which interactive jobs have a client."""

    def __init__(self, links: NodeLinks, clock: Clock, default_grace_seconds: float) -> None:
        self.links = links
        self.clock = clock
        self.default_grace_seconds = default_grace_seconds
        self.relays: dict[int, Relay] = {}
        self.attached: Counter[str] = Counter()
        """Clients attached now, by job id."""
        self.unattached_since: dict[str, float] = {}
        self._ids = itertools.count(1)

    def start(self, node_id: str, request: interactive_pb2.NodeSessionRequest) -> Relay:
        """Asks the node to open the session. Raises ConnectionError when the node is not connected."""
        relay = Relay(next(self._ids), secrets.token_bytes(SECRET_BYTES), node_id, request.job_id, request.kind)
        request.session_id, request.secret = relay.session_id, relay.secret
        if not self.links.send(node_id, agent_pb2.CoordinatorMessage(open_session=request)):
            raise ConnectionError(f"node {node_id}, which runs rank {request.rank} of {request.job_id}, is not connected")
        self.relays[relay.session_id] = relay
        return relay

    def claim(self, session_id: int, secret: bytes) -> Relay | None:
        """The session a NodeRelay stream says it carries, if its secret is the one sent (once only)."""
        relay = self.relays.get(session_id)
        if relay is None or relay.node_stream.done() or not hmac.compare_digest(relay.secret, secret):
            return None
        return relay

    def finish(self, relay: Relay) -> None:
        relay.finished.set()
        if not relay.node_stream.done():
            relay.node_stream.cancel()
        self.relays.pop(relay.session_id, None)

    def attach(self, job_id: str) -> None:
        self.attached[job_id] += 1

    def detach(self, job_id: str) -> None:
        self.attached[job_id] -= 1
        if self.attached[job_id] <= 0:
            del self.attached[job_id]

    def running_interactive(self, jobs: JobManager) -> dict[str, float]:
        """Running interactive jobs -> their attach grace."""
        return {
            entry.job.job_id: attach_grace.attach_grace(entry.job.spec.attach_grace_seconds, self.default_grace_seconds)
            for entry in jobs.jobs.values()
            if entry.job.state == job_pb2.JOB_STATE_RUNNING and entry.job.spec.interactive
        }

    async def enforce_attach_grace(self, jobs: JobManager, interval: float = GRACE_CHECK_SECONDS) -> None:
        """Cancels running interactive jobs nobody has been attached to for longer than their grace."""
        while True:
            running = self.running_interactive(jobs)
            self.unattached_since, expired = attach_grace.sweep(
                running, set(self.attached), self.unattached_since, self.clock.monotonic()
            )
            for job_id in expired:
                log.info("interactive job without a client past its grace; cancelling", job=job_id, grace=running[job_id])
                try:
                    await jobs.cancel(job_id, attach_grace.expiry_reason(running[job_id]))
                except (JobFinished, LookupError):
                    pass  # it ended meanwhile
            await asyncio.sleep(interval)


def describe(relay: Relay) -> dict[str, Any]:
    return {"session": relay.session_id, "job": relay.job_id, "node": relay.node_id,
            "kind": interactive_pb2.SessionKind.Name(relay.kind)}  # fmt: skip
