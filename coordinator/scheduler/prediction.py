"""Runtime prediction for jobs that give no estimate: quantiles of recent runtimes of similar jobs.

Tiers, most specific first: (owner, name, gpus) -> (owner, gpus) -> (pool, gpus) -> pool -> the whole
cluster -> a default. A tier answers only once it has `min_samples` runtimes, so that one odd job does
not speak for a user's whole history. Each key keeps its last `window` runtimes (recent behaviour wins
over old: users change their code), and at most `max_keys` keys are kept (least recently observed
dropped first), so memory stays bounded however many distinct names a cluster sees.

The answer is a high-ish quantile of the window, not the mean: an estimate feeds backfill, where a job
that runs longer than predicted delays the reserved job, so under-estimates should be the rare case
(bench/prediction.py measures the trade on the Philly trace). Pure and incremental: `observe` when a
job ends, `predict` when a job is queued; `take_touched` and `depends_on` tell a caller that caches
predictions which of them an observation may have changed. No I/O, no clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

TIERS = ("owner_name_gpus", "owner_gpus", "pool_gpus", "pool", "cluster")
"""Tier names, most specific first; "default" (the configured default) and "none" come after."""


@dataclass(frozen=True, slots=True)
class Prediction:
    seconds: float
    """Predicted runtime; 0 = unknown (no tier had enough samples and the default is 0)."""
    tier: str
    """Which tier answered: one of TIERS, "default" or "none"."""
    samples: int
    """Runtimes in that tier's window."""


class _Window:
    """The last runtimes of one key, with its quantile cached until the next runtime arrives."""

    __slots__ = ("cached", "runtimes")

    def __init__(self, size: int) -> None:
        self.runtimes: deque[float] = deque(maxlen=size)
        self.cached = -1.0

    def add(self, runtime: float) -> None:
        self.runtimes.append(runtime)
        self.cached = -1.0

    def quantile(self, q: float) -> float:
        if self.cached < 0:
            ordered = sorted(self.runtimes)
            # Nearest rank: the smallest runtime with at least q of the window at or below it.
            self.cached = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        return self.cached


class RuntimePredictor:
    """Predicts a job's runtime from the runtimes of jobs that ended before it (see the module docstring)."""

    def __init__(
        self,
        *,
        quantile: float = 0.8,
        min_samples: int = 3,
        window: int = 16,
        max_keys: int = 20_000,
        default_seconds: float = 0.0,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        if window < min_samples:
            raise ValueError(f"window ({window}) must hold at least min_samples ({min_samples}) runtimes")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if default_seconds < 0:
            raise ValueError(f"default_seconds must be >= 0, got {default_seconds}")
        self.quantile = quantile
        self.min_samples = min_samples
        self.window = window
        self.max_keys = max_keys
        self.default_seconds = default_seconds
        self._windows: OrderedDict[tuple, _Window] = OrderedDict()
        self.observed = 0
        """Runtimes observed so far: a cheap version number for callers that cache predictions."""
        self._touched: set[tuple] | None = set()
        """Keys whose window changed (a runtime added, or the window dropped) since `take_touched`; None = any
        (more than max_keys of them: no one asked for a long time)."""

    @staticmethod
    def keys(owner: str, name: str, gpus: int, pool: str) -> list[tuple]:
        """The tiers' keys for a job, most specific first; a tier that needs an owner or a name the job
        lacks is skipped (an anonymous job says nothing about a user's habits)."""
        keys: list[tuple] = []
        if owner and name:
            keys.append(("owner_name_gpus", owner, name, gpus))
        if owner:
            keys.append(("owner_gpus", owner, gpus))
        keys += [("pool_gpus", pool, gpus), ("pool", pool), ("cluster",)]
        return keys

    def observe(self, runtime_seconds: float, *, owner: str = "", name: str = "", gpus: int = 1, pool: str = "default") -> None:
        """Records the runtime of a job that ended; a runtime that is not a positive finite number is ignored."""
        if not math.isfinite(runtime_seconds) or runtime_seconds <= 0:
            return
        windows = self._windows
        for key in self.keys(owner, name, gpus, pool):
            window = windows.get(key)
            if window is None:
                window = windows[key] = _Window(self.window)
                if len(windows) > self.max_keys:
                    self._touch(windows.popitem(last=False)[0])  # its jobs fall back to a broader tier
            else:
                windows.move_to_end(key)
            window.add(runtime_seconds)
            self._touch(key)
        self.observed += 1

    def _touch(self, key: tuple) -> None:
        touched = self._touched
        if touched is not None:
            touched.add(key)
            if len(touched) > self.max_keys:
                self._touched = None

    def take_touched(self) -> set[tuple] | None:
        """The keys whose window changed since the last call (None: too many to list, assume any), and forgets them."""
        touched, self._touched = self._touched, set()
        return touched

    def depends_on(
        self, prediction: Prediction, *, owner: str = "", name: str = "", gpus: int = 1, pool: str = "default"
    ) -> tuple[tuple, ...]:
        """The keys whose windows decide this job's `prediction`: the tier that answered and the more specific
        ones (one of those reaching min_samples would answer instead); every key if none answered."""
        keys = self.keys(owner, name, gpus, pool)
        for depth, key in enumerate(keys):
            if key[0] == prediction.tier:
                return tuple(keys[: depth + 1])
        return tuple(keys)

    def predict(self, *, owner: str = "", name: str = "", gpus: int = 1, pool: str = "default") -> Prediction:
        """The first tier with at least min_samples runtimes answers with its quantile; else the default."""
        windows = self._windows
        for key in self.keys(owner, name, gpus, pool):
            window = windows.get(key)
            if window is not None and len(window.runtimes) >= self.min_samples:
                return Prediction(window.quantile(self.quantile), key[0], len(window.runtimes))
        if self.default_seconds > 0:
            return Prediction(self.default_seconds, "default", 0)
        return Prediction(0.0, "none", 0)

    def __len__(self) -> int:
        """Keys held (bounded by max_keys)."""
        return len(self._windows)
