"""Leading, standing by, stepping down: the coordinator's side of the leader lease (coordinator/store/lease.py).

A coordinator starts as a standby: it serves health (NOT_SERVING) and answers every other call
UNAVAILABLE naming the leader (coordinator/api/standby.py), whom it reads from the store every
lease_seconds/3. Once `acquire` returns it holds the lease: the wiring opens the store with its
epoch, builds everything as after a restart (running attempts are adopted as their agents
re-register, control/reconcile.py) and calls `lead`. From then on `hold` renews the lease; when the
lease is lost (another coordinator took over, or no renewal succeeded for lease_seconds: the
database was out of reach, or this process was frozen) the coordinator steps down: it stops acting
at once (`may_act` turns false before anything else runs), and the daemon exits with
EXIT_STEPPED_DOWN so that its supervisor (systemd's Restart=on-failure) starts it again, as a
standby. That is what Kubernetes' leader election does too: a process that lost the lease does not
try to become a standby in place, it exits, and everything it held in memory goes with it.

A frozen process learns that it lost the lease only when its renewal task runs again; what other
tasks do first must not reach an agent. So, while the lease can be lost at all, a ticker notes
every turn of the event loop: when the loop has stood still for lease_seconds/3 or more (a freeze,
a starved CPU), `may_act` is false until the store confirms that this coordinator's epoch still
leads, and every write to an agent waits for that (`until_may_act`). Writes to the store need no
such care: the store fences every one by the epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum

from coordinator.store.lease import LeaderInfo, Lease, LeaseLost
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger

log = get_logger("coordinator.leadership")

EXIT_STEPPED_DOWN = 75
"""The daemon's exit status after it lost the lease (sysexits' EX_TEMPFAIL: run it again). Its unit restarts it."""

STALL_FRACTION = 1 / 3
"""An event loop that stood still for this much of the lease may have outlived it: act again only once confirmed."""
TICKS_PER_LEASE = 10


class Role(enum.Enum):
    STANDBY = "standby"
    """Waiting for the lease; answers every call but health UNAVAILABLE, naming the leader."""
    LEADING = "leading"
    """Holds the lease; the store is open with its epoch and every service answers."""
    STEPPED_DOWN = "stepped down"
    """Lost the lease; acts on nothing more and exits (EXIT_STEPPED_DOWN)."""


def loop_stalled(last_tick: float, now: float, lease_seconds: float) -> bool:
    """Whether the event loop stood still long enough (monotonic seconds) that the lease may have run out unseen."""
    return now - last_tick >= lease_seconds * STALL_FRACTION


def lost_reason(error: BaseException) -> str:
    """Why this coordinator steps down, for the log and for the callers it refuses."""
    if isinstance(error, LeaseLost):
        return str(error) or "the leader lease was lost"
    return f"the leader lease could not be held: {type(error).__name__}: {error}"


def confirmation_problem(own_epoch: int, leader: LeaderInfo) -> str | None:
    """After a stall: None if the store says this coordinator's epoch still leads, else why it does not."""
    if leader.epoch == own_epoch:
        return None
    return f"another coordinator leads now (epoch {leader.epoch}, {leader.address or 'address unknown'}; this one is {own_epoch})"


class Leadership:
    """The lease as the rest of the coordinator sees it: the role, who leads, and whether to act now."""

    def __init__(self, lease: Lease, *, lease_seconds: float, can_lapse: bool, clock: Clock = SYSTEM_CLOCK) -> None:
        self.lease = lease
        self.lease_seconds = lease_seconds
        self.can_lapse = can_lapse
        """False for a lease that is never lost (one coordinator per state dir): no ticker, no confirmations."""
        self.clock = clock
        self.role = Role.STANDBY
        self.leader = LeaderInfo("", 0)
        """Who leads as the store last said (refreshed while standing by)."""
        self.reason = ""
        """Why this coordinator stepped down."""
        self.stepped_down = asyncio.Event()
        self._last_tick = clock.monotonic()
        self._confirmed = True
        self._acting_again = asyncio.Event()

    @property
    def tick_seconds(self) -> float:
        return self.lease_seconds / TICKS_PER_LEASE

    # -- the gate --------------------------------------------------------------------------------

    def may_act(self) -> bool:
        """Whether this coordinator may tell agents anything now: it leads, and its lease cannot have run out unseen."""
        if self.role is not Role.LEADING:
            return False
        if not self.can_lapse:
            return True
        return self._confirmed and not loop_stalled(self._last_tick, self.clock.monotonic(), self.lease_seconds)

    async def until_may_act(self) -> bool:
        """Waits until `may_act` (True), or until this coordinator stepped down (False)."""
        while not self.may_act():
            if self.role is Role.STEPPED_DOWN:
                return False
            self._acting_again.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acting_again.wait(), self.tick_seconds)
        return True

    # -- the life of the lease -------------------------------------------------------------------

    async def acquire(self) -> int:
        """Waits for the lease, keeping `leader` fresh meanwhile; returns this coordinator's epoch."""
        acquired = asyncio.Event()
        watcher = asyncio.create_task(self._watch_leader(acquired))
        try:
            epoch = await self.lease.acquire()
        finally:
            # The watch also ends at its next turn by itself: a store read may swallow a cancellation (asyncio.wait_for
            # on Python 3.11, when the read completes as the cancel arrives), and this wait must not then last for ever.
            acquired.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        log.info("leader lease acquired", epoch=epoch)
        return epoch

    def lead(self) -> None:
        """Everything is built on the store opened with the lease's epoch: act from now on."""
        if self.role is Role.STANDBY:
            self.role = Role.LEADING
            self._last_tick = self.clock.monotonic()
            self._acting_again.set()

    def step_down(self, reason: str) -> None:
        """Acts on nothing more, at once; the wiring stops the rest and the daemon exits."""
        if self.role is Role.STEPPED_DOWN:
            return
        self.role = Role.STEPPED_DOWN
        self.reason = reason
        self._acting_again.set()
        self.stepped_down.set()
        log.error("stepping down: this coordinator no longer leads", reason=reason, epoch=self.lease.epoch)

    async def hold(self) -> None:
        """Holds the lease until cancelled (a graceful stop); steps down when it is lost."""
        ticker = asyncio.create_task(self._tick()) if self.can_lapse else None
        try:
            await self.lease.hold()
            self.step_down("the leader lease's renewal ended")  # hold returns only when cancelled, by contract
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - LeaseLost, or a renewal that broke: the lease cannot be trusted
            self.step_down(lost_reason(error))
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _watch_leader(self, acquired: asyncio.Event) -> None:
        while not acquired.is_set():
            try:
                self.leader = await self.lease.leader()
            except Exception as error:  # noqa: BLE001 - the store out of reach: keep the last answer, try again
                log.warning("cannot read who leads", error=f"{type(error).__name__}: {error}")
            if not acquired.is_set():
                await asyncio.sleep(self.lease_seconds / 3)

    async def _tick(self) -> None:
        self._last_tick = self.clock.monotonic()
        while self.role is not Role.STEPPED_DOWN:
            now = self.clock.monotonic()
            if loop_stalled(self._last_tick, now, self.lease_seconds):
                self._confirmed = False
                log.warning("event loop stood still; confirming the lease before acting", seconds=round(now - self._last_tick, 3))
            self._last_tick = now
            if not self._confirmed:
                await self._confirm()
            await asyncio.sleep(self.tick_seconds)

    async def _confirm(self) -> None:
        try:
            leader = await self.lease.leader()
        except Exception as error:  # noqa: BLE001 - the store out of reach: stay silent; hold() gives up in time
            log.warning("cannot confirm the lease", error=f"{type(error).__name__}: {error}")
            return
        problem = confirmation_problem(self.lease.epoch, leader)
        if problem is not None:
            self.step_down(problem)
            return
        self._confirmed = True
        self._last_tick = self.clock.monotonic()
        self._acting_again.set()
