"""The gRPC server's options, the connection cap the open-file limit allows, and the warnings about what the network
can do to a coordinator set up as this one is."""

from __future__ import annotations

import resource

from coordinator.settings import CoordinatorSettings
from gpuorch.logs import get_logger

log = get_logger("coordinator")

FILE_DESCRIPTOR_HEADROOM = 256
"""File descriptors kept for what is not a connection: the job store, logs, the metrics port."""
DEFAULT_FILE_LIMIT = 65536
"""The open-file limit asked for when max_connections is 0 (the unit's LimitNOFILE=)."""
MIN_CONNECTIONS = 64


def server_options(max_message_bytes: int, handshake_timeout: float = 5.0, max_connections: int = 0) -> list[tuple[str, int]]:
    options = [
        # A connection that never finishes its handshake (TLS, or HTTP/2's preface) is closed after this,
        # not after grpc's default of 120 s: idle half-open connections would otherwise use up the fds.
        ("grpc.server_handshake_timeout_ms", int(handshake_timeout * 1000)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Agents ping to find a dead coordinator fast; let them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]
    if max_connections:
        # grpcio has no cap per peer; this caps all of a server's connections together, below the fd limit.
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    return options


def raise_file_limit(wanted: int) -> int:
    """Raises the soft fd limit towards `wanted` (at most the hard limit); returns the limit now in force.

    Outside systemd (LimitNOFILE=) the soft limit is often 1024: a few hundred agents and
    clients would exhaust it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, wanted=target, error=str(error))
    return soft


def connection_cap(wanted: int) -> int:
    """`wanted` (max_connections), or (0) what, the open-file limit allows once raised: connections must not take the fds
    the job store and the log need."""
    file_limit = raise_file_limit((wanted or DEFAULT_FILE_LIMIT) + FILE_DESCRIPTOR_HEADROOM)
    allowed = max(file_limit - FILE_DESCRIPTOR_HEADROOM, MIN_CONNECTIONS)
    if wanted > allowed:
        log.warning("max_connections is above what the open-file limit allows; raise LimitNOFILE (ulimit -n)",
                    max_connections=wanted, open_file_limit=file_limit)  # fmt: skip
    return wanted or allowed


def warn_about_exposure(settings: CoordinatorSettings, tokens: bool) -> None:
    """Says in the log what the network can do to this coordinator, whenever that is more than it should."""
    if not settings.tls_cert:
        if settings.insecure:
            log.warning(
                "TLS is off and insecure is set: serving plaintext; tokens and job specs cross the network unencrypted",
                listen=settings.listen,
            )
        else:
            log.warning(
                "TLS is off: serving on loopback only; set tls_cert and tls_key to serve other machines",
                listen=settings.listen,
            )
    if not tokens and settings.tokenless_tcp_clients:
        log.warning(
            "tokens_file is not set: every TCP client may act as any user, and as admin; agents are told owners are not "
            "authenticated (set tokenless_tcp_clients = false to serve clients on the local socket only)"
        )
    if not settings.tls_client_ca:
        log.warning("tls_client_ca is not set: agents are not authenticated; whatever reaches the port can register as a node")
