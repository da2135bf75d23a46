"""The leader lease in PostgreSQL: the one-row `leader` table, timed by the database's clock.

Taking over is one statement, `UPDATE leader SET epoch = epoch + 1 ... WHERE lease_until < now()`:
of the standbys that try at once one wins, and its epoch is higher than every earlier leader's.
The leader renews every lease_seconds/3 (`WHERE epoch = mine`); it counts the lease lost when a
renewal finds another epoch, or when no renewal has succeeded for lease_seconds by its own
monotonic clock (from when the last good renewal was sent, so it always gives up no later than the
database lets a standby take over). The store fences its writes on the same row
(postgres_schema.check_fence).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from coordinator.store.lease import LeaderInfo, Lease, LeaseLost
from coordinator.store.postgres_schema import connect, connection_string, describe
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger

log = get_logger("coordinator.lease")

UNREACHABLE = (psycopg.Error, OSError, TimeoutError)
"""What a lost or refused connection to the database raises."""


class PostgresLease(Lease):
    def __init__(self, url: str, advertised_address: str, lease_seconds: float = 3.0, clock: Clock = SYSTEM_CLOCK) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"leader_lease_seconds must be > 0, got {lease_seconds}")
        self.url = url
        self.advertised_address = advertised_address
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._epoch = 0
        self._renewed_at = 0.0
        """Monotonic time at which the last successful take-over or renewal was sent."""
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._schema_ready = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3

    async def acquire(self) -> int:
        waiting_logged = False
        while True:
            sent = self.clock.monotonic()
            left = self.interval
            try:
                epoch, left = await asyncio.wait_for(self._take_over(), timeout=max(self.lease_seconds, 5.0))
            except UNREACHABLE as error:
                await self._drop_connection()
                log.warning(
                    "cannot reach the store to take the leader lease; retrying", store=describe(self.url), error=str(error)
                )
                epoch = None
            if epoch is not None:
                self._epoch, self._renewed_at = epoch, sent
                log.info("leading", epoch=epoch, address=self.advertised_address, lease_seconds=self.lease_seconds)
                return epoch
            if not waiting_logged:
                waiting_logged = True
                with_leader = await self._leader_or_none()
                log.info(
                    "another coordinator leads; standing by",
                    leader=with_leader.address if with_leader else "(unknown)",
                    epoch=with_leader.epoch if with_leader else 0,
                )
            await asyncio.sleep(standby_wait(self.interval, left))

    async def hold(self) -> None:
        if not self._epoch:
            raise LeaseLost("the leader lease was never acquired")
        while True:
            due = self._renewed_at + self.interval
            await asyncio.sleep(max(0.0, due - self.clock.monotonic()))
            sent = self.clock.monotonic()
            left = self._renewed_at + self.lease_seconds - sent
            if left <= 0:
                raise self._lost(
                    f"no renewal succeeded for {self.lease_seconds:g} s (the database unreachable, or this process stalled)"
                )
            try:
                leading = await asyncio.wait_for(self._renew(), timeout=left)
            except UNREACHABLE as error:
                await self._drop_connection()
                log.warning("leader lease renewal failed; retrying", store=describe(self.url), error=str(error) or "timed out")
                continue
            if leading != self._epoch:
                raise self._lost(f"another coordinator leads now (epoch {leading})")
            self._renewed_at = sent

    async def leader(self) -> LeaderInfo:
        info = await self._leader_or_none()
        if info is None:
            raise LeaseLost(f"cannot read who leads from {describe(self.url)}")
        return info

    async def release(self) -> None:
        if not self._epoch:
            return
        try:
            connection = await self._connect()
            await asyncio.wait_for(
                connection.execute("UPDATE leader SET lease_until = '-infinity' WHERE id = 1 AND epoch = %s", (self._epoch,)),
                timeout=self.lease_seconds,
            )
            log.info("leader lease released", epoch=self._epoch)
        except UNREACHABLE as error:  # the lease then runs out by itself
            log.warning("cannot release the leader lease; it expires by itself", error=str(error) or "timed out")
        finally:
            await self._drop_connection()

    def _lost(self, why: str) -> LeaseLost:
        log.error("leader lease lost", epoch=self._epoch, why=why)
        return LeaseLost(f"the leader lease of epoch {self._epoch} is lost: {why}")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if not self._schema_ready:
            await asyncio.to_thread(lambda: connect(self.url).close())  # creates or migrates the schema
            self._schema_ready = True
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(connection_string(self.url), autocommit=True)
        return self._connection

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=1.0)
            except UNREACHABLE:
                pass
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled (a graceful stop): not the broken connection's to swallow

    async def _take_over(self) -> tuple[int | None, float]:
        """Takes the lease if it has run out: (the new epoch, 0), or (None, seconds the leader's lease has left)."""
        connection = await self._connect()
        cursor = await connection.execute(
            "WITH taken AS (UPDATE leader SET epoch = epoch + 1, address = %s, lease_until = now() + make_interval(secs => %s) "
            "WHERE id = 1 AND lease_until < now() RETURNING epoch) "
            "SELECT (SELECT epoch FROM taken), (SELECT CASE WHEN isfinite(lease_until) "
            "THEN EXTRACT(EPOCH FROM lease_until - now()) ELSE 0 END FROM leader WHERE id = 1)",  # never led: -infinity
            (self.advertised_address, self.lease_seconds),
        )
        row = await cursor.fetchone()
        if row is None:
            return None, self.interval
        taken, left = row
        return (int(taken), 0.0) if taken is not None else (None, float(left if left is not None else self.interval))

    async def _renew(self) -> int:
        """Extends this epoch's lease; returns the epoch that leads (another one's means it is lost)."""
        connection = await self._connect()
        cursor = await connection.execute(
            "UPDATE leader SET lease_until = now() + make_interval(secs => %s) WHERE id = 1 AND epoch = %s RETURNING epoch",
            (self.lease_seconds, self._epoch),
        )
        if await cursor.fetchone():
            return self._epoch
        cursor = await connection.execute("SELECT epoch FROM leader WHERE id = 1")
        row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _leader_or_none(self) -> LeaderInfo | None:
        try:
            connection = await self._connect()
            cursor = await asyncio.wait_for(
                connection.execute("SELECT epoch, address, lease_until > now() FROM leader WHERE id = 1"),
                timeout=max(self.lease_seconds, 5.0),
            )
            row = await cursor.fetchone()
        except UNREACHABLE:
            await self._drop_connection()
            return None
        if row is None:
            return LeaderInfo("", 0)
        epoch, address, live = row
        return LeaderInfo(address if live else "", int(epoch))


TAKE_OVER_MARGIN_SECONDS = 0.02
"""How long after the leader's lease ends (on the database's clock) a standby asks again: past the end, by little."""


def standby_wait(interval: float, lease_left: float) -> float:
    """How long a standby waits before it tries to take the lease again: its poll interval, or less when the
    leader's lease ends sooner (a dead leader's ends at most one interval after its last renewal: asking right
    after it ends takes over up to a whole interval sooner than the next poll would)."""
    return max(TAKE_OVER_MARGIN_SECONDS, min(interval, lease_left + TAKE_OVER_MARGIN_SECONDS))
