"""Capped exponential backoff with jitter, reset after a success (as Nomad's device manager does)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def backoff_delay(failures: int, *, initial: float, cap: float, rand: float) -> float:
    """Delay before retry number `failures` (1-based), given a uniform random draw in [0, 1).

    Exponential up to `cap`, with "equal jitter": half the delay is fixed, half random, so a
    herd of agents that lost the same coordinator spreads out but none retries instantly.
    """
    if failures < 1:
        return 0.0
    ceiling = min(cap, initial * (2 ** min(failures - 1, 30)))
    return ceiling / 2 + rand * ceiling / 2


@dataclass
class Backoff:
    """Stateful wrapper: `next_delay()` after each failure, `reset()` after a success."""

    initial: float = 0.1
    cap: float = 3.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return backoff_delay(self.failures, initial=self.initial, cap=self.cap, rand=self.rng.random())

    def reset(self) -> None:
        self.failures = 0
