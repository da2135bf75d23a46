"""gpuorch-coordinator: the control-plane daemon."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from coordinator.control.leadership import EXIT_STEPPED_DOWN
from coordinator.control.liveness_loop import tune_collector
from coordinator.scheduler import POLICIES
from coordinator.settings import CoordinatorSettings
from coordinator.wiring import Coordinator
from gpuorch import sdnotify
from gpuorch.settings import daemon_settings
from gpuorch.stacks import log_stacks_on_sigusr1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpuorch-coordinator",
        description="gpuorch control plane: cluster view, job queue, scheduler, failure recovery.",
        epilog="Every setting can also come from the --config TOML file or a GPUORCH_<SETTING> environment variable.",
    )
    parser.add_argument("--config", help="TOML file with settings (flags and env vars override it)")
    parser.add_argument("--listen", help="host:port of the gRPC API (default 127.0.0.1:50051)")
    parser.add_argument("--state-dir", help="directory for the job store and epoch (default /var/lib/gpuorch/coordinator)")
    parser.add_argument(
        "--store-url", metavar="URL", help="postgresql://USER@HOST/DB or sqlite:PATH (default: SQLite in the state dir)"
    )
    parser.add_argument(
        "--leader-lease-seconds", type=float, help="with PostgreSQL: seconds a silent leader keeps its lease (default 3)"
    )
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between agent heartbeats (default 1)")
    parser.add_argument(
        "--node-grace-period", type=float, help="seconds a disconnected node has to return before it is DOWN (default 10)"
    )
    parser.add_argument(
        "--missed-heartbeats", type=int, help="silent heartbeat intervals before a connected node is DOWN (default 3)"
    )
    parser.add_argument("--scheduler-policy", choices=POLICIES, help="queue order (default priority)")
    parser.add_argument(
        "--stop-grace-period", type=float, help="seconds between SIGTERM and SIGKILL when ranks are stopped (default 10)"
    )
    parser.add_argument(
        "--preemption-grace-seconds", type=float, help="seconds a preempted job has to checkpoint before SIGKILL (default 30)"
    )
    parser.add_argument(
        "--launch-timeout-seconds", type=float, help="seconds every rank has to start after a launch; 0: no limit (default 120)"
    )
    parser.add_argument(
        "--restart-backoff-base", type=float, help="seconds before a job's second restart; doubles after (default 1)"
    )
    parser.add_argument(
        "--device-recovery-seconds", type=float, help="seconds a GPU must be healthy again before it gets work (default 300)"
    )
    parser.add_argument("--checkpoint-root", help="shared directory for GPUORCH_CHECKPOINT_DIR (default <state-dir>/checkpoints)")
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here, e.g. 0.0.0.0:9400 (default: off)"
    )
    parser.add_argument(
        "--advertise-address", metavar="HOST:PORT", help="where clients reach this coordinator (default: listen, if not 0.0.0.0)"
    )
    parser.add_argument(
        "--advertise-agent-address", metavar="HOST:PORT", help="where agents reach agent_listen (default: agent_listen)"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate of the gRPC port; with --tls-key turns TLS on")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM", help="CA of the agents' client certificates: mutual TLS for agents")
    parser.add_argument("--agent-listen", metavar="HOST:PORT", help="separate mutual-TLS port for agents (needs --tls-client-ca)")
    parser.add_argument("--tokens-file", metavar="TOML", help="[[tokens]] file: clients must send a bearer token")
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a non-loopback address without TLS, tokens or agent certificates (avoid)",
    )
    parser.add_argument(
        "--max-pending-jobs-per-user", type=int, help="pending jobs one owner may queue (default 1000; 0 = no limit)"
    )
    parser.add_argument("--max-streams-per-client", type=int, help="open server streams per client (default 64; 0 = no limit)")
    parser.add_argument(
        "--max-streams", type=int, help="open server streams of all clients together (default 1000; 0 = no limit)"
    )
    parser.add_argument("--max-user-priority", type=int, help="highest job priority a non-admin may set (default 100)")
    parser.add_argument(
        "--local-socket",
        metavar="PATH",
        help="Unix socket for local clients, owner from the kernel (default <state_dir>/gpuorch.sock; '' = none)",
    )
    parser.add_argument(
        "--tokenless-tcp-clients",
        metavar="BOOL",
        help="with no tokens file, serve clients over TCP as anyone (default true) or refuse them",
    )
    parser.add_argument("--allowed-nodes", metavar="ID,ID", help="node ids that may register (default: any)")
    parser.add_argument(
        "--handshake-timeout", type=float, help="seconds a connection has to finish its TLS handshake (default 5)"
    )
    parser.add_argument(
        "--max-connections", type=int, help="open connections of the gRPC ports in all (default 0: from the open-file limit)"
    )
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--log-format", help="json, console or auto")
    return parser.parse_args(argv)


async def serve(settings: CoordinatorSettings) -> int:
    """Runs the daemon until SIGTERM or SIGINT (0), or until it lost the leader lease (EXIT_STEPPED_DOWN)."""
    sdnotify.start_watchdog()  # pings from the event loop: a stuck loop gets the daemon restarted
    tune_collector()
    log_stacks_on_sigusr1(asyncio.get_running_loop(), structlog.get_logger("coordinator"))
    coordinator = Coordinator(settings)
    await coordinator.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # READY once the port answers, leading or standing by: a standby is a started service too.
    role = "serving" if coordinator.leading.is_set() else "standing by"
    sdnotify.ready(f"{role} on {settings.listen.rsplit(':', 1)[0]}:{coordinator.port}")
    ended = [asyncio.create_task(stopping.wait()), asyncio.create_task(coordinator.stepped_down.wait())]
    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
    for task in ended:
        task.cancel()
    if coordinator.stepped_down.is_set():
        # Exits for its supervisor to start it again, as a standby (systemd: Restart=on-failure).
        sdnotify.stopping(f"stepped down: {coordinator.leadership.reason}")
        await coordinator.stop(grace=0)
        return EXIT_STEPPED_DOWN
    sdnotify.stopping("stopping: finishing in-flight calls")
    await coordinator.stop()
    return 0


def migrate(argv: list[str]) -> int:
    """gpuorch-coordinator migrate --from sqlite:PATH --to postgresql://...: copies a SQLite store into PostgreSQL."""
    from coordinator.store.open_url import parse_store_url
    from coordinator.store.postgres_schema import describe
    from coordinator.store.transfer import TransferError, copy_to_postgres, read_sqlite

    parser = argparse.ArgumentParser(
        prog="gpuorch-coordinator migrate",
        description="Copy every job (all states), drain and the epoch of a SQLite store into PostgreSQL. Stop the "
        "coordinator first; the SQLite file is only read.",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite store (its jobs.db)")
    parser.add_argument("--to", dest="target", required=True, metavar="postgresql://...", help="the PostgreSQL store")
    parser.add_argument("--force", action="store_true", help="copy into a store that holds jobs (same sequences replaced)")
    args = parser.parse_args(argv)
    try:
        source, target = parse_store_url(args.source, "."), parse_store_url(args.target, ".")
        if not args.source.startswith("sqlite:") or target.engine != "postgresql":
            raise ValueError("migrate copies --from sqlite:PATH --to postgresql://...")
        report = copy_to_postgres(read_sqlite(Path(source.target)), target.target, force=args.force)
    except (ValueError, TransferError) as error:
        print(f"gpuorch-coordinator migrate: {error}", file=sys.stderr)
        return 2
    states = ", ".join(f"{name} {count}" for name, count in report.jobs_by_state.items()) or "none"
    print(
        f"copied {report.jobs} jobs ({states}), {report.drains} drains and epoch {report.epoch} "
        f"from {args.source} to {describe(target.target)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:
        return migrate(argv[1:])
    settings = daemon_settings(CoordinatorSettings, parse_args(argv), "gpuorch-coordinator")
    try:
        return asyncio.run(serve(settings))
    except ValueError as error:  # a bad tokens file or certificate: the config must change
        structlog.get_logger("coordinator").error("cannot start", error=str(error))
        print(f"gpuorch-coordinator: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        structlog.get_logger("coordinator").error("cannot start", error=str(error))
        print(f"gpuorch-coordinator: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
