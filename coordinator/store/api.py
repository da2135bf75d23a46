"""The store's interface: everything the coordinator keeps across restarts, behind one abstract class.

What is stored: every job (its whole `gpuorch.v1.Job`, attempts and placement included, with its
submission sequence and idempotency key), the operators' drains, and the coordinator epoch. Nothing
else outlives a restart; everything else is rebuilt from this and from the agents' registrations.

Backends: `sqlite.SqliteJobStore` (the daemon's), `memory.MemoryJobStore` (tests, benchmarks, the
simulator). Both keep the same semantics: writes are applied in call order, a write's future
completes once it is durable (or fails with RuntimeError naming the cause), and `open` bumps the epoch.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpuorch.v1 import job_pb2


@dataclass(frozen=True, slots=True)
class StoredJob:
    sequence: int
    """Submission order; also the job's numeric id."""
    job: job_pb2.Job
    client_request_id: str = ""


@dataclass(frozen=True, slots=True)
class StoredState:
    jobs: list[StoredJob]
    """Oldest (lowest sequence) first."""
    drains: dict[str, str] = field(default_factory=dict)
    """Node id -> the operator's reason, for every drained node."""
    epoch: int = 0
    """This coordinator's epoch: one more than the previous open's, told to agents in RegisterAck."""


class StoreError(RuntimeError):
    """A write could not be made durable; the message says why."""


class JobStore(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> StoredState:
        """Opens (creating if needed), durably increments the coordinator epoch, and returns everything stored."""

    @abc.abstractmethod
    def save(self, jobs: Iterable[StoredJob] = (), drains: Mapping[str, str | None] | None = None) -> asyncio.Future[None]:
        """Queues jobs (whole, replacing older versions) and drains (node id -> reason; None resumes) for
        writing, in call order. The returned future completes once they are durable, or fails with
        StoreError: every caller awaits it or hands it to someone who watches it (never drops it)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finishes queued writes, then closes."""
