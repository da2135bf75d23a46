"""Which scheduler settings a `--policy` name means in the simulator.

A coordinator policy (coordinator/scheduler/types.py POLICIES) is the coordinator's default settings
(CoordinatorSettings → SchedulerConfig, as the daemon builds them) with that policy. The reference
policies exist only here, for comparison; each is the production scheduler with settings fixed and,
where it says so, the true durations as runtime estimates (oracle):

- `ref-fifo`: strict first-come-first-served: the head of the queue blocks everyone (no backfill).
- `ref-sjf`: shortest job first by true duration, no preemption.
- `ref-srtf`: preemptive shortest-remaining-time-first by true duration (each later attempt pays
  --preemption-cost).

A reference policy needs scheduler features (a setting, a policy) that a build may lack; asking for it
then raises `UnsupportedPolicy` naming what is missing, rather than running something else under its name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from coordinator.scheduler import POLICIES, SchedulerConfig
from coordinator.settings import CoordinatorSettings


class UnsupportedPolicy(ValueError):
    """A policy this build of the scheduler cannot run; the message says what is missing."""


@dataclass(frozen=True)
class Reference:
    policy: str
    oracle: bool
    required: dict[str, object] = field(default_factory=dict)
    """SchedulerConfig fields the reference needs, with their values."""
    optional: dict[str, object] = field(default_factory=dict)
    """Fields set when the scheduler has them (e.g. preemption off: a build without it never preempts)."""
    description: str = ""


REFERENCES = {
    "ref-fifo": Reference("fcfs", False, required={"backfill": False}, description="strict FIFO, no backfill"),
    "ref-sjf": Reference("sjf", True, optional={"preemption": False}, description="shortest job first, oracle, no preemption"),
    "ref-srtf": Reference(
        "srtf", True, optional={"preemption": True}, description="preemptive shortest remaining time first, oracle"
    ),
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
    if reference.policy not in POLICIES:
        raise UnsupportedPolicy(f"{name} needs the scheduler policy {reference.policy!r}, which this build lacks")
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    missing = sorted(set(reference.required) - fields)
    if missing:
        raise UnsupportedPolicy(f"{name} needs SchedulerConfig.{', '.join(missing)}, which this build lacks")
    overrides = {**{k: v for k, v in reference.optional.items() if k in fields}, **reference.required}
    return dataclasses.replace(base, policy=reference.policy, **overrides), reference.oracle  # type: ignore[arg-type]
