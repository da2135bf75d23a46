"""The load generator of bench/heartbeats.py (its docstring says what it sends and how): simulated
agents that speak the real gpuorch.v1.AgentService/Connect protocol, in spawned processes that
report what they sent, how late and how long their writes took."""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import importlib
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import signal
import sys
import time
import uuid

import grpc

import gpuorch
from bench.heartbeat_progress import ProgressAgent
from gpuorch.v1 import agent_pb2, cluster_pb2


def _agent_channel_options() -> list[tuple[str, int]]:
    """The real agent's channel options; the bench must not break because the agent package changed shape."""
    for module_name in ("agent.coordinator_link", "agent.agent"):
        try:
            return list(importlib.import_module(module_name).CHANNEL_OPTIONS)
        except (ImportError, AttributeError):
            continue
    return [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


AGENT_CHANNEL_OPTIONS = _agent_channel_options()

DEVICES_PER_AGENT = 8
REGISTER_ATTEMPTS = 30
PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this process when the process that started it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def device_uuid(agent: int, index: int) -> str:
    return f"GPU-{uuid.UUID(int=(0xB0E5C4 << 96) | (agent << 16) | index)}"


def node_id(agent: int) -> str:
    return f"bench-node-{agent:05d}"


def build_register(agent: int, interval: float) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        register=agent_pb2.Register(
            node_id=node_id(agent),
            hostname=node_id(agent),
            addresses=["127.0.0.1"],
            devices=[
                cluster_pb2.DeviceInfo(
                    uuid=device_uuid(agent, index),
                    index=index,
                    name="gpuorch bench H100 80GB",
                    memory_total_bytes=80 * 1024**3,
                    pci_bus_id=f"00000000:{0x18 + index * 0x10:02X}:00.0",
                    temperature_limit_celsius=90.0,
                    power_limit_watts=700.0,
                )
                for index in range(DEVICES_PER_AGENT)
            ],
            heartbeat_interval_seconds=interval,
            agent_version=f"{gpuorch.__version__}-bench",
        )
    )


def build_heartbeat(agent: int) -> agent_pb2.AgentMessage:
    """A heartbeat with plausible, full-size telemetry; only a few fields change per send."""
    return agent_pb2.AgentMessage(
        heartbeat=agent_pb2.Heartbeat(
            sequence=0,
            devices=[
                cluster_pb2.DeviceTelemetry(
                    uuid=device_uuid(agent, index),
                    memory_used_bytes=(40 + index) * 1024**3 + agent * 4096,
                    gpu_utilization_percent=87.5,
                    memory_utilization_percent=52.5,
                    temperature_celsius=61.0 + index * 0.5,
                    power_watts=455.5,
                    ecc_corrected_errors=3,
                    ecc_uncorrected_errors=0,
                    xid_count=0,
                    last_xid=0,
                )
                for index in range(DEVICES_PER_AGENT)
            ],
        )
    )


class _Recorder:
    """Per-process counters of what was sent inside the measurement window."""

    def __init__(self, window) -> None:
        self.window = window  # shared RawArray('d', 2): [start wall, end wall]
        self.sent_total = 0
        self.sent_in_window = 0
        self.late_ms = array.array("f")
        self.write_ms = array.array("f")
        self.skipped_slots = 0
        self.write_errors = 0
        self.launches = 0
        self.statuses_sent = 0
        self.progress_in_window = 0


async def _run_agent(agent, channel, rank_phase, interval, recorder, shared, slot, vary, register_gate, streams, progress):
    """One simulated agent: register, then heartbeat on its own fixed schedule until cancelled; with `progress`,
    also run the job it is sent (bench/heartbeat_progress.py)."""
    registered, failed, lost, retries = shared["registered"], shared["failed"], shared["lost"], shared["retries"]
    stub_call = channel.stream_stream(
        "/gpuorch.v1.AgentService/Connect",
        request_serializer=agent_pb2.AgentMessage.SerializeToString,
        response_deserializer=agent_pb2.CoordinatorMessage.FromString,
    )
    register = build_register(agent, interval)
    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        async with register_gate:
            call = stub_call()
            try:
                await call.write(register)
                first = await call.read()
                if first is grpc.aio.EOF or first.WhichOneof("payload") != "register_ack":
                    raise ConnectionError(f"no RegisterAck (got {first!r})")
                streams.append(call)
                break
            except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError) as error:
                call.cancel()
                if attempt == REGISTER_ATTEMPTS:
                    failed[slot] += 1
                    if failed[slot] <= 3:
                        log(f"generator {slot}: agent {agent} failed to register {attempt} times; last: {error!r}")
                    raise
                retries[slot] += 1
        # As the real agent: reconnect after a capped, jittered backoff.
        await asyncio.sleep(min(2.0, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random()))
    interval = first.register_ack.heartbeat_interval_seconds or interval
    registered[slot] += 1

    message = build_heartbeat(agent)
    heartbeat = message.heartbeat
    job = ProgressAgent(heartbeat, seed=agent) if progress else None
    write_lock = asyncio.Lock()  # with --progress both tasks write; one write at a time on a grpc.aio stream

    async def watch() -> None:
        # Without --progress the coordinator sends nothing else unless it ends the stream; a pending read is free.
        with contextlib.suppress(asyncio.CancelledError):
            try:
                while (received := await call.read()) is not grpc.aio.EOF:
                    if job is None:
                        continue
                    answers = job.answer(received)
                    if received.WhichOneof("payload") == "launch_task":
                        recorder.launches += 1
                    for answer in answers:
                        async with write_lock:
                            await call.write(answer)
                        recorder.statuses_sent += 1
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
            lost[slot] += 1

    watcher = asyncio.create_task(watch())
    stamp = heartbeat.sent_time
    samples = list(heartbeat.devices)
    base_temperatures = [sample.temperature_celsius for sample in samples]
    window = recorder.window
    offset = time.time() - time.monotonic()  # wall = monotonic + offset
    # Wall-clock schedule shared by every process: this agent sends at k*interval + phase.
    phase = rank_phase * interval
    k = math.ceil((time.time() - phase) / interval)
    due = k * interval + phase - offset  # monotonic
    sequence = 0
    monotonic, time_ns = time.monotonic, time.time_ns
    try:
        while True:
            delay = due - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            woke = monotonic()
            late = woke - due
            if late > interval:  # fell more than a whole interval behind: skip the missed slots
                missed = int(late // interval)
                recorder.skipped_slots += missed
                due += missed * interval
                late -= missed * interval
            sequence += 1
            heartbeat.sequence = sequence
            if vary:
                wobble = (sequence & 1) * 0.5
                for sample, base in zip(samples, base_temperatures, strict=True):
                    sample.temperature_celsius = base + wobble
                    sample.gpu_utilization_percent = 80.0 + (sequence % 20)
            now_ns = time_ns()
            stamp.seconds, stamp.nanos = divmod(now_ns, 1_000_000_000)
            reports = job.advance(stamp.seconds, stamp.nanos) if job is not None else 0
            try:
                if job is None:
                    await call.write(message)
                else:
                    async with write_lock:
                        await call.write(message)
            except (grpc.RpcError, asyncio.InvalidStateError):
                recorder.write_errors += 1
                return
            recorder.sent_total += 1
            sent_wall = now_ns / 1e9
            if window[0] <= sent_wall < window[1]:
                recorder.sent_in_window += 1
                recorder.progress_in_window += reports
                recorder.late_ms.append(late * 1000)
                recorder.write_ms.append((monotonic() - woke) * 1000)
            due += interval
    finally:
        watcher.cancel()


async def _generator(config: dict, shared: dict) -> dict:
    agents = config["agents"]
    total = config["total_agents"]
    interval = config["interval"]
    per_channel = config["agents_per_channel"]
    slot = config["proc_index"]
    recorder = _Recorder(shared["window"])
    stop = shared["stop"]
    options = [*AGENT_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = []
    tasks = []
    streams: list = []
    register_gate = asyncio.Semaphore(config["register_concurrency"])
    parent = os.getppid()
    errors: list[str] = []
    try:
        for position, agent in enumerate(agents):
            if position % per_channel == 0:
                channels.append(grpc.aio.insecure_channel(config["target"], options=options))
            tasks.append(
                asyncio.create_task(
                    _run_agent(
                        agent,
                        channels[-1],
                        agent / total,
                        interval,
                        recorder,
                        shared,
                        slot,
                        config["vary"],
                        register_gate,
                        streams,
                        config["progress"],
                    )
                )
            )
        checked = time.monotonic()
        while not stop.is_set() and os.getppid() == parent:
            await asyncio.sleep(0.1)
            if time.monotonic() - checked >= 1.0:  # collect agents that died (failed registration, broken stream)
                checked = time.monotonic()
                for task in [task for task in tasks if task.done()]:
                    tasks.remove(task)
                    if not task.cancelled() and task.exception() is not None and len(errors) < 5:
                        errors.append(repr(task.exception()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in streams:
            call.cancel()
        await asyncio.gather(*(channel.close(None) for channel in channels), return_exceptions=True)
    return {
        "proc_index": slot,
        "agents": len(agents),
        "channels": len(channels),
        "sent_total": recorder.sent_total,
        "sent_in_window": recorder.sent_in_window,
        "late_ms": recorder.late_ms.tobytes(),
        "write_ms": recorder.write_ms.tobytes(),
        "skipped_slots": recorder.skipped_slots,
        "write_errors": recorder.write_errors,
        "launches": recorder.launches,
        "statuses_sent": recorder.statuses_sent,
        "progress_in_window": recorder.progress_in_window,
        "errors": errors,
    }


def generator_main(config: dict, shared: dict, results) -> None:
    """Entry point of a generator process."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us in order
    signal.signal(signal.SIGTERM, lambda *_: shared["stop"].set())
    raise_fd_limit()
    try:
        result = asyncio.run(_generator(config, shared))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, never left to hang it
        result = {"proc_index": config["proc_index"], "fatal": repr(error)}
    results.put(result)


class Generators:
    def __init__(self, target: str, agents: int, procs: int, args) -> None:
        self.context = mp.get_context("spawn")
        procs = max(1, min(procs, agents))
        self.shared = {
            "window": self.context.RawArray("d", [math.inf, math.inf]),
            "registered": self.context.RawArray("q", procs),
            "lost": self.context.RawArray("q", procs),
            "failed": self.context.RawArray("q", procs),
            "retries": self.context.RawArray("q", procs),
            "stop": self.context.Event(),
        }
        self.results = self.context.Queue()
        self.processes = []
        for index in range(procs):
            config = {
                "proc_index": index,
                "target": target,
                "agents": list(range(index, agents, procs)),  # interleaved: each process covers the whole second
                "total_agents": agents,
                "interval": args.interval,
                "agents_per_channel": args.agents_per_channel,
                "register_concurrency": args.register_concurrency,
                "vary": not args.static_telemetry,
                "progress": getattr(args, "progress", False),
            }
            self.processes.append(
                self.context.Process(
                    target=generator_main, args=(config, self.shared, self.results), name=f"hb-gen-{index}", daemon=True
                )
            )

    def start(self) -> None:
        for process in self.processes:
            process.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def registered(self) -> int:
        return sum(self.shared["registered"])

    def lost(self) -> int:
        return sum(self.shared["lost"])

    def retries(self) -> int:
        return sum(self.shared["retries"])

    def failed(self) -> int:
        return sum(self.shared["failed"])

    def dead(self) -> list[str]:
        return [f"{p.name} exit {p.exitcode}" for p in self.processes if p.exitcode is not None]

    def set_window(self, start_wall: float, end_wall: float) -> None:
        self.shared["window"][1] = end_wall
        self.shared["window"][0] = start_wall

    def stop(self, timeout: float = 30.0) -> list[dict]:
        """Asks every process to stop, collects what they report, and makes sure they are gone."""
        self.shared["stop"].set()
        results = []
        deadline = time.monotonic() + timeout
        alive = [p for p in self.processes if p.pid is not None]
        while len(results) < len(alive) and time.monotonic() < deadline:
            try:
                results.append(self.results.get(timeout=0.5))
            except queue.Empty:
                if all(p.exitcode is not None for p in alive) and self.results.empty():
                    break
        for process in alive:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.results.close()
        self.results.join_thread()
        return results
