"""gpuorch-agent: the node daemon."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import structlog

from agent.agent import Agent
from agent.cgroups import RankLimits, open_rank_cgroups
from agent.identity import IdentityPolicy
from agent.metrics import serve_metrics
from agent.settings import AgentSettings
from agent.supervisor import Supervisor
from agent.telemetry import TelemetryUnavailable, open_source
from gpuorch import sdnotify, tls
from gpuorch.backoff import Backoff
from gpuorch.settings import daemon_settings
from gpuorch.v1 import agent_pb2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpuorch-agent",
        description="gpuorch node agent: reports this node's GPUs to the coordinator and runs job ranks on them.",
        epilog="Every setting can also come from the --config TOML file or a GPUORCH_<SETTING> environment variable.",
    )
    parser.add_argument("--config", help="TOML file with settings (flags and env vars override it)")
    parser.add_argument("--coordinator", help="host:port of the coordinator (default 127.0.0.1:50051)")
    parser.add_argument("--node-id", help="unique id of this node (default: the hostname)")
    parser.add_argument("--state-dir", help="directory for rank logs and state (default /var/lib/gpuorch/agent)")
    parser.add_argument("--simulate-gpus", type=int, metavar="N", help="simulate N GPUs instead of reading NVML")
    parser.add_argument("--simulate-faults-file", metavar="FILE", help="JSON file of injected faults for simulated GPUs")
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="S", help="seconds between heartbeats (default: the coordinator's)"
    )
    parser.add_argument("--advertise-address", help="address other nodes reach this one on")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA of the coordinator's certificate; turns TLS on")
    parser.add_argument(
        "--tls-cert", metavar="PEM", help="this node's client certificate (mutual TLS; node id must be one of its names)"
    )
    parser.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here, e.g. 0.0.0.0:9401 (default: off)"
    )
    parser.add_argument(
        "--allowed-users", metavar="U,@G,...", help="owners whose jobs may run here (names or @groups; default: any)"
    )
    parser.add_argument(
        "--allow-root-ranks",
        action="store_true",
        default=None,
        help="when running as root, also start ranks as root (jobs of root or without owner); default: refused",
    )
    parser.add_argument(
        "--single-user",
        action="store_true",
        default=None,
        help="this node is one user's: every rank runs as the agent's own user (even root), whatever owner the job names",
    )
    parser.add_argument(
        "--cgroup-root",
        metavar="DIR",
        help="cgroup v2 directory for the ranks' cgroups (default: the agent's own cgroup when delegated; \"off\": none)",
    )
    parser.add_argument("--default-pids-max", type=int, metavar="N", help="pids.max of a rank's cgroup when its job sets none")
    parser.add_argument(
        "--default-memory-max-bytes", type=int, metavar="B", help="memory.max of a rank's cgroup when its job sets none"
    )
    parser.add_argument(
        "--max-log-bytes",
        type=int,
        metavar="B",
        help="rotate a rank's log to rank-N.log.1 past this size (default 1 GiB; 0: never)",
    )
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--log-format", help="json, console or auto")
    return parser.parse_args(argv)


READY_TIMEOUT_SECONDS = 2.0
"""READY=1 comes at the latest this long after start-up, even if the first connection attempt still hangs."""


async def notify_ready(agent: Agent) -> None:
    """Tells systemd the agent is ready once its first connection attempt is over, either way.

    Readiness never waits for the coordinator: a node must boot, and recover its
    ranks, while the coordinator is down; an agent that retries is doing its job.
    """
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not (agent.registered.is_set() or agent.reconnects) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sdnotify.ready(f"node {agent.node_id}, coordinator {agent.coordinator}")


async def serve(settings: AgentSettings, credentials: grpc.ChannelCredentials | None = None) -> None:
    sdnotify.start_watchdog()  # pings from the event loop: a stuck loop gets the daemon restarted
    node_id = settings.node_id or socket.gethostname()
    state_dir = Path(settings.state_dir).absolute()  # ranks run elsewhere (their working dir); their shim writes here
    state_dir.mkdir(parents=True, exist_ok=True)
    faults_file = settings.simulate_faults_file or str(state_dir / "simulated-faults.json")
    source = open_source(simulate_gpus=settings.simulate_gpus, node_id=node_id, faults_file=faults_file)
    agent = Agent(
        coordinator=settings.coordinator,
        node_id=node_id,
        source=source,
        heartbeat_interval=settings.heartbeat_interval,
        advertise_address=settings.advertise_address,
        backoff=Backoff(initial=settings.reconnect_initial, cap=settings.reconnect_max),
        credentials=credentials,
    )
    supervisor = Supervisor(
        state_dir,
        report=lambda status: agent.send(agent_pb2.AgentMessage(task_status=status)),
        identity_policy=IdentityPolicy(tuple(settings.allowed_users), settings.allow_root_ranks, settings.single_user),
        owners_authenticated=lambda: agent.owners_authenticated,
        cgroups=open_rank_cgroups(settings.cgroup_root),
        default_limits=RankLimits(settings.default_pids_max, settings.default_memory_max_bytes),
        max_log_bytes=settings.max_log_bytes,
    )
    attach_supervisor(agent, supervisor)
    await supervisor.recover()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    metrics = serve_metrics(settings.metrics_listen, agent, supervisor) if settings.metrics_listen else None
    readiness = loop.create_task(notify_ready(agent))
    try:
        await agent.run(stopping)
    finally:
        sdnotify.stopping("stopping; ranks keep running")
        readiness.cancel()
        # Ranks outlive the agent (a restart or upgrade must not kill a three-day job).
        await supervisor.close()
        source.close()
        if metrics is not None:
            metrics.close()


def attach_supervisor(agent: Agent, supervisor: Supervisor) -> None:
    """Routes the coordinator's instructions to the supervisor.

    Launches run one after another on one task, in the order they came, so the
    stream reader never waits on a process start. Stops run on their own tasks:
    one rank's grace period must not delay the next launch. Log reads are
    answered at once.
    """
    launches: asyncio.Queue = asyncio.Queue()

    async def launch_in_order() -> None:
        while True:
            launch = await launches.get()
            try:
                await supervisor.launch(launch)
            except Exception:
                structlog.get_logger("agent").exception("launch failed", job=launch.job_id, attempt=launch.attempt)

    async def stop(message: agent_pb2.CoordinatorMessage) -> None:
        await supervisor.stop(message.stop_task)
        supervisor.acknowledge(message.stop_task.job_id, message.stop_task.attempt)

    background: set[asyncio.Task] = {asyncio.get_running_loop().create_task(launch_in_order())}

    def spawn(coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        background.add(task)
        task.add_done_callback(background.discard)

    agent.task_snapshot = supervisor.snapshot
    agent.progress_snapshot = supervisor.progress
    agent.handlers["launch_task"] = lambda message: launches.put_nowait(message.launch_task)
    agent.handlers["stop_task"] = lambda message: spawn(stop(message))
    agent.handlers["read_logs"] = lambda message: agent.send(
        agent_pb2.AgentMessage(log_chunk=supervisor.read_log(message.read_logs))
    )


def main(argv: list[str] | None = None) -> int:
    settings = daemon_settings(AgentSettings, parse_args(argv), "gpuorch-agent")
    credentials = None
    if settings.tls_ca or settings.tls_cert:
        try:
            credentials = tls.channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        except tls.TlsConfigError as error:
            print(f"gpuorch-agent: {error}", file=sys.stderr)
            return 2  # a bad config does not fix itself: the unit does not restart on 2
    try:
        asyncio.run(serve(settings, credentials))
    except TelemetryUnavailable as error:
        print(f"gpuorch-agent: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"gpuorch-agent: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
