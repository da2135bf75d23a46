"""The liveness loop: applies the passage of time to node deadlines (rules/liveness.py, through
the cluster view), closes the streams of nodes declared DOWN, and settles the garbage collector."""

from __future__ import annotations

import asyncio
import gc

from coordinator.control.cluster_view import ClusterView
from coordinator.model.cluster import Transition
from coordinator.rules import liveness
from coordinator.rules.liveness import Liveness
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger

log = get_logger("coordinator")

LIVENESS_TICK_SECONDS = 0.05
"""How often node deadlines are checked: bounds how late a DOWN is declared."""
SETTLE_SECONDS = 5.0
"""Quiet time after the last registration before long-lived objects are frozen out of the collector."""
UNFREEZE_SECONDS = 3600.0
"""How often frozen objects are handed back to the collector, so cyclic garbage among them is freed."""


YOUNG_COLLECTION_THRESHOLD = 20_000
"""Net allocations of container objects between young collections (Python's default is 700). A busy coordinator
makes tens of thousands of short-lived records a second (requests, effects, messages): at 700 one run of the
scheduling benchmark made over a thousand young collections, and each hundredth became a full one over every
job in memory. At 20,000 a young collection stays around a millisecond."""


def tune_collector() -> None:
    """Sets the coordinator process's young-generation threshold (the older generations' stay as they are).

    For the daemon's process (and benchmarks that stand in for it), not for whoever imports the module."""
    young, middle, old = gc.get_threshold()
    if young < YOUNG_COLLECTION_THRESHOLD:
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


class GarbageSettler:
    """Keeps full garbage collections from stalling the event loop (and with it heartbeat ingest).

    A fleet registering leaves tens of thousands of long-lived objects (node and device records,
    stream state); walking them costs a full collection tens of milliseconds at 16,000 GPUs. Once
    registrations have been quiet for a while, freeze what exists, so later collections walk only
    new objects. Hourly, unfreeze so cycles among frozen objects that died since (closed streams)
    are freed; the next quiet moment freezes again.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.last_registration = clock.monotonic()
        self.frozen_at: float | None = None

    def registered(self) -> None:
        self.last_registration = self.clock.monotonic()

    def tick(self) -> None:
        now = self.clock.monotonic()
        if self.frozen_at is not None and now - self.frozen_at >= UNFREEZE_SECONDS:
            gc.unfreeze()
            self.frozen_at = None
        settled = now - self.last_registration >= SETTLE_SECONDS
        if settled and (self.frozen_at is None or self.last_registration > self.frozen_at):
            # No collect first: that would be the very pause this avoids. Garbage frozen along
            # with the live objects waits for the hourly unfreeze.
            gc.freeze()
            self.frozen_at = now


async def liveness_loop(cluster: ClusterView, garbage: GarbageSettler) -> None:
    previous = cluster.clock.monotonic()
    while True:
        now = cluster.clock.monotonic()
        liveness_tick(cluster, garbage, previous, now)
        previous = now
        await asyncio.sleep(LIVENESS_TICK_SECONDS)


def liveness_tick(cluster: ClusterView, garbage: GarbageSettler, previous_tick: float, now: float) -> None:
    """One tick: the coordinator's own stall since the last tick excused, then node deadlines applied."""
    stall = liveness.coordinator_stall(previous_tick, now, LIVENESS_TICK_SECONDS)
    if stall:
        cluster.excuse(stall)
        log.warning("the coordinator was held; node deadlines move on by as much", stall_seconds=round(stall, 3))
    for transition in cluster.tick():
        if transition.session is not None:
            transition.session.close(f"node declared down: {transition.reason}; re-register")
    garbage.tick()


def log_transition(transition: Transition) -> None:
    level = log.warning if transition.after is not Liveness.READY else log.info
    level(
        "node state changed",
        node=transition.node_id,
        before=transition.before.value,
        after=transition.after.value,
        reason=transition.reason,
    )
