"""The store's interface: everything the coordinator keeps across restarts, behind one abstract class.

What is stored: every job (its whole `gpuorch.v1.Job`, attempts and placement included, with its
submission sequence and idempotency key), the operators' drains, and the coordinator epoch. Nothing
else outlives a restart; everything else is rebuilt from this and from the agents' registrations.

Backends: `sqlite.SqliteJobStore` (the daemon's), `memory.MemoryJobStore` (tests, benchmarks, the
simulator). Both keep the same semantics: writes are applied in call order, a write's future
completes once it is durable (or fails with StoreError naming the cause), and `open` bumps the epoch.

`open` returns every job not in a final state and the most recently ended ones (at most
`RECENT_ENDED_JOBS` of them, newest kept): what the coordinator holds in memory. Older ended
jobs stay in the store and are read through `query`, `get` and `find_request` (job history).
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


RECENT_ENDED_JOBS = 10_000
"""How many ended jobs `open` returns (the newest); the rest are history, read from the store on demand."""


@dataclass(frozen=True, slots=True)
class StoredState:
    jobs: list[StoredJob]
    """Every job not in a final state and the RECENT_ENDED_JOBS most recent ended ones, oldest (lowest sequence) first."""
    drains: dict[str, str] = field(default_factory=dict)
    """Node id -> the operator's reason, for every drained node."""
    epoch: int = 0
    """This coordinator's epoch: one more than the previous open's, told to agents in RegisterAck."""


class StoreError(RuntimeError):
    """A write could not be made durable; the message says why."""


class Fenced(StoreError):
    """A write was refused because another coordinator leads now (its epoch is higher than this one's)."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which stored jobs a history read wants: newest (highest sequence) first, keyset-paged on sequence.

    A job matches when every given filter does: `owner` (empty = anyone), `states` (empty = all),
    and the window [`active_since`, `active_until`] in wall seconds, which a job matches when it
    was in the system at some time inside it (submitted at or before `active_until`, and not
    ended, or ended at or after `active_since`), as `sacct -S/-E` selects. 0 = unbounded.
    """

    owner: str = ""
    states: frozenset[int] = frozenset()
    active_since: float = 0.0
    active_until: float = 0.0
    below_sequence: int = 0
    """Only jobs with a lower sequence (the previous page's last); 0 = from the newest."""
    limit: int = 100


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

    # -- history: reads answered from the store's indexes, never on the event loop's thread --

    @abc.abstractmethod
    async def query(self, query: JobQuery) -> list[StoredJob]:
        """At most `query.limit` jobs matching `query`, highest sequence first."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> StoredJob | None:
        """One job by id, whatever its age; None if the store has none by that id."""

    @abc.abstractmethod
    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        """The job `owner` submitted with this client request id, if any (idempotent resubmission)."""

    @abc.abstractmethod
    async def prune(self, ended_before: float) -> int:
        """Deletes jobs in a final state that ended before `ended_before` (wall seconds); returns how many."""
