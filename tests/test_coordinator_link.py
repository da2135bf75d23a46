"""agent/coordinator_link.py: an agent silent past the coordinator's DOWN deadline acts on nothing
more from that stream (a process woken from SIGSTOP finds LaunchTasks whose attempts were given up).

A fake clock and a fake call stand in for time and the stream; the rules are the production code's."""

from __future__ import annotations

import asyncio

import pytest

from agent.coordinator_link import CoordinatorLink, SilentPastDeadline, down_after, silent_past_deadline
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2


class NoDevices:
    blocking = False

    def devices(self):
        return []

    def sample(self):
        return []


class ScriptedCall:
    """A Connect call whose reads come from a queue and whose writes are recorded."""

    def __init__(self) -> None:
        self.reads: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()
        self.written: list[agent_pb2.AgentMessage] = []

    async def read(self):
        return await self.reads.get()

    async def write(self, message) -> None:
        self.written.append(message)


def launch(job_id: str) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(launch_task=agent_pb2.LaunchTask(job_id=job_id, attempt=1))


def test_the_down_deadline_is_the_coordinators_word_else_three_intervals() -> None:
    assert down_after(agent_pb2.RegisterAck(down_after_seconds=2.5), interval=0.25) == 2.5
    assert down_after(agent_pb2.RegisterAck(), interval=0.25) == 0.75
    assert not silent_past_deadline(last_write=10.0, now=10.75, deadline=0.75)
    assert silent_past_deadline(last_write=10.0, now=10.76, deadline=0.75)


def connected_link(clock: FakeClock) -> tuple[CoordinatorLink, list[tuple[str, int]]]:
    link = CoordinatorLink(coordinator="127.0.0.1:1", node_id="n1", source=NoDevices(), clock=clock)
    handled: list[tuple[str, int]] = []
    link.on_message = lambda message, session: handled.append((message.launch_task.job_id, session))
    # What a registration leaves behind (CoordinatorLink._stream), without a coordinator.
    link.session, link.connected = 1, True
    link._down_after, link._last_write = 0.75, clock.monotonic()
    return link, handled


async def test_a_message_read_after_a_silence_past_the_deadline_is_not_acted_on() -> None:
    clock = FakeClock()
    link, handled = connected_link(clock)
    call = ScriptedCall()
    reader = asyncio.create_task(link._read_loop(call))
    call.reads.put_nowait(launch("j-fresh"))
    await asyncio.sleep(0.01)
    assert handled == [("j-fresh", 1)] and link.is_current(1)

    clock.advance(2.0)  # stopped (SIGSTOP) for longer than the coordinator waits: it declared the node DOWN
    call.reads.put_nowait(launch("j-given-up"))
    with pytest.raises(SilentPastDeadline):
        await asyncio.wait_for(reader, 1)
    assert handled == [("j-fresh", 1)], "a launch the coordinator may have given up was handed on"
    assert not link.is_current(1), "instructions already queued from that stream must not be acted on"


async def test_the_writer_notices_the_silence_first_and_the_session_stays_stale() -> None:
    clock = FakeClock()
    link, _ = connected_link(clock)
    call = ScriptedCall()
    link._outbox = asyncio.Queue()
    writer = asyncio.create_task(link._write_loop(call))
    link.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=1)))
    await asyncio.sleep(0.01)
    clock.advance(0.5)
    link.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=2)))
    await asyncio.sleep(0.01)
    assert [m.heartbeat.sequence for m in call.written] == [1, 2] and link.is_current(1)

    clock.advance(1.0)  # woken after a stop: the first heartbeat after it must not make the stream look fresh
    link.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=3)))
    with pytest.raises(SilentPastDeadline):
        await asyncio.wait_for(writer, 1)
    assert [m.heartbeat.sequence for m in call.written] == [1, 2]
    assert not link.is_current(1)
