"""Heartbeat ingest benchmark: a real coordinator, thousands of simulated agents on loopback.

    python bench/heartbeats.py                        # 2000 agents (16,000 GPUs), 60 s steady window
    python bench/heartbeats.py --agents 4000 --duration 30
    python bench/heartbeats.py --find-max             # step the agent count up until the coordinator falls behind

What runs:

* a real `gpuorch-coordinator` process on 127.0.0.1:<free port> with a temporary state dir;
* a light load generator in `--procs` processes (multiprocessing, spawn), each running
  grpc.aio. Every simulated agent speaks the real `gpuorch.v1.AgentService/Connect`
  protocol: it opens a stream, sends a Register with 8 devices (unique uuids), waits for
  the RegisterAck, then sends a Heartbeat every interval (sequence, sent_time set just
  before the write, 8 DeviceTelemetry samples). Send times are staggered evenly across
  the interval over all agents (agent i sends at k*interval + i/N*interval, wall clock),
  so the coordinator sees a smooth N/interval heartbeats per second, as from a real fleet
  whose agents started at random moments.

  Messages are built once per agent; a send only updates sequence, sent_time and the
  temperature/utilisation of each sample (temperature changes, as on real GPUs, so the
  coordinator's health re-assessment runs as it would in production; --static-telemetry
  turns that off).

  Channels: by default one channel (= one TCP/HTTP2 connection, forced with
  grpc.use_local_subchannel_pool, since gRPC would otherwise share one connection among
  identical channels of a process) per agent, as in production where every node has its
  own connection: the coordinator pays per-connection costs (one read syscall and one
  HTTP/2 frame per heartbeat, keepalive pings, flow-control updates) that multiplexing
  many agents on one connection would hide. --agents-per-channel N multiplexes N agents
  per connection instead. Channel options are the real agent's (agent.agent.CHANNEL_OPTIONS,
  incl. 5 s keepalive pings).

What is measured, over a steady window that starts --warmup seconds after the last agent
registered:

* ingest rate and lag from `gpuorch.v1.ClusterService/GetClusterStatus` (the
  coordinator's own 10 s window; lag = coordinator wall time when applied - sent_time),
  sampled every --sample-every seconds (default 10: each call walks every GPU on the
  coordinator's event loop and stalls heartbeat ingest meanwhile, so a sample's lag
  includes the stall of the sample before it; one call is made just before the window so
  that the first sample carries one stall as well);
* coordinator CPU seconds (utime+stime of /proc/<pid>/stat, all threads) over the window,
  per 1,000 heartbeats ingested, and how much of it is the asyncio (GIL-holding) main
  thread, whose saturation is the coordinator's ceiling whatever the number of cores;
* the generator's achieved send rate vs the intended agents/interval, how late its sends
  were against the schedule and how long its writes took (if the generator falls behind,
  that is a generator limit, not a coordinator one, and the output says so), and the CPU
  that every other process on the machine used meanwhile (the machine may be shared);
* "backlog": growing when the ingest rate is more than 2% below the send rate, when the
  median lag climbs from the first to the last third of the window, or when a stream is lost.

A count is "sustained" when the generator kept up, the worst sampled p99 lag stayed below
100 ms and no backlog grew. --find-max steps up 500, 1000, 2000, 3000, ... (fresh
coordinator per step), retries a failed step once, then bisects below the first count
that was not sustained.

Prints exactly one JSON object on stdout at the end; progress goes to stderr. Every
process it starts is stopped at the end, on errors and on Ctrl-C/SIGTERM (and, should
this process be SIGKILLed, by the kernel through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

import gpuorch  # noqa: E402
from gpuorch.v1 import agent_pb2, cluster_pb2, cluster_pb2_grpc  # noqa: E402

try:
    from agent.agent import CHANNEL_OPTIONS as AGENT_CHANNEL_OPTIONS
except Exception:  # the bench must not break because the agent package changed shape
    AGENT_CHANNEL_OPTIONS = [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]

DEVICES_PER_AGENT = 8
LAG_LIMIT_MS = 100.0
INGEST_TOLERANCE = 0.02
"""Ingest rate must be within this fraction of the send rate."""
GENERATOR_TOLERANCE = 0.01
MAIN_THREAD_SATURATED = 0.9
"""The coordinator's event-loop thread this busy (fraction of a core) counts as saturated."""
MACHINE_SATURATED = 0.95
"""All cores together this busy counts as a saturated machine."""
"""The generator 'keeps up' when it sends at least (1 - this) of the intended rate."""
COORDINATOR_STATS_WINDOW = 10.0
"""Seconds covered by GetClusterStatus's rate and lag (coordinator.cluster.HeartbeatStats)."""
STATUS_TIMEOUT = 30.0
FIND_MAX_LADDER = (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000)

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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, live and exited), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread of a process, in seconds."""
    with open(f"/proc/{pid}/task/{tid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_snapshot(pid: int, generator_pids) -> dict[str, float]:
    """CPU seconds used so far by the coordinator (all threads and its main thread), the generators,
    this process and the whole machine, with the wall time: subtract two to get a window."""
    return {
        "coordinator": cpu_seconds(pid),
        "coordinator_main_thread": thread_cpu_seconds(pid, pid),
        "generators": proc_cpu(generator_pids),
        "bench": proc_cpu([os.getpid()]),
        "machine": machine_busy_seconds(),
        "wall": time.time(),
    }


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def quantile(sorted_values, q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Load generator (runs in child processes)
# ---------------------------------------------------------------------------------------------


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


async def _run_agent(agent, channel, rank_phase, interval, recorder, shared, slot, vary, register_gate, streams):
    """One simulated agent: register, then heartbeat on its own fixed schedule until cancelled."""
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

    async def watch() -> None:
        # The coordinator sends nothing else unless it ends the stream; a pending read is free.
        with contextlib.suppress(asyncio.CancelledError):
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                pass
            lost[slot] += 1

    watcher = asyncio.create_task(watch())
    message = build_heartbeat(agent)
    heartbeat = message.heartbeat
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
                for sample, base in zip(samples, base_temperatures):
                    sample.temperature_celsius = base + wobble
                    sample.gpu_utilization_percent = 80.0 + (sequence % 20)
            now_ns = time_ns()
            stamp.seconds, stamp.nanos = divmod(now_ns, 1_000_000_000)
            try:
                await call.write(message)
            except (grpc.RpcError, asyncio.InvalidStateError):
                recorder.write_errors += 1
                return
            recorder.sent_total += 1
            sent_wall = now_ns / 1e9
            if window[0] <= sent_wall < window[1]:
                recorder.sent_in_window += 1
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
                        agent, channels[-1], agent / total, interval, recorder, shared, slot,
                        config["vary"], register_gate, streams,
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
    except BaseException as error:  # report, never hang the parent
        result = {"proc_index": config["proc_index"], "fatal": repr(error)}
    results.put(result)


# ---------------------------------------------------------------------------------------------
# Orchestration (parent process)
# ---------------------------------------------------------------------------------------------


class Coordinator:
    def __init__(self, workdir: Path, interval: float) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
        self.log_path = workdir / f"coordinator-{self.port}.log"
        executable = shutil.which("gpuorch-coordinator") or str(Path(sys.executable).parent / "gpuorch-coordinator")
        if Path(executable).exists():
            argv = [executable]
        else:
            argv = [sys.executable, "-m", "coordinator.main"]
        self.argv = [
            *argv,
            "--listen", self.target,
            "--state-dir", str(self.state_dir),
            "--log-level", "warning",
            "--heartbeat-interval", str(interval),
        ]
        self.process: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on the terminal reaches only the bench, which stops us in order
            preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.channel = grpc.insecure_channel(self.target)
        self.stub = cluster_pb2_grpc.ClusterServiceStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                self.status(timeout=1.0)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator not serving after {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def status(self, timeout: float = 10.0) -> cluster_pb2.ClusterStatus:
        return self.stub.GetClusterStatus(cluster_pb2.GetClusterStatusRequest(), timeout=timeout).status

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> int:
        try:
            return len(self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                log("coordinator did not stop within 15 s of SIGTERM; killing it")
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.process.returncode


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


def proc_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def run_step(agents: int, duration: float, args, workdir: Path, cleanup: list) -> dict:
    """Starts a fresh coordinator and `agents` simulated agents, measures a steady window, stops all."""
    intended = agents / args.interval
    coordinator = Coordinator(workdir, args.interval)
    cleanup.append(coordinator.stop)
    generators: Generators | None = None
    step: dict = {"agents": agents, "gpus": agents * DEVICES_PER_AGENT, "intended_send_rate": round(intended, 1)}
    try:
        coordinator.start()
        pid = coordinator.process.pid
        log(f"[{agents} agents] coordinator pid {pid} on {coordinator.target}; starting {args.procs} generator process(es)")
        generators = Generators(coordinator.target, agents, args.procs, args)
        cleanup.append(generators.stop)
        started = time.monotonic()
        generators.start()
        registration_timeout = 60 + agents / 50
        last_report = 0.0
        while generators.registered() < agents:
            if generators.dead():
                raise RuntimeError(f"generator process(es) died during registration: {generators.dead()}")
            if generators.failed():
                raise RuntimeError(f"{generators.failed()} agent(s) failed to register (see above)")
            if coordinator.process.poll() is not None:
                raise RuntimeError(f"coordinator exited with {coordinator.process.returncode}:\n{coordinator.log_tail()}")
            elapsed = time.monotonic() - started
            if elapsed > registration_timeout:
                raise RuntimeError(f"only {generators.registered()}/{agents} agents registered after {registration_timeout:.0f}s")
            if elapsed - last_report >= 5:
                last_report = elapsed
                log(f"[{agents} agents] registered {generators.registered()}/{agents} ({generators.retries()} retried)")
            time.sleep(0.05)
        registration_s = time.monotonic() - started
        step["registration_retries"] = generators.retries()
        # The coordinator's rate and lag cover its last 10 s: make sure that is all steady state.
        warmup = max(args.warmup, COORDINATOR_STATS_WINDOW - duration)
        step["warmup_s"] = warmup
        log(f"[{agents} agents] all registered in {registration_s:.1f}s; warm-up {warmup:.0f}s, then {duration:.0f}s measured")
        start_wall = time.time() + warmup
        end_wall = start_wall + duration
        generators.set_window(start_wall, end_wall)
        # One GetClusterStatus just before the window, so that every sample's 10 s hold exactly one
        # call's stall of the event loop (the previous sample's), the first one included.
        time.sleep(max(0.0, start_wall - 0.5 - time.time()))
        baseline = sample_status(coordinator, start_wall)
        step["status_baseline"] = baseline
        time.sleep(max(0.0, start_wall - time.time()))
        before = cpu_snapshot(pid, generators.pids)
        loadavg_start = os.getloadavg()
        samples = []
        next_sample = start_wall + args.sample_every
        while True:
            now = time.time()
            if now >= end_wall - 1e-3:
                break
            time.sleep(max(0.0, min(next_sample, end_wall) - now))
            if time.time() >= end_wall - 1e-3:
                break
            samples.append(sample_status(coordinator, start_wall))
            log(f"[{agents} agents] {describe_sample(samples[-1])}")
            next_sample += args.sample_every
        after = cpu_snapshot(pid, generators.pids)
        samples.append(sample_status(coordinator, start_wall))  # after the CPU window; its 10 s end with it
        log(f"[{agents} agents] final: {describe_sample(samples[-1])}")
        window_s = after["wall"] - before["wall"]
        coordinator_rss = rss_mb(pid)
        coordinator_fds = open_fds(pid)
        loadavg_end = os.getloadavg()
        lost = generators.lost()
        results = generators.stop()
        cleanup.remove(generators.stop)
        generators = None
        step.update(summarize(agents, duration, warmup, window_s, registration_s, samples, before, after, results, lost, args))
        step.update(
            {
                "coordinator_rss_mb": coordinator_rss,
                "coordinator_open_fds": coordinator_fds,
                "loadavg_start": [round(value, 2) for value in loadavg_start],
                "loadavg_end": [round(value, 2) for value in loadavg_end],
            }
        )
        return step
    finally:
        if generators is not None:
            generators.stop(timeout=10)
            with contextlib.suppress(ValueError):
                cleanup.remove(generators.stop)
        code = coordinator.stop()
        with contextlib.suppress(ValueError):
            cleanup.remove(coordinator.stop)
        step["coordinator_exit_code"] = code
        step["coordinator_log_lines"] = coordinator.log_lines()


def sample_status(coordinator: Coordinator, start_wall: float) -> dict:
    asked = time.monotonic()
    try:
        status = coordinator.status(timeout=STATUS_TIMEOUT)
    except grpc.RpcError as error:  # an overloaded coordinator: a result in itself, not a crash of the bench
        return {"t": round(time.time() - start_wall, 2), "error": f"{error.code().name}: {error.details()}"}
    return {
        "t": round(time.time() - start_wall, 2),
        "rate": round(status.heartbeats_per_second, 1),
        "p50_ms": round(status.heartbeat_lag_p50_ms, 3),
        "p99_ms": round(status.heartbeat_lag_p99_ms, 3),
        "nodes_ready": status.nodes_by_state.get("NODE_STATE_READY", 0),
        "rpc_ms": round((time.monotonic() - asked) * 1000, 2),
    }


def describe_sample(sample: dict) -> str:
    if "error" in sample:
        return f"t={sample['t']:5.1f}s GetClusterStatus failed: {sample['error']}"
    return (
        f"t={sample['t']:5.1f}s ingest {sample['rate']:8.1f}/s lag p50 {sample['p50_ms']:7.2f} ms "
        f"p99 {sample['p99_ms']:7.2f} ms (GetClusterStatus took {sample['rpc_ms']:.0f} ms)"
    )


def summarize(agents, duration, warmup, window_s, registration_s, samples, before, after, results, lost, args) -> dict:
    intended = agents / args.interval
    status_errors = [sample for sample in samples if "error" in sample]
    samples = [sample for sample in samples if "error" not in sample]
    fatal = [r["fatal"] for r in results if "fatal" in r]
    sent_in_window = sum(r.get("sent_in_window", 0) for r in results)
    late = sorted(value for r in results for value in array.array("f", r.get("late_ms", b"")))
    writes = sorted(value for r in results for value in array.array("f", r.get("write_ms", b"")))
    send_rate = sent_in_window / duration if duration else 0.0

    # Ingest rate: samples whose trailing 10 s hold no registration (else the latest one).
    full = [s for s in samples if s["t"] + warmup >= COORDINATOR_STATS_WINDOW - 0.5]
    ingest_rate = statistics.fmean(s["rate"] for s in full) if full else (samples[-1]["rate"] if samples else 0.0)
    heartbeats = ingest_rate * window_s
    coordinator_cpu = after["coordinator"] - before["coordinator"]
    main_thread_cpu = after["coordinator_main_thread"] - before["coordinator_main_thread"]
    generator_cpu = after["generators"] - before["generators"]
    machine_cpu = after["machine"] - before["machine"]
    bench_cpu = after["bench"] - before["bench"]

    # Backlog: ingest keeps pace with sends, and lag does not climb through the window.
    thirds = max(1, len(samples) // 3)
    first, last = samples[:thirds], samples[-thirds:]
    p50_first = statistics.median(s["p50_ms"] for s in first) if first else 0.0
    p50_last = statistics.median(s["p50_ms"] for s in last) if last else 0.0
    p99_first = statistics.median(s["p99_ms"] for s in first) if first else 0.0
    p99_last = statistics.median(s["p99_ms"] for s in last) if last else 0.0
    ingest_ratio = ingest_rate / send_rate if send_rate else 0.0
    ingest_short = ingest_ratio < 1 - INGEST_TOLERANCE
    # A backlog shows in the median first (every heartbeat waits behind it); the p99 moves with
    # one-off stalls (GC pauses, GetClusterStatus) and has its own limit, LAG_LIMIT_MS.
    lag_climbing = (p50_last - p50_first) > max(10.0, 0.5 * p50_first)
    backlog_growing = bool(ingest_short or lag_climbing or lost)
    worst_p99 = max((s["p99_ms"] for s in samples), default=0.0)
    worst_p50 = max((s["p50_ms"] for s in samples), default=0.0)
    generator_keeps_up = send_rate >= (1 - GENERATOR_TOLERANCE) * intended and not fatal
    sustained = bool(
        generator_keeps_up and not backlog_growing and worst_p99 < LAG_LIMIT_MS and not lost and not status_errors and samples
    )
    main_thread_utilization = main_thread_cpu / window_s if window_s else 0.0
    machine_saturated = machine_cpu >= MACHINE_SATURATED * window_s * (os.cpu_count() or 1)
    if sustained:
        limited_by = None
    elif main_thread_utilization >= MAIN_THREAD_SATURATED:
        limited_by = "coordinator"  # its GIL-bound event loop is (nearly) always busy: the hard ceiling
    elif machine_saturated:
        limited_by = "machine-cpu"  # every core busy (coordinator + generator + whatever else runs here)
    elif not generator_keeps_up:
        limited_by = "generator"
    else:
        limited_by = "coordinator"
    return {
        "registration_s": round(registration_s, 2),
        "duration_s": round(window_s, 2),
        "heartbeats_per_s": round(ingest_rate, 1),
        "heartbeats_in_window": int(round(heartbeats)),
        "generator_send_rate": round(send_rate, 1),
        "generator_sent_in_window": sent_in_window,
        "generator_keeps_up": generator_keeps_up,
        "ingest_to_send_ratio": round(ingest_ratio, 4),
        "coordinator_cpu_s": round(coordinator_cpu, 2),
        "coordinator_cpu_utilization": round(coordinator_cpu / window_s, 3) if window_s else None,
        "coordinator_cpu_s_per_1000_heartbeats": round(1000 * coordinator_cpu / heartbeats, 4) if heartbeats else None,
        "coordinator_cpu_us_per_heartbeat": round(1e6 * coordinator_cpu / heartbeats, 1) if heartbeats else None,
        # The asyncio thread holds the GIL for everything Python does (grpc.aio's per-message work, the
        # handlers); gRPC's C++ event-engine threads (socket I/O, HTTP/2) run beside it without the GIL.
        # The main thread reaching ~1.0 is the coordinator's hard ceiling, whatever the number of cores.
        "coordinator_main_thread_cpu_utilization": round(main_thread_cpu / window_s, 3) if window_s else None,
        "coordinator_other_threads_cpu_utilization": (
            round((coordinator_cpu - main_thread_cpu) / window_s, 3) if window_s else None
        ),
        "coordinator_main_thread_us_per_heartbeat": round(1e6 * main_thread_cpu / heartbeats, 1) if heartbeats else None,
        "lag_p50_ms": samples[-1]["p50_ms"] if samples else None,
        "lag_p99_ms": samples[-1]["p99_ms"] if samples else None,
        "lag_p50_worst_ms": worst_p50,
        "lag_p99_worst_ms": worst_p99,
        "lag_p50_first_third_ms": round(p50_first, 3),
        "lag_p50_last_third_ms": round(p50_last, 3),
        "lag_p99_first_third_ms": round(p99_first, 3),
        "lag_p99_last_third_ms": round(p99_last, 3),
        "backlog_growing": backlog_growing,
        "sustained": sustained,
        "limited_by": limited_by,
        "streams_lost": lost,
        "machine_cpu_saturated": machine_saturated,
        "status_rpc_ms_median": round(statistics.median(s["rpc_ms"] for s in samples), 2) if samples else None,
        "status_rpc_ms_max": max((s["rpc_ms"] for s in samples), default=None),
        "generator": {
            "procs": len(results),
            "channels": sum(r.get("channels", 0) for r in results),
            "agents_per_channel": args.agents_per_channel,
            "cpu_s": round(generator_cpu, 2),
            "cpu_utilization": round(generator_cpu / window_s, 3) if window_s else None,
            "schedule_late_p50_ms": round(quantile(late, 0.5), 3),
            "schedule_late_p99_ms": round(quantile(late, 0.99), 3),
            "schedule_late_max_ms": round(late[-1], 3) if late else 0.0,
            "write_p50_ms": round(quantile(writes, 0.5), 3),
            "write_p99_ms": round(quantile(writes, 0.99), 3),
            "skipped_slots": sum(r.get("skipped_slots", 0) for r in results),
            "write_errors": sum(r.get("write_errors", 0) for r in results),
            "errors": [e for r in results for e in r.get("errors", [])][:5] + fatal,
        },
        "machine_cpu_s": {
            "busy_total": round(machine_cpu, 2),
            "coordinator": round(coordinator_cpu, 2),
            "generators": round(generator_cpu, 2),
            "bench_main": round(bench_cpu, 2),
            "other_processes": round(machine_cpu - coordinator_cpu - generator_cpu - bench_cpu, 2),
            "capacity": round(window_s * (os.cpu_count() or 1), 2),
        },
        "status_samples": samples + status_errors,
        "status_errors": len(status_errors),
    }


def step_line(step: dict) -> str:
    return (
        f"{step['agents']} agents: sent {step.get('generator_send_rate')}/s (intended {step['intended_send_rate']}), "
        f"ingest {step.get('heartbeats_per_s')}/s, p99 worst {step.get('lag_p99_worst_ms')} ms, "
        f"coordinator cpu {step.get('coordinator_cpu_utilization')} core, backlog {step.get('backlog_growing')} -> "
        f"{'SUSTAINED' if step.get('sustained') else 'NOT sustained (' + str(step.get('limited_by')) + ')'}"
    )


def compact_step(step: dict) -> dict:
    """The facts of one --find-max step that decide it, for the summary."""
    keys = (
        "agents", "retry", "sustained", "limited_by", "generator_send_rate", "heartbeats_per_s", "ingest_to_send_ratio",
        "lag_p50_ms", "lag_p99_worst_ms", "lag_p50_first_third_ms", "lag_p50_last_third_ms", "backlog_growing",
        "streams_lost", "status_errors", "coordinator_cpu_utilization", "coordinator_main_thread_cpu_utilization",
        "coordinator_cpu_s_per_1000_heartbeats", "status_rpc_ms_median", "registration_s", "registration_retries",
    )
    compact = {key: step[key] for key in keys if key in step}
    if "generator" in step:
        compact["generator_cpu_utilization"] = step["generator"]["cpu_utilization"]
        compact["generator_write_p99_ms"] = step["generator"]["write_p99_ms"]
    if "machine_cpu_s" in step:
        compact["other_processes_cpu_s"] = step["machine_cpu_s"]["other_processes"]
    return compact


def find_max(args, workdir: Path, cleanup: list) -> tuple[dict | None, list[dict], int | None, str | None]:
    steps: list[dict] = []
    best: dict | None = None
    failed_at: int | None = None
    limit_reason: str | None = None

    def attempt(agents: int) -> dict:
        step = run_step(agents, args.step_seconds, args, workdir, cleanup)
        log(step_line(step))
        steps.append(step)
        for retry in range(args.retries):
            if step["sustained"] or step["limited_by"] == "generator":
                break
            log(f"[{agents} agents] not sustained; retry {retry + 1} (the machine is shared: one stall should not decide)")
            step = run_step(agents, args.step_seconds, args, workdir, cleanup)
            step["retry"] = retry + 1
            log(step_line(step))
            steps.append(step)
        return step

    ladder = [n for n in FIND_MAX_LADDER if n <= args.max_agents]
    for agents in ladder:
        step = attempt(agents)
        if step["sustained"]:
            best = step
            continue
        failed_at, limit_reason = agents, step["limited_by"]
        break
    # Bisect between the last sustained count and the first that was not (a generator limit says
    # nothing about the coordinator, so it ends the search).
    if failed_at is not None and limit_reason != "generator":
        low = best["agents"] if best else 0
        for _ in range(args.refine):
            middle = int(round((low + failed_at) / 2 / args.resolution) * args.resolution)
            if middle <= low or middle >= failed_at:
                break
            step = attempt(middle)
            if step["sustained"]:
                low, best = middle, step
            else:
                failed_at, limit_reason = middle, step["limited_by"]
                if limit_reason == "generator":
                    break
    return best, steps, failed_at, limit_reason


def machine_info() -> dict:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "protobuf": __import__("google.protobuf").protobuf.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=2000, help="simulated agents, 8 GPUs each (default 2000)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds of the steady run (default 60)")
    parser.add_argument("--find-max", action="store_true", help="step the agent count up; report the largest sustained")
    parser.add_argument("--step-seconds", type=float, default=20.0, help="measured seconds per --find-max step (default 20)")
    parser.add_argument("--max-agents", type=int, default=16000, help="highest count --find-max tries (default 16000)")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the first unsustained count (default 2)")
    parser.add_argument("--resolution", type=int, default=250, help="agent-count granularity of the bisection (default 250)")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a --find-max step the coordinator failed (default 1)")
    parser.add_argument("--procs", type=int, default=2, help="generator processes (default 2)")
    parser.add_argument("--agents-per-channel", type=int, default=1, help="agents sharing one channel/connection (default 1)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval in seconds (default 1)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds from the last registration to the window (default 5)")
    parser.add_argument(
        "--sample-every",
        type=float,
        default=COORDINATOR_STATS_WINDOW,
        help="seconds between GetClusterStatus samples (default 10, the coordinator's stats window; each call "
        "blocks the coordinator's event loop while it walks every GPU, so polling faster inflates the lag it measures)",
    )
    parser.add_argument("--register-concurrency", type=int, default=64, help="registrations in flight per process (default 64)")
    parser.add_argument(
        "--static-telemetry", action="store_true", help="send identical telemetry (skips the coordinator's health re-check)"
    )
    args = parser.parse_args(argv)
    if args.agents < 1 or args.procs < 1 or args.agents_per_channel < 1 or args.interval <= 0:
        parser.error("--agents, --procs and --agents-per-channel must be >= 1 and --interval > 0")
    if args.duration <= 0 or args.step_seconds <= 0 or args.sample_every <= 0:
        parser.error("--duration, --step-seconds and --sample-every must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["heartbeats.py", *argv])
    fd_limit = raise_fd_limit()
    needed = (args.max_agents if args.find_max else args.agents) / args.agents_per_channel + 200
    if needed > fd_limit:
        log(f"warning: the open-file limit {fd_limit} may be too low for {int(needed)} connections")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    cleanup: list = []
    workdir = Path(tempfile.mkdtemp(prefix="gpuorch-bench-heartbeats-"))
    started = time.time()
    keep = False
    try:
        if args.find_max:
            best, steps, failed_at, limit_reason = find_max(args, workdir, cleanup)
            head = best or (steps[0] if steps else {})
            result = {
                "benchmark": "heartbeats",
                "mode": "find-max",
                **{key: value for key, value in head.items() if key not in ("status_samples",)},
                "max_sustained_agents": best["agents"] if best else 0,
                "max_sustained_gpus": best["gpus"] if best else 0,
                "first_unsustained_agents": failed_at,
                "search_capped_by_max_agents": failed_at is None,
                "limited_by": limit_reason,
                "criteria": {
                    "lag_p99_ms_below": LAG_LIMIT_MS,
                    "ingest_within_fraction_of_send": INGEST_TOLERANCE,
                    "generator_within_fraction_of_intended": GENERATOR_TOLERANCE,
                },
                "top_level_metrics_from": "the largest sustained step" if best else "the first step (none was sustained)",
                "steps": [compact_step(step) for step in steps],
            }
        else:
            step = run_step(args.agents, args.duration, args, workdir, cleanup)
            log(step_line(step))
            result = {"benchmark": "heartbeats", "mode": "steady", **step, "max_sustained_agents": None}
        result.update(
            {
                "devices_per_agent": DEVICES_PER_AGENT,
                "heartbeat_interval_s": args.interval,
                "telemetry_varies": not args.static_telemetry,
                "sample_every_s": args.sample_every,
                "wall_s": round(time.time() - started, 1),
                "machine": machine_info(),
                "command": command,
            }
        )
        print(json.dumps(result, indent=2))
        return 0
    except KeyboardInterrupt as interrupt:
        log(f"interrupted ({str(interrupt) or 'Ctrl-C'}); stopping everything")
        return 130
    except Exception as error:
        log(f"error: {error}")
        keep = True
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up even if Ctrl-C is pressed again
        for stop in reversed(cleanup):
            with contextlib.suppress(Exception):
                stop()
        if keep:
            log(f"coordinator logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
