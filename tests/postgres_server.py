"""A real PostgreSQL server for tests and benchmarks: initdb into a temp dir, pg_ctl on a free loopback port.

    server = PostgresServer.start()        # raises PostgresUnavailable (saying how to install) if it cannot
    url = server.create_database()         # a fresh, empty database: postgresql://postgres@127.0.0.1:PORT/gpuorch_N
    server.restart()                       # stop (fast) and start again, same port and data
    server.stop()

Run as root (as in CI and the dev machines), the server runs as the `postgres` user that Debian's
`postgresql` package creates (PostgreSQL refuses to run as root). The cluster is our own: its own
data dir, port and socket dir, so the package's own cluster (if its service runs) never matters.
Authentication is `trust` on loopback only.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL's server binaries are needed by these tests (initdb, pg_ctl under /usr/lib/postgresql/*/bin): "
    "install them with `apt-get install -y postgresql` (scripts/test.sh does so when they are missing)"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says how to get one."""


def server_binaries() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (or $GPUORCH_TEST_PG_BIN)."""
    wanted = os.environ.get("GPUORCH_TEST_PG_BIN")
    candidates = [wanted] if wanted else glob.glob("/usr/lib/postgresql/*/bin")

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for directory in sorted(candidates, key=version, reverse=True):
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    raise PostgresUnavailable(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, listening on 127.0.0.1:`port` (and a socket in its own dir)."""

    def __init__(self, root: Path, bin_dir: Path, port: int, run_as: str | None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.bin_dir = bin_dir
        self.port = port
        self.run_as = run_as
        self._databases = itertools.count(1)
        self.running = False

    @classmethod
    def start(cls, fsync: bool = True, run_as: str = "postgres") -> PostgresServer:
        """initdb and start a new cluster. `fsync=False` trades durability against a crash of this machine
        (never tested) for speed on a loaded machine; a server restart loses nothing either way."""
        bin_dir = server_binaries()
        as_root = os.geteuid() == 0
        if as_root:
            try:
                account = pwd.getpwnam(run_as)
            except KeyError:
                raise PostgresUnavailable(
                    f"PostgreSQL refuses to run as root and there is no user {run_as!r} to run it as: {INSTALL_HINT}"
                ) from None
        root = Path(tempfile.mkdtemp(prefix="gpuorch-pg-"))
        if as_root:
            os.chown(root, account.pw_uid, account.pw_gid)
        server = cls(root, bin_dir, _free_port(), run_as if as_root else None)
        server._run("initdb", "-D", str(server.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(server.port),
            "unix_socket_directories": f"'{root}'",
            "max_connections": "200",
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "shared_buffers": "128MB",
        }
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        server._pg_ctl_start()
        return server

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "") -> str:
        """CREATE DATABASE (a fresh name unless given); returns its URL."""
        import psycopg

        name = name or f"gpuorch_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` ends sessions and shuts down cleanly; `immediate` is a crash (recovery on start)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self.running = False

    def ensure_running(self) -> None:
        """Starts the server again if a test left it stopped."""
        if not self.running:
            self._pg_ctl_start()

    def restart(self, down_seconds: float = 0.0, mode: str = "fast") -> None:
        """Stops the server (closing every connection), waits `down_seconds`, starts it again on the same port."""
        self.stop(mode)
        time.sleep(down_seconds)
        self._pg_ctl_start()

    def destroy(self) -> None:
        """Stops the server if it runs and removes its temp dir."""
        if self.running:
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _pg_ctl_start(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as error:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise PostgresUnavailable(f"PostgreSQL did not start (port {self.port}): {error.stderr}\n{log[-2000:]}") from None
        self.running = True

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin_dir / program), *args]
        if self.run_as:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, text=True, cwd=self.root, timeout=120)
