"""Quotas per user and per group: what the settings say, parsed and checked, and the submit-time pending check.

In the coordinator's TOML:

    [groups]                      # which users make up each group; a user is in at most one group
    vision = ["alice", "bob"]

    [quotas.users."*"]            # every user not named below
    max_pending_jobs = 200
    [quotas.users.alice]
    max_gpus = 8                  # GPUs alice's running jobs may hold at once (0 = no cap)
    max_pending_jobs = 100        # jobs alice may have pending at once (0 = no cap)
    [quotas.groups.vision]        # "*" here: every group not named (users in no group have no group quota)
    max_gpus = 32

A key absent is inherited: a named user's from "*", "*"'s from the flat `max_pending_jobs_per_user`
(pending jobs) or no cap (GPUs). `max_gpus` is enforced by the scheduler in its pass (a capped job waits
with a reason naming the quota); `max_pending_jobs` at submit (RESOURCE_EXHAUSTED naming it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT = "*"
"""The key whose limits apply to every user (or group) not named."""
LIMIT_KEYS = ("max_gpus", "max_pending_jobs")
_NO_LIMITS: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    users: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """User (or "*") -> the limits set for them: a subset of LIMIT_KEYS."""
    groups: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Group (or "*") -> the limits set for it."""
    user_group: Mapping[str, str] = field(default_factory=dict)
    """User -> their group."""
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Group -> its users."""

    def group_of(self, user: str) -> str:
        return self.user_group.get(user, "")

    def _limit(self, table: Mapping[str, Mapping[str, int]], name: str, key: str, section: str) -> tuple[int, str] | None:
        """(limit, the quota's name in the settings) for `name`, falling back to "*"; None if neither sets it."""
        for who in (name, DEFAULT):
            value = table.get(who, _NO_LIMITS).get(key)
            if value is not None:
                return value, f"quotas.{section}.{_toml_key(who)}.{key}"
        return None

    def user_limit(self, user: str, key: str) -> tuple[int, str] | None:
        return self._limit(self.users, user, key, "users")

    def group_limit(self, group: str, key: str) -> tuple[int, str] | None:
        return self._limit(self.groups, group, key, "groups") if group else None

    def max_gpus(self) -> tuple[dict[str, int], dict[str, int]]:
        """The running-GPU caps for the scheduler: (per owner, per group), "*" keys included."""
        owners = {user: limits["max_gpus"] for user, limits in self.users.items() if "max_gpus" in limits}
        groups = {group: limits["max_gpus"] for group, limits in self.groups.items() if "max_gpus" in limits}
        return owners, groups


def _toml_key(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else f'"{name}"'


def pending_quota_problem(
    policy: QuotaPolicy, owner: str, pending_by_owner: Mapping[str, int], max_pending_jobs_per_user: int
) -> str | None:
    """Why one more pending job of `owner` is refused, naming the quota; None if it may be queued."""
    who = owner or "the anonymous owner"
    queued = pending_by_owner.get(owner, 0)
    user_limit = policy.user_limit(owner, "max_pending_jobs") or (max_pending_jobs_per_user, "max_pending_jobs_per_user")
    limit, name = user_limit
    if limit and queued >= limit:
        return f"{who} already has {queued} pending jobs; the limit is {name}={limit}"
    group = policy.group_of(owner)
    group_limit = policy.group_limit(group, "max_pending_jobs")
    if group_limit is not None and group_limit[0]:
        limit, name = group_limit
        queued = sum(pending_by_owner.get(member, 0) for member in policy.members.get(group, ()))
        if queued >= limit:
            return f"group {group} (of {who}) already has {queued} pending jobs; the limit is {name}={limit}"
    return None


def parse_quotas(quotas: Any, groups: Any) -> QuotaPolicy:
    """The policy of the `quotas` and `groups` settings; raises ValueError naming what is wrong."""
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must be a table of group = [users], got {groups!r}")
    user_group: dict[str, str] = {}
    members: dict[str, tuple[str, ...]] = {}
    for group, users in groups.items():
        if not group or group == DEFAULT:
            raise ValueError(f"groups: {group!r} is not a group name")
        if not isinstance(users, list) or not all(isinstance(user, str) and user for user in users):
            raise ValueError(f"groups.{group} must be a list of user names, got {users!r}")
        for user in users:
            if user in user_group and user_group[user] != group:
                raise ValueError(f"groups: user {user!r} is in both {user_group[user]!r} and {group!r}; a user has one group")
            user_group[user] = group
        members[group] = tuple(dict.fromkeys(users))
    if not isinstance(quotas, Mapping):
        raise ValueError(f"quotas must be a table with [quotas.users.NAME] and [quotas.groups.NAME], got {quotas!r}")
    unknown = sorted(set(quotas) - {"users", "groups"})
    if unknown:
        raise ValueError(f"quotas: unknown key {unknown[0]!r} (known: users, groups)")
    tables = {section: _limits_table(quotas.get(section, {}), section) for section in ("users", "groups")}
    for group in tables["groups"]:
        if group != DEFAULT and group not in members:
            raise ValueError(f"quotas.groups.{group}: no such group; name its users under [groups] ({group} = [...])")
    return QuotaPolicy(tables["users"], tables["groups"], user_group, members)


def _limits_table(table: Any, section: str) -> dict[str, dict[str, int]]:
    if not isinstance(table, Mapping):
        raise ValueError(f"quotas.{section} must be a table of NAME = {{max_gpus, max_pending_jobs}}, got {table!r}")
    parsed: dict[str, dict[str, int]] = {}
    for name, limits in table.items():
        where = f"quotas.{section}.{_toml_key(name)}"
        if not isinstance(limits, Mapping):
            raise ValueError(f"{where} must be a table with max_gpus and/or max_pending_jobs, got {limits!r}")
        unknown = sorted(set(limits) - set(LIMIT_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(LIMIT_KEYS)})")
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{key} must be an integer >= 0 (0 = no cap), got {value!r}")
        parsed[name] = dict(limits)
    return parsed
