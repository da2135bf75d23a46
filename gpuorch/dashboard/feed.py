"""The shared views — nodes, the queue, cluster totals — read from the coordinator on a timer and
published, serialized once, to every open page; and the SDK clients the dashboard calls with.

One reader serves every viewer, so a wall screen and fifty researchers cost the coordinator one
ListNodes and one pass over the queue every `interval` seconds. Queue rows carry no env or argv: a
job's details are read with the viewer's own token (JobService redacts for them).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gpuorch.addresses import AddressError, parse_address_list
from gpuorch.client import AsyncClient
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.dashboard.shapes import GPU_COLUMNS, job_summary, node_json, pending_order, usage_json
from gpuorch.errors import GpuorchError, Unauthenticated
from gpuorch.logs import get_logger

log = get_logger("gpuorch.dashboard")

LIST_PAGE_SIZE = 1000
PENDING_PUBLISHED = 1000
"""Pending jobs sent to the queue page at each refresh (the rest are counted; /api/v1/jobs has them all)."""
CLIENTS_KEPT = 64
USAGE_RANGES = {"day": ("minute", 86400.0), "week": ("hour", 7 * 86400.0), "90d": ("hour", 90 * 86400.0)}
USAGE_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the coordinator: its addresses (the SDK follows the leader among them) and the SDK's TLS options."""

    addresses: tuple[str, ...]
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool | None = None
    timeout: float = 10.0


def parse_addresses(text: str) -> tuple[str, ...]:
    """ADDR[,ADDR...] -> the addresses, each checked as gpuctl checks them; ValueError naming the flag."""
    try:
        return tuple(parse_address_list(text, setting="--coordinator"))
    except AddressError as error:
        raise ValueError(str(error)) from None


class Coordinators:
    """SDK clients by token. With several addresses (ADDR,ADDR) each client follows the leader among
    them itself (gpuorch/leader.py), as gpuctl does."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._clients: collections.OrderedDict[str, AsyncClient] = collections.OrderedDict()

    @property
    def address(self) -> str:
        return ",".join(self.options.addresses)

    def client(self, token: str = "") -> AsyncClient:
        """The client that calls with `token` ("" = none); kept for the next call with it."""
        client = self._clients.get(token)
        if client is None:
            options = self.options
            client = AsyncClient(
                self.address, timeout=options.timeout, token=token, tls_ca=options.tls_ca,
                tls_cert=options.tls_cert, tls_key=options.tls_key, insecure=options.insecure,
            )  # fmt: skip
            self._clients[token] = client
            while len(self._clients) > CLIENTS_KEPT:
                _, old = self._clients.popitem(last=False)
                asyncio.get_running_loop().create_task(old.close())
        self._clients.move_to_end(token)
        return client

    async def forget(self, token: str) -> None:
        """Drops the client of a token that turned out bad (a refused sign-in)."""
        client = self._clients.pop(token, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class Feed:
    """The latest shared views and their subscribers."""

    def __init__(
        self, coordinators: Coordinators, own_token: str, fallback_token: Callable[[], str], interval: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:  # fmt: skip
        self.coordinators = coordinators
        self.own_token = own_token
        self.fallback_token = fallback_token
        """Without a token of its own, the shared views are read with a signed-in viewer's (any role may read them)."""
        self.interval = interval
        self.clock = clock
        self.tokens_on: bool | None = None
        """Whether the coordinator wants tokens (people sign in); None until it has answered."""
        self.error = ""
        self.nodes: list[dict] = []
        self.jobs: list[dict] = []
        self.status: dict = {}
        self.updated = 0.0
        self.payloads: dict[str, bytes] = {}
        """Topic ("cluster", "queue") -> its latest event, serialized once for every subscriber."""
        self._changed = asyncio.Event()
        self._usage: dict[str, tuple[float, dict]] = {}

    def reader_token(self) -> str:
        return self.own_token or (self.fallback_token() if self.tokens_on else "")

    async def learn_mode(self) -> None:
        """Asks the coordinator whether tokens are on (WhoAmI with the dashboard's own token, if any)."""
        try:
            me = await self.coordinators.client(self.own_token).who_am_i()
        except Unauthenticated:
            self.tokens_on = True
        else:
            self.tokens_on = me.authenticated
        log.info("coordinator answered", address=self.coordinators.address, tokens=self.tokens_on)

    async def run(self) -> None:
        """Refreshes every `interval` seconds until cancelled; a failed read is shown, never fatal."""
        while True:
            started = self.clock.monotonic()
            try:
                if self.tokens_on is None:
                    await self.learn_mode()
                await self.refresh()
                self.error = ""
            except GpuorchError as error:
                self.error = str(error)
                if isinstance(error, Unauthenticated) and not self.own_token:
                    self.error = "the coordinator wants a token: sign in, or give the dashboard one (--token-file)"
                self._publish_status()
            await asyncio.sleep(max(0.2, self.interval - (self.clock.monotonic() - started)))

    async def refresh(self) -> None:
        token = self.reader_token()
        if self.tokens_on and not token:
            raise Unauthenticated("nobody has signed in yet, and the dashboard has no token of its own (--token-file)")
        client = self.coordinators.client(token)
        nodes, status, jobs = await asyncio.gather(client.list_nodes(), client.cluster_status(), self._queue(client))
        self.nodes = [node_json(node) for node in nodes]
        self.status = {
            "gpus_total": status.gpus_total, "gpus_free": status.gpus_free, "gpus_healthy": status.gpus_healthy,
            "nodes_total": status.nodes_total, "mean_gpu_utilization_percent": round(status.mean_gpu_utilization_percent, 1),
            "jobs_by_state": {name.removeprefix("JOB_STATE_"): count for name, count in status.jobs_by_state.items()},
        }  # fmt: skip
        running = sorted((job for job in jobs if job["state"] == "RUNNING"), key=lambda job: job["start_time"] or 0.0)
        pending = sorted((job for job in jobs if job["state"] == "PENDING"), key=pending_order)
        self.jobs = running + pending
        self.updated = self.clock.wall()
        owners = {job["job_id"]: job["owner"] for job in running}
        self.payloads["cluster"] = self._event(
            "cluster", {"nodes": self.nodes, "owners": owners, "columns": GPU_COLUMNS, "status": self.status}
        )
        self.payloads["queue"] = self._event(
            "queue",
            {"running": running, "pending": pending[:PENDING_PUBLISHED], "pending_total": len(pending), "now": self.updated},
        )
        self._publish_status()

    async def _queue(self, client: AsyncClient) -> list[dict]:
        found: list[dict] = []
        token = ""
        while True:
            jobs, token = await client.list_jobs(["PENDING", "RUNNING"], page_size=LIST_PAGE_SIZE, page_token=token)
            found += [job_summary(job) for job in jobs]
            if not token:
                return found

    def _event(self, topic: str, data: dict) -> bytes:
        return f"event: {topic}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def _publish_status(self) -> None:
        self.payloads["status"] = self._event("status", {"error": self.error, "updated": self.updated})
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def subscribe(self, topics: set[str]) -> AsyncIterator[bytes]:
        """The latest event of each topic now, then again after every refresh, until the caller stops."""
        while True:
            changed = self._changed
            for topic in ("status", *sorted(topics)):
                if topic in self.payloads:
                    yield self.payloads[topic]
            await changed.wait()

    async def usage(self, range_name: str, token: str) -> dict:
        """Usage over `range_name` (day, week, 90d), cached a few seconds (it changes once a minute)."""
        resolution, span = USAGE_RANGES[range_name]
        cached = self._usage.get(range_name)
        now = self.clock.monotonic()
        if cached is not None and now - cached[0] < USAGE_CACHE_SECONDS:
            return cached[1]
        end = self.clock.wall()
        response = await self.coordinators.client(token).usage_history(resolution, start=end - span, end=end)
        data = usage_json(response)
        self._usage[range_name] = (now, data)
        return data
