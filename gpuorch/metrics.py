"""What both daemons share to serve Prometheus metrics: the listen address, the HTTP server,
and reading asyncio-owned state from the server's threads.

Each daemon reads its metrics from its live state at scrape time (coordinator/metrics.py,
agent/metrics.py), so nothing is added to the daemons' hot paths. /metrics is served
from threads of its own; the state lives on the daemon's event loop, so a scrape
copies what it needs *on the loop* (`on_loop`) and formats the page in its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import http.server
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

T = TypeVar("T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text exposition format every Prometheus reads (metric and label names here are all legacy-valid)."""
SNAPSHOT_TIMEOUT_SECONDS = 5.0
"""A scrape fails (HTTP 500) when the event loop cannot hand over its state this fast: a stuck loop."""


def parse_listen(value: str, setting: str = "metrics_listen") -> tuple[str, int]:
    """HOST:PORT -> (host, port). An empty host means every interface; port 0 picks a free one.

    Raises ValueError naming the setting and the bad value.
    """
    host, colon, port_text = value.rpartition(":")
    example = f"{setting} must be HOST:PORT, e.g. 0.0.0.0:9400 or 127.0.0.1:9400, got {value!r}"
    if not colon or not port_text.isdigit():
        raise ValueError(example)
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{setting} port must be 0..65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    if any(character.isspace() for character in host):
        raise ValueError(example)
    return host, port


def new_registry() -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one), with the process and runtime metrics."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path not in ("/metrics", "/"):
            self.send_error(404, "metrics are at /metrics")
            return
        try:
            body = self.server.render()
        except Exception as error:  # noqa: BLE001 - a failed scrape must never take the server down
            self.send_error(500, f"cannot collect metrics: {error}"[:500])
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        if "gzip" in self.headers.get("Accept-Encoding", ""):  # Prometheus asks: pages of 10,000s of GPUs are MBs
            body = gzip.compress(body, compresslevel=1)  # zlib lets go of the GIL while it works
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # scrapes every few seconds would drown the daemon's log


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, render: Callable[[], bytes]) -> None:
        self.address_family = family
        self.render = render
        super().__init__(address, _Handler)


class MetricsServer:
    """Serves GET /metrics (text exposition format, gzip when asked) from threads of its own.

    `render` returns the page; it is called in the request's thread, once per scrape.
    Raises OSError naming the address when it cannot listen.
    """

    def __init__(self, listen: str, render: Callable[[], bytes]) -> None:
        host, port = parse_listen(listen)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._server = _Server((host, port), family, render)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {listen}: {error.strerror or error}") from None
        self.listen = listen
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], T], timeout: float = SNAPSHOT_TIMEOUT_SECONDS) -> T:
    """Runs `read` on `loop` and returns its result, from any thread.

    The daemons' state is only ever changed on their event loop; reading it there
    means a scrape sees one consistent moment and never a dict that changes size
    mid-iteration. `read` should copy, not format: it runs between heartbeats.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return read()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(read())
            except BaseException as error:  # noqa: BLE001 - handed to the scraping thread, which raises it
                future.set_exception(error)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"the event loop did not answer a metrics scrape within {timeout}s") from None
