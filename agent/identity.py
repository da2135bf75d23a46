"""Which user a job's ranks run as on this node: a pure decision, plus the account lookup it needs.

An agent running as root starts every rank as the job's owner (the owner's uid, primary
gid and supplementary groups), so jobs of different users cannot touch each other's
files or processes. It does so only when the owner can be believed: the coordinator
authenticated it (RegisterAck.owners_authenticated: bearer tokens are on, or the owner
came from the kernel over a local socket). With tokens off, the owner is whatever the
submitter typed, and switching to it would let any local user run code as any other
(or as root). It refuses, with a reason that ends up on the job:

- every job, while owners are not authenticated, unless the node is single-user;
- a job without an owner, or an owner that is root (uid 0 under any name), unless the
  node's operator set `allow_root_ranks`;
- an owner with no account on this node;
- an owner not matched by `allowed_users`, when that list is set (entries are user
  names, or `@group` for the members of a group).

An agent that does not run as root cannot switch users: ranks run as the agent's own
user, and only `allowed_users` is enforced. So does an agent on a node its operator
declared single-user (`single_user`), root or not: the owner is only a label there, and
every rank runs as the agent's user, because the node and everything on it is theirs.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    """A user account of this node, as the rank will see it."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]
    """Every group id the user is in, the primary one included."""
    group_names: tuple[str, ...]


@dataclass(frozen=True)
class IdentityPolicy:
    """The node operator's rules (agent settings `allowed_users`, `allow_root_ranks`, `single_user`)."""

    allowed_users: tuple[str, ...] = ()
    """Owners whose jobs may run here (names, or @group); empty = every user of the node."""
    allow_root_ranks: bool = False
    """Let an agent running as root start ranks as root: for jobs without an owner or owned by root."""
    single_user: bool = False
    """The node is one user's: every rank runs as the agent's own user whatever owner the job names."""


@dataclass(frozen=True)
class RankIdentity:
    """Whom to start the ranks as. `switch` False = as the agent itself (no uid change)."""

    switch: bool
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """HOME, USER, LOGNAME of the account, so the rank's tools find the right home."""


AS_AGENT = RankIdentity(switch=False)

AccountLookup = Callable[[str], "Account | None"]


def lookup_account(name: str) -> Account | None:
    """The account called `name` on this node (passwd and group databases, NSS included), None if none."""
    try:
        entry = pwd.getpwnam(name)
        group_ids = tuple(os.getgrouplist(name, entry.pw_gid))
    except (KeyError, ValueError, OSError):  # ValueError: a NUL in the name
        return None
    names = []
    for gid in group_ids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass  # a gid without a group entry still counts by number
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, group_ids, tuple(names))


def allowed(account: Account, allowed_users: Sequence[str]) -> bool:
    if not allowed_users:
        return True
    for entry in allowed_users:
        if entry.startswith("@"):
            if entry[1:] in account.group_names:
                return True
        elif entry == account.name:
            return True
    return False


UNAUTHENTICATED_OWNERS = (
    "the coordinator does not authenticate job owners (bearer tokens are off), and this node's agent runs as root: "
    "it will not let an unauthenticated owner choose whom the rank runs as. Turn tokens on at the coordinator, "
    "or declare the node single-user (agent setting single_user = true, --single-user: every rank runs as the agent's user)"
)


def decide_rank_identity(
    owner: str, policy: IdentityPolicy, *, agent_uid: int, lookup: AccountLookup, owners_authenticated: bool = False
) -> RankIdentity | str:
    """Whom a job owned by `owner` runs as on this node, or why it may not run here (a sentence).

    `owners_authenticated`: the coordinator vouches for `owner` (what its RegisterAck said)."""
    not_allowed = f"owner {owner!r} is not in this node's allowed_users"
    account = lookup(owner) if owner else None
    if agent_uid != 0 or policy.single_user:
        if policy.allowed_users and (account is None or not allowed(account, policy.allowed_users)):
            return not_allowed
        return AS_AGENT
    if not owners_authenticated:
        return UNAUTHENTICATED_OWNERS
    if not owner:
        if not policy.allow_root_ranks:
            return (
                "the job has no owner, and this node's agent runs as root: "
                "it starts ranks only as the job's owner (allow_root_ranks is off)"
            )
        return not_allowed if policy.allowed_users else AS_AGENT
    if account is None:
        return f"owner {owner!r} has no account on this node"
    if account.uid == 0 and not policy.allow_root_ranks:
        return f"owner {owner!r} is root (uid 0), and this node does not run ranks as root (allow_root_ranks is off)"
    if not allowed(account, policy.allowed_users):
        return not_allowed
    if account.uid == 0:
        return AS_AGENT
    return RankIdentity(
        switch=True,
        uid=account.uid,
        gid=account.gid,
        groups=account.groups,
        env=(("HOME", account.home), ("USER", account.name), ("LOGNAME", account.name)),
    )
