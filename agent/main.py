"""gpuorch-agent: the node daemon."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

import grpc

from agent.coordinator_link import CoordinatorLink
from agent.identity import IdentityPolicy
from agent.metrics import serve_metrics
from agent.ranks.cgroups import RankLimits, open_rank_cgroups
from agent.ranks.supervisor import Supervisor
from agent.router import Router
from agent.settings import AgentSettings
from agent.telemetry import TelemetryUnavailable, open_source
from gpuorch import sdnotify, tls
from gpuorch.backoff import Backoff
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.settings import daemon_settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpuorch-agent",
        description="gpuorch node agent: reports this node's GPUs to the coordinator and runs job ranks on them.",
        epilog="Every setting can also come from the --config TOML file or a GPUORCH_<SETTING> environment variable.",
    )
    parser.add_argument("--config", help="TOML file with settings (flags and env vars override it)")
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the coordinator, or a comma-separated list of them: the agent follows their leader (default 127.0.0.1:50051)",
    )
    parser.add_argument("--node-id", help="unique id of this node (default: the hostname)")
    parser.add_argument("--state-dir", help="directory for rank logs and state (default /var/lib/gpuorch/agent)")
    parser.add_argument("--simulate-gpus", type=int, metavar="N", help="simulate N GPUs instead of reading NVML")
    parser.add_argument("--simulate-faults-file", metavar="FILE", help="JSON file of injected faults for simulated GPUs")
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="S", help="seconds between heartbeats (default: the coordinator's)"
    )
    parser.add_argument("--advertise-address", help="address other nodes reach this one on")
    parser.add_argument("--pool", help="node pool this node serves (default: default); jobs that ask for a pool run only there")
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


async def notify_ready(link: CoordinatorLink, clock: Clock) -> None:
    """Tells systemd the agent is ready once its first connection attempt is over, either way.

    Readiness never waits for the coordinator: a node must boot, and recover its
    ranks, while the coordinator is down; an agent that retries is doing its job.
    """
    deadline = clock.monotonic() + READY_TIMEOUT_SECONDS
    # Polled, not awaited on an event: "the first attempt failed" (a reconnect counted) has no event.
    while not (link.registered.is_set() or link.reconnects) and clock.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    sdnotify.ready(f"node {link.node_id}, coordinator {link.coordinator}")


async def serve(settings: AgentSettings, credentials: grpc.ChannelCredentials | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
    sdnotify.start_watchdog()  # pings from the event loop: a stuck loop gets the daemon restarted
    node_id = settings.node_id or socket.gethostname()
    state_dir = Path(settings.state_dir).absolute()  # ranks run elsewhere (their working dir); their shim writes here
    state_dir.mkdir(parents=True, exist_ok=True)
    faults_file = settings.simulate_faults_file or str(state_dir / "simulated-faults.json")
    source = open_source(simulate_gpus=settings.simulate_gpus, node_id=node_id, faults_file=faults_file)
    link = CoordinatorLink(
        coordinator=settings.coordinator,
        node_id=node_id,
        source=source,
        heartbeat_interval=settings.heartbeat_interval,
        advertise_address=settings.advertise_address,
        pool=settings.pool,
        backoff=Backoff(initial=settings.reconnect_initial, cap=settings.reconnect_max),
        credentials=credentials,
        clock=clock,
    )
    supervisor = Supervisor(
        state_dir,
        report=link.report,
        identity_policy=IdentityPolicy(tuple(settings.allowed_users), settings.allow_root_ranks, settings.single_user),
        owners_authenticated=lambda: link.owners_authenticated,
        cgroups=open_rank_cgroups(settings.cgroup_root),
        default_limits=RankLimits(settings.default_pids_max, settings.default_memory_max_bytes),
        max_log_bytes=settings.max_log_bytes,
        clock=clock,
    )
    router = Router(supervisor, send=link.send, is_current=link.is_current)
    link.on_message = router.handle
    link.task_snapshot = supervisor.snapshot
    link.progress_snapshot = supervisor.progress
    await supervisor.recover()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    metrics = serve_metrics(settings.metrics_listen, link, supervisor) if settings.metrics_listen else None
    readiness = loop.create_task(notify_ready(link, clock))
    try:
        await link.run(stopping)
    finally:
        sdnotify.stopping("stopping; ranks keep running")
        readiness.cancel()
        # Ranks outlive the agent (a restart or upgrade must not kill a three-day job).
        await router.close()
        await supervisor.close()
        source.close()
        if metrics is not None:
            metrics.close()


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
