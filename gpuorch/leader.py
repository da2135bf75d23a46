"""Following the leader among several coordinators: which address to try next. Pure: no I/O, no clock.

Any number of coordinators may serve one cluster; one leads, the others are standbys. A standby
answers every gpuorch RPC with UNAVAILABLE and names the leader in the trailing metadata
`gpuorch-leader` (its client address) and `gpuorch-leader-agents` (its agent address, when the
leader serves agents on a port of their own). Agents and clients hold the list they were given
and walk it:

- a round tries the last known leader first, then the others in the order given;
- an address that answers as the leader becomes the known leader, and the round is over;
- a standby that names a leader not yet tried in this round: go there at once, without waiting;
- refused, timed out, UNAVAILABLE without a leader named, or a standby naming one already tried
  in this round: the next untried address of the round;
- when every address of the round has failed (or the link to the leader was lost), the caller
  waits its backoff delay (gpuorch.backoff) and a new round starts, the known leader first.

A round tries each address at most once, so two standbys that name a dead leader cannot send
anyone round in circles without a backoff delay between.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from gpuorch.addresses import AddressError, parse_address

LEADER_METADATA_KEY = "gpuorch-leader"
"""Trailing metadata of a standby's UNAVAILABLE: the leader's client address HOST:PORT ("" when none is known)."""
LEADER_AGENTS_METADATA_KEY = "gpuorch-leader-agents"
"""Trailing metadata of a standby's UNAVAILABLE to agents: the leader's agent address, when it differs
(agent_listen); agents fall back to LEADER_METADATA_KEY without it."""


class Outcome(enum.Enum):
    """What trying one address came to."""

    LEADER = "leader"
    """It answered as the leader: served a call, or acknowledged an agent's registration."""
    STANDBY = "standby"
    """A standby answered (UNAVAILABLE with the leader metadata), naming a leader or none."""
    UNREACHABLE = "unreachable"
    """Refused, timed out, or UNAVAILABLE without the leader metadata."""
    LOST = "lost"
    """A link the leader had accepted (an agent's registered stream) ended."""


@dataclass(frozen=True)
class Step:
    """Where to go next: `address`, after a backoff delay when `wait` (a full round failed, or the link was lost)."""

    address: str
    wait: bool


@dataclass(frozen=True)
class Following:
    """Where a client or agent stands: the addresses it was given, the leader it knows, this round."""

    addresses: tuple[str, ...]
    """The list given (--coordinator), in its order."""
    leader: str = ""
    """The last address that answered as the leader or was named as it; "" when none is known."""
    current: str = ""
    """The address being tried now."""
    tried: frozenset[str] = field(default_factory=frozenset)
    """The addresses of this round that have failed so far."""

    def round_order(self) -> tuple[str, ...]:
        """The known leader first (even when it is not in the list), then the list in its order."""
        if not self.leader:
            return self.addresses
        return (self.leader, *(address for address in self.addresses if address != self.leader))


def begin(addresses: Iterable[str], leader: str = "") -> Following:
    """The start of following `addresses`: the first round, at `leader` if one is known, else the first address."""
    given = tuple(addresses)
    if not given:
        raise ValueError("no coordinator address to follow")
    state = Following(given, leader)
    return replace(state, current=state.round_order()[0])


def advance(state: Following, outcome: Outcome, named: str = "") -> tuple[Following, Step]:
    """After trying `state.current` came to `outcome` (`named`: the leader a standby named), the next step."""
    if outcome is Outcome.LEADER:
        return replace(state, leader=state.current, tried=frozenset()), Step(state.current, wait=False)
    if outcome is Outcome.LOST:
        lost = replace(state, leader=state.current, tried=frozenset())
        return lost, Step(lost.current, wait=True)
    tried = state.tried | {state.current}
    if outcome is Outcome.STANDBY and named:
        if named not in tried:
            return replace(state, leader=named, current=named, tried=tried), Step(named, wait=False)
        if named != state.current:  # a standby that names itself is no leader
            state = replace(state, leader=named)
    untried = [address for address in state.round_order() if address not in tried]
    if untried:
        return replace(state, current=untried[0], tried=tried), Step(untried[0], wait=False)
    fresh = replace(state, tried=frozenset())
    fresh = replace(fresh, current=fresh.round_order()[0])
    return fresh, Step(fresh.current, wait=True)


def standby_leader(trailing_metadata: Iterable[Any] | None, *, for_agents: bool = False) -> str | None:
    """The leader a standby's answer names, from its trailing metadata ((key, value) pairs, as grpc and
    grpc.aio give them): None when the metadata is not a standby's (no leader key),
    "" when the standby knows no leader or names one that is not an address. Agents read the agent
    address first, then the client address."""
    values: dict[str, str] = {}
    for key, value in trailing_metadata or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        values.setdefault(key.lower(), text)
    keys = (LEADER_AGENTS_METADATA_KEY, LEADER_METADATA_KEY) if for_agents else (LEADER_METADATA_KEY,)
    present = [values[key].strip() for key in keys if key in values]
    if not present:
        return None
    named = next((value for value in present if value), "")
    if not named:
        return ""
    try:
        return parse_address(named, setting=LEADER_METADATA_KEY)
    except AddressError:
        return ""
