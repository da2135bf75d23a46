"""Who leads among the coordinators that share one store: the leader lease.

Any number of coordinators may run against one PostgreSQL store; exactly one leads, the others are
standbys. The leader holds a lease in the store itself, renewed every lease_seconds/3; a dead, frozen
or partitioned leader loses it within lease_seconds, and a standby takes over with a higher epoch.
Every write of the leader is conditional on its epoch (fencing), so a deposed leader that still runs
cannot change anything.

`LocalLease` is the lease of a store only one coordinator opens (SQLite in its state dir, memory):
it leads at once and never loses the lease.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass

from coordinator.store.api import StoreError


class LeaseLost(StoreError):
    """This coordinator no longer leads (another took over, or the lease could not be renewed in time)."""


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    address: str
    """The leader's advertised client address (host:port), '' when nobody leads."""
    epoch: int
    """The leader's epoch, 0 when nobody ever led."""


class Lease(abc.ABC):
    """Who leads among the coordinators that share one store. Time is the DATABASE's clock for the
    lease itself (no clock skew between hosts matters); the injected Clock only paces retries."""

    @abc.abstractmethod
    async def acquire(self) -> int:
        """Waits until this coordinator leads; returns its epoch, strictly greater than every earlier
        leader's. Polls every lease_seconds/3 while another leader's lease is live."""

    @abc.abstractmethod
    async def hold(self) -> None:
        """Renews every lease_seconds/3 until cancelled. Raises LeaseLost as soon as the lease is gone:
        renewal found another epoch, or no renewal succeeded for lease_seconds (the database was
        unreachable, or this process was frozen) — whichever comes first."""

    @abc.abstractmethod
    async def leader(self) -> LeaderInfo:
        """Who leads now, as the store says (for standbys' answers)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """On a graceful stop: gives the lease up at once so a standby takes over without waiting."""

    @property
    @abc.abstractmethod
    def epoch(self) -> int:
        """This coordinator's epoch once acquired, else 0."""


class LocalLease(Lease):
    """The lease of a store that one coordinator alone opens (SQLite in its state dir, memory): it leads
    at once and never loses the lease. Its epoch is the store's (the epoch file), once the store has
    told it (`opened`)."""

    def __init__(self, address: str = "") -> None:
        self.address = address
        self._epoch = 0

    async def acquire(self) -> int:
        return self._epoch

    def opened(self, epoch: int) -> None:
        """The store was opened with this epoch (SQLite bumps it in open())."""
        self._epoch = epoch

    async def hold(self) -> None:
        await asyncio.Event().wait()  # never lost: waits until cancelled

    async def leader(self) -> LeaderInfo:
        return LeaderInfo(self.address, self._epoch)

    async def release(self) -> None:
        return None

    @property
    def epoch(self) -> int:
        return self._epoch
