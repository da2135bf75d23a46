"""What a coordinator that does not lead answers: UNAVAILABLE naming the leader, health and reflection aside.

A coordinator serves its port from the start, but leads only once it holds the leader lease
(coordinator/control/leadership.py). Until then (a standby), and after it lost the lease (stepped
down, about to exit), every call but grpc.health.v1 and server reflection is answered UNAVAILABLE,
before any handler runs: the message names the leader, and the trailing metadata carries its
addresses (gpuorch/leader.py) so that agents, the SDK and gpuctl go there at once. Health answers
NOT_SERVING for the gpuorch services and for the server as a whole ("") on a standby: a probe or a
load balancer that asks either finds the leader only.

The lease keeps one address per leader; a coordinator whose agents use another port (agent_listen)
advertises both in it, as `advertised_addresses` writes and `leader_addresses` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.control.leadership import Leadership, Role
from coordinator.store.lease import LeaderInfo
from gpuorch.leader import LEADER_AGENTS_METADATA_KEY, LEADER_METADATA_KEY

ALWAYS_ANSWERED = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Method prefixes a standby serves itself: health says it does not lead; reflection describes the API."""

AGENTS_MARK = " agents="


def advertised_addresses(client: str, agents: str = "") -> str:
    """The lease's address of a leader: its client address, and its agents' when they differ."""
    return f"{client}{AGENTS_MARK}{agents}" if agents and agents != client else client


def leader_addresses(advertised: str) -> tuple[str, str]:
    """(client address, agent address) from a lease's address; the agent address is '' when it is the client one."""
    client, _, agents = advertised.partition(AGENTS_MARK)
    return client.strip(), agents.strip()


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a coordinator that does not lead answers every call but health and reflection with."""

    details: str
    metadata: tuple[tuple[str, str], ...]
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


def standby_refusal(leader: LeaderInfo, own_address: str, stepped_down: bool = False) -> Refusal:
    """The answer of a standby (or of a leader that stepped down) given who leads as the store says.

    A lease still held under this coordinator's own address is a previous run of it (killed while it led):
    the leader is nobody reachable until that lease runs out, so no address is given.
    """
    client, agents = leader_addresses(leader.address)
    state = "stepped down (it lost the leader lease)" if stepped_down else "a standby"
    if not client or client == leader_addresses(own_address)[0]:
        return Refusal(f"this coordinator is {state}; no leader is known yet, try the others", ())
    metadata = [(LEADER_METADATA_KEY, client)]
    if agents:
        metadata.append((LEADER_AGENTS_METADATA_KEY, agents))
    return Refusal(f"this coordinator is {state}; the leader is {client}", tuple(metadata))


def current_refusal(leadership: Leadership, own_address: str) -> Refusal | None:
    """None while this coordinator leads and may act; else what every call but health and reflection gets."""
    if leadership.may_act():
        return None
    return standby_refusal(leadership.leader, own_address, stepped_down=leadership.role is Role.STEPPED_DOWN)


def always_answered(method: str) -> bool:
    return method.startswith(ALWAYS_ANSWERED)


class StandbyInterceptor(grpc.aio.ServerInterceptor):
    """Answers with `refusal()` whenever it is not None (not leading), each call in the kind (unary or
    streaming) its method has, so that the client sees the status and the trailing metadata."""

    def __init__(self, refusal: Callable[[], Refusal | None]) -> None:
        self.refusal = refusal

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or always_answered(handler_call_details.method):
            return handler
        refusal = self.refusal()
        if refusal is None:
            return handler
        return refusing_handler(handler, refusal)


def refusing_handler(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that reads nothing and ends the call with `refusal`."""

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.details, trailing_metadata=refusal.metadata)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        await refuse(context)
        yield  # never reached: makes this an async generator, as a streaming response needs

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)
