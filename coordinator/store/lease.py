"""Who leads among the coordinators that share one store: the lease, and what a deposed leader gets.

One coordinator leads; the others wait (standbys). The leader holds a lease that it renews; one that
stops renewing (dead, frozen, cut off from the store) loses it within `lease_seconds`, and the next
to acquire it gets a higher epoch. Stores that can be shared (PostgreSQL) make every write
conditional on the writer's epoch, so a deposed leader that is still running changes nothing: its
writes fail with `Fenced`.

Implementations: `postgres_lease.PostgresLease` (also importable from `postgres`) (a leader row in the database, timed by the
database's clock) and `LocalLease` (SQLite and memory stores: one coordinator per store, which
leads at once and for ever).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.store.api import StoreError


class LeaseLost(StoreError):
    """This coordinator no longer leads (another took over, or the lease could not be renewed in time)."""


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    address: str
    """The leader's advertised client address (host:port); '' when nobody leads."""
    epoch: int
    """The leader's epoch (the last leader's while nobody leads); 0 when nobody ever led."""


class Lease(abc.ABC):
    """Who leads among the coordinators that share one store. Time is the database's clock for the
    lease itself (no clock skew between hosts matters); the injected Clock only paces retries."""

    @abc.abstractmethod
    async def acquire(self) -> int:
        """Waits until this coordinator leads; returns its epoch, strictly greater than every earlier
        leader's. Polls every lease_seconds/3 while another leader's lease is live."""

    @abc.abstractmethod
    async def hold(self) -> None:
        """Renews every lease_seconds/3 until cancelled. Raises LeaseLost as soon as the lease is gone:
        renewal found another epoch, or no renewal succeeded for lease_seconds (the database was
        unreachable, or this process was frozen), whichever comes first."""

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
    """The lease of a store only one coordinator uses (SQLite in its state dir, memory): it leads at once and
    never loses the lease. Its epoch is the store's, which the store bumps at open: `store_epoch` reads it
    (so before the store's open, `epoch` and `acquire()` give the previous coordinator's)."""

    def __init__(self, store_epoch: Callable[[], int], address: str = "") -> None:
        self._store_epoch = store_epoch
        self._address = address
        self._acquired = False

    async def acquire(self) -> int:
        self._acquired = True
        return self.epoch

    async def hold(self) -> None:
        await asyncio.Event().wait()  # never lost: returns only by being cancelled

    async def leader(self) -> LeaderInfo:
        return LeaderInfo(self._address if self._acquired else "", self.epoch)

    async def release(self) -> None:
        self._acquired = False

    @property
    def epoch(self) -> int:
        return self._store_epoch()
