"""gpuorch-dashboard: flags, TLS on the listen port, and serving until SIGTERM or SIGINT.

    gpuorch-dashboard --coordinator 127.0.0.1:50051 --listen 127.0.0.1:8080

Off loopback it serves HTTPS only (--tls-cert, --tls-key), as the coordinator serves TLS only off
loopback: sign-in tokens and session cookies must not cross the network in the clear.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys

from gpuorch import tls
from gpuorch.client import default_address
from gpuorch.logs import configure_logging, get_logger

log = get_logger("gpuorch.dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuorch-dashboard",
        description="A web dashboard of a gpuorch cluster: nodes and GPUs, the queue, jobs, usage; a client of the gRPC API.",
        epilog="example: gpuorch-dashboard --coordinator gpu-head:50051 --listen 0.0.0.0:8443 --tls-cert c.pem --tls-key k.pem",
    )
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("GPUORCH_COORDINATOR") or default_address(),
        help="HOST:PORT[,HOST:PORT...] of the coordinator(s); the next is tried when one is unavailable "
        "(default $GPUORCH_COORDINATOR or 127.0.0.1:50051)",
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT the dashboard serves on (default 127.0.0.1:8080)")
    parser.add_argument(
        "--token-file",
        default="",
        help="file holding the dashboard's own token (role user is enough), for the shared views when tokens are on "
        "(default $GPUORCH_TOKEN; without either, they are read with a signed-in viewer's token)",
    )
    parser.add_argument(
        "--allow-actions", action="store_true", help="with tokens off: offer cancel, priority, drain and resume to every viewer"
    )
    parser.add_argument("--tls-cert", default="", metavar="PEM", help="certificate for HTTPS on --listen")
    parser.add_argument("--tls-key", default="", metavar="PEM", help="key of --tls-cert")
    parser.add_argument(
        "--insecure", action="store_true", help="serve plain HTTP on an address other than loopback (tokens cross in the clear)"
    )
    parser.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="CA of the coordinator's certificate (default $GPUORCH_TLS_CA)"
    )
    parser.add_argument("--client-cert", default=None, metavar="PEM", help="client certificate towards the coordinator")
    parser.add_argument("--client-key", default=None, metavar="PEM", help="key of --client-cert")
    parser.add_argument(
        "--client-insecure", action="store_true", default=None, help="plaintext to a coordinator off this machine"
    )
    parser.add_argument("--refresh-seconds", type=float, default=2.0, help="how often the shared views are read (default 2)")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    parser.add_argument("--log-format", default="auto", help="json, console or auto")
    return parser


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def ssl_context(args: argparse.Namespace, host: str) -> ssl.SSLContext | None:
    """HTTPS when a certificate is given; refuses plain HTTP off loopback unless --insecure."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if not args.tls_cert:
        if not tls.is_loopback_host(host) and not args.insecure:
            raise ValueError(
                f"--listen {args.listen!r} is not a loopback address and there is no --tls-cert/--tls-key: set them, "
                "or listen on 127.0.0.1 (behind a TLS proxy), or pass --insecure to serve plain HTTP anyway"
            )
        return None
    tls.read_pem(args.tls_cert, "--tls-cert")
    tls.read_pem(args.tls_key, "--tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.expandvars(args.tls_cert), os.path.expandvars(args.tls_key))
    return context


def own_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file) as handle:
                token = handle.read().strip()
        except OSError as error:
            raise ValueError(f"--token-file {args.token_file}: {error.strerror or error}") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("GPUORCH_TOKEN", "")


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from gpuorch.dashboard.app import DashboardConfig, build_app
    from gpuorch.dashboard.feed import ClientOptions, Coordinators, Feed, parse_addresses
    from gpuorch.dashboard.sessions import Sessions

    host, port = split_listen(args.listen)
    context = ssl_context(args, host)
    options = ClientOptions(
        parse_addresses(args.coordinator), args.tls_ca, args.client_cert, args.client_key, args.client_insecure
    )
    token = own_token(args)
    sessions = Sessions()
    coordinators = Coordinators(options)
    feed = Feed(coordinators, token, sessions.any_token, interval=args.refresh_seconds)
    config = DashboardConfig(own_token=token, allow_actions=args.allow_actions, secure_cookie=context is not None)
    runner = web.AppRunner(build_app(feed, sessions, config), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, shutdown_timeout=1.0)
    await site.start()
    log.info("dashboard serving", listen=args.listen, https=context is not None, coordinator=args.coordinator)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    refresher = asyncio.create_task(feed.run())
    try:
        await stop.wait()
    finally:
        refresher.cancel()
        await runner.cleanup()
        await coordinators.close()
        log.info("dashboard stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("gpuorch-dashboard needs aiohttp: pip install 'gpuorch[dashboard]'", file=sys.stderr)
        return 2
    try:
        configure_logging(args.log_level, args.log_format)
        asyncio.run(serve(args))
    except (ValueError, tls.TlsConfigError, ssl.SSLError, OSError) as error:
        print(f"gpuorch-dashboard: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
