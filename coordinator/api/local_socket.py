"""The local socket: clients on this machine, each known by the user the kernel says it runs as.

grpcio tells a handler nothing of a Unix-socket peer's credentials (`context.peer()` is
"unix:" and the auth context has no uid), and it cannot serve a socket that it did not
accept itself. So the coordinator accepts on the public socket itself, reads each
connection's SO_PEERCRED, and relays its bytes to a gRPC port on a second Unix socket in
a directory only the coordinator's user can enter. The relay binds its end of each
relayed connection to a path of its own, which grpc reports as that call's peer
("unix:<path>"); `Guard.local_peers` maps the path to the kernel's user for as long as
the connection lives. Nobody else can create paths in that directory or connect to the
gRPC socket in it, so a peer string found in the map is the relay's.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import os
import pwd
import socket
import stat
import struct
from pathlib import Path

from coordinator.api.auth import Caller, Guard
from coordinator.settings import CoordinatorSettings
from gpuorch.logs import get_logger

log = get_logger("coordinator.local_socket")

MAX_UNIX_PATH = 107
"""sun_path holds 108 bytes, the terminating NUL included."""
RELAY_BUFFER_BYTES = 256 * 1024


OVERFLOW_UID = 65534
"""What the kernel reports for a uid it cannot map into the coordinator's user namespace: nobody in particular."""


class UnknownPeer(Exception):
    """The kernel cannot say who is at the other end."""


def uid_is_mapped(uid: int, uid_map: str) -> bool:
    """True if `uid` is inside one of the ranges of a /proc/<pid>/uid_map ("inside outside count" lines)."""
    for line in uid_map.splitlines():
        inside, _outside, count = (int(field) for field in line.split())
        if inside <= uid < inside + count:
            return True
    return False


def read_uid_map() -> str:
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read()
    except OSError:
        return "0 0 4294967295"  # no user namespaces: every uid is itself


def caller_for_uid(uid: int, admins: list[str], uid_map: str = "0 0 4294967295") -> Caller:
    """The caller a uid is: its user name (the uid in decimal if it has none), admin if named in `admins`.

    In a user namespace that does not map the peer's uid (systemd's PrivateUsers=), the kernel reports
    the overflow uid for every such peer: nobody in particular, so refused.
    """
    if uid == OVERFLOW_UID and not uid_is_mapped(uid, uid_map):
        raise UnknownPeer("the peer's uid does not map into the coordinator's user namespace (it reads as 65534)")
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Caller(user=user, role="admin" if user in admins else "user")


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a Unix stream socket, from the kernel (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


def check_socket_path(path: str, setting: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ValueError(
            f"{setting} {path!r} is longer than {MAX_UNIX_PATH} bytes, the limit of a Unix socket path; choose a shorter one"
        )


class LocalSocketRelay:
    """Serves `public_path` (mode 0666, or 0660 with `group`) and relays every connection to grpc's `grpc_address`."""

    def __init__(
        self, public_path: str, private_dir: Path, local_peers: dict[str, Caller], admins: list[str], group: str = ""
    ) -> None:
        self.public_path = public_path
        self.private_dir = private_dir
        self.grpc_path = str(private_dir / "g")
        self.local_peers = local_peers
        self.admins = admins
        self.group = group
        self.uid_map = read_uid_map()
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task] = set()
        check_socket_path(public_path, "local_socket")
        check_socket_path(str(private_dir / "c000000000"), "the local socket's relay directory (in state_dir)")

    @property
    def grpc_address(self) -> str:
        """Where the gRPC server must listen (add_insecure_port) before `start`."""
        return f"unix:{self.grpc_path}"

    def prepare(self) -> None:
        """Creates the private directory (0700, emptied of an earlier run's sockets)."""
        self.private_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.private_dir, 0o700)
        for leftover in self.private_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    async def start(self) -> None:
        path = Path(self.public_path)
        if path.is_socket():
            if await socket_answers(self.public_path):
                raise RuntimeError(
                    f"local_socket {self.public_path} is served by another process; stop it or choose another path"
                )
            path.unlink()  # left by a run that was killed
        elif path.exists() or path.is_symlink():
            raise RuntimeError(f"local_socket {self.public_path} exists and is not a socket; remove it or choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._relay, path=self.public_path)
        if self.group:
            os.chown(self.public_path, -1, grp.getgrnam(self.group).gr_gid)
        os.chmod(self.public_path, 0o660 if self.group else 0o666)
        log.info("local socket serving", path=self.public_path, mode=oct(stat.S_IMODE(os.stat(self.public_path).st_mode)))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.public_path)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._relays.add(task)
        bound = str(self.private_dir / f"c{next(self._numbers)}")
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            caller = caller_for_uid(peer_uid(writer.get_extra_info("socket")), self.admins, self.uid_map)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.bind(bound)
            upstream.setblocking(False)
            # Known before grpc can see the connection, so its first call already finds its user.
            self.local_peers[f"unix:{bound}"] = caller
            await asyncio.get_running_loop().sock_connect(upstream, self.grpc_path)
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(sock=upstream, limit=RELAY_BUFFER_BYTES)
            pumps = [asyncio.create_task(pump(reader, upstream_writer)), asyncio.create_task(pump(upstream_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for each in pumps:
                    each.cancel()
        except (OSError, UnknownPeer, asyncio.CancelledError) as error:
            if not isinstance(error, asyncio.CancelledError):
                log.warning("local connection refused or failed", error=str(error))
        finally:
            self.local_peers.pop(f"unix:{bound}", None)
            for end in (writer, upstream_writer):
                if end is not None:
                    end.close()
            with contextlib.suppress(OSError):
                os.unlink(bound)
            if task is not None:
                self._relays.discard(task)


async def socket_answers(path: str) -> bool:
    """True if something accepts connections on the Unix socket at `path`."""
    try:
        _reader, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copies bytes until the source ends or either side fails."""
    with contextlib.suppress(OSError):
        while data := await source.read(RELAY_BUFFER_BYTES):
            sink.write(data)
            await sink.drain()


def local_socket_relay(settings: CoordinatorSettings, state_dir: Path, guard: Guard) -> LocalSocketRelay | None:
    """The relay of the settings' local_socket; None when it is turned off, or when the default path is too long."""
    path = settings.local_socket_path
    if not path:
        return None
    try:
        return LocalSocketRelay(path, state_dir / "relay", guard.local_peers, settings.local_admins, settings.local_socket_group)
    except ValueError as error:
        if settings.local_socket != CoordinatorSettings.local_socket:
            raise
        log.warning("no local socket: the default path is too long; set local_socket", error=str(error))
        return None
