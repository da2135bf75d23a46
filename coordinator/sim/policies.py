"""Which scheduler settings a `--policy` name means in the simulator.

A coordinator policy (coordinator/scheduler/types.py POLICIES) is the coordinator's default settings
(CoordinatorSettings.scheduler_config(), as the daemon builds them) with that policy. The reference
policies exist only here, for comparison; each is the production scheduler with settings fixed and,
where it says so, the true durations as runtime estimates (oracle):

- `ref-fifo`: strict first-come-first-served: the head of the queue blocks everyone (no backfill).
- `ref-sjf`: shortest job first by true duration, no preemption.
- `ref-srtf`: preemptive shortest-remaining-time-first by true duration (each later attempt pays
  --preemption-cost).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from coordinator.scheduler import POLICIES, SchedulerConfig
from coordinator.settings import CoordinatorSettings


class UnsupportedPolicy(ValueError):
    """A policy name the simulator does not know; the message lists those it does."""


@dataclass(frozen=True)
class Reference:
    policy: str
    """The scheduler policy it runs (srtf is offered to the simulator only)."""
    oracle: bool
    overrides: dict[str, object] = field(default_factory=dict)
    """SchedulerConfig fields the reference fixes."""
    description: str = ""


REFERENCES = {
    "ref-fifo": Reference("fcfs", False, {"backfill": False, "preemption": ()}, "strict FIFO, no backfill"),
    "ref-sjf": Reference("sjf", True, {"preemption": ()}, "shortest job first, oracle, no preemption"),
    "ref-srtf": Reference("srtf", True, {}, "preemptive shortest remaining time first, oracle"),
}


def policy_names() -> list[str]:
    return [*POLICIES, *REFERENCES]


def resolve(name: str | None, settings: CoordinatorSettings | None = None) -> tuple[SchedulerConfig, bool]:
    """(the scheduler config, whether the reference needs oracle estimates) of a --policy name; None = the
    coordinator's default policy and settings."""
    base = (settings or CoordinatorSettings()).scheduler_config()
    if name is None:
        return base, False
    if name in POLICIES:
        return dataclasses.replace(base, policy=name), False
    reference = REFERENCES.get(name)
    if reference is None:
        raise UnsupportedPolicy(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    return dataclasses.replace(base, policy=reference.policy, **reference.overrides), reference.oracle  # type: ignore[arg-type]
