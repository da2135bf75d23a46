"""Following the leader (gpuorch.leader) and coordinator address lists (gpuorch.addresses): pure, no I/O."""

from __future__ import annotations

import pytest

from gpuorch.addresses import AddressError, is_local_address, parse_address, parse_address_list, with_default_port
from gpuorch.leader import (
    LEADER_AGENTS_METADATA_KEY,
    LEADER_METADATA_KEY,
    Following,
    Outcome,
    Step,
    advance,
    begin,
    standby_leader,
)

A, B, C = "10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"


def walk(state: Following, *outcomes: tuple[Outcome, str]) -> list[Step]:
    steps = []
    for outcome, named in outcomes:
        state, step = advance(state, outcome, named)
        steps.append(step)
    return steps


# -- addresses --------------------------------------------------------------------------


def test_a_list_is_split_checked_given_default_ports_and_kept_in_order_without_repeats():
    assert parse_address_list("gpu-a, gpu-b:6000,[::1],::1,unix:/run/gpuorch/coordinator.sock") == (
        "gpu-a:50051",
        "gpu-b:6000",
        "[::1]:50051",
        "unix:/run/gpuorch/coordinator.sock",
    )
    assert parse_address_list("dns:///head:7000,ipv4:10.0.0.1,gpu-a:50051,gpu-a") == (
        "dns:///head:7000",
        "ipv4:10.0.0.1:50051",
        "gpu-a:50051",
    )
    assert parse_address_list("127.0.0.1:50051") == ("127.0.0.1:50051",)
    assert parse_address("dns://8.8.8.8/head") == "dns://8.8.8.8/head:50051"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no address given"),
        ("a:1,,b:2", "entry 2 of 'a:1,,b:2' is empty"),
        ("a:1,", "entry 2 of 'a:1,' is empty"),
        ("a:1,b:http", "'b:http' is not HOST[:PORT] or unix:PATH (port 'http' is not a number from 1 to 65535)"),
        ("a:70000", "port '70000' is not a number"),
        ("a:0", "port '0' is not a number"),
        ("[fe80::zz]:1", "[fe80::zz] is not an IPv6 address"),
        ("http://head:50051", "'http://head' is not a host name"),
        (":50051", "it names no host"),
        ("gpu head:50051", "'gpu head' is not a host name"),
        ("unix:", "unix: names no socket"),
    ],
)
def test_a_bad_entry_is_named(text, message):
    with pytest.raises(AddressError) as raised:
        parse_address_list(text)
    assert message in str(raised.value) and str(raised.value).startswith("coordinator: ")


def test_the_setting_is_named_in_the_error():
    with pytest.raises(AddressError, match=r"^\$GPUORCH_COORDINATOR: 'x:y'"):
        parse_address_list("x:y", setting="$GPUORCH_COORDINATOR")


def test_default_ports_and_local_addresses_as_before():
    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("unix-abstract:gpuorch") == "unix-abstract:gpuorch"
    assert is_local_address("unix:/run/x.sock") and is_local_address("dns:///localhost:1") and is_local_address("[::1]:1")
    assert not is_local_address("10.0.0.1:50051")


# -- following --------------------------------------------------------------------------


def test_the_first_round_starts_at_the_first_address_or_at_a_known_leader():
    assert begin([A, B, C]).current == A
    assert begin([A, B, C], leader=C).current == C
    assert begin([A, B], leader=C).round_order() == (C, A, B)  # a leader named outside the list comes first
    with pytest.raises(ValueError, match="no coordinator address"):
        begin([])


def test_unreachable_addresses_are_walked_in_order_then_a_backoff_between_rounds():
    state = begin([A, B, C])
    steps = walk(state, (Outcome.UNREACHABLE, ""), (Outcome.UNREACHABLE, ""), (Outcome.UNREACHABLE, ""))
    assert steps == [Step(B, wait=False), Step(C, wait=False), Step(A, wait=True)]


def test_a_single_address_waits_its_backoff_after_every_failure_as_before():
    state = begin([A])
    state, step = advance(state, Outcome.UNREACHABLE)
    assert step == Step(A, wait=True)
    state, step = advance(state, Outcome.UNREACHABLE)
    assert step == Step(A, wait=True)


def test_a_standby_naming_the_leader_sends_there_at_once_and_the_next_round_starts_there():
    state = begin([A, B, C])
    state, step = advance(state, Outcome.STANDBY, C)
    assert step == Step(C, wait=False) and state.leader == C
    state, step = advance(state, Outcome.UNREACHABLE)  # the named leader is down too: the rest of the round
    assert step == Step(B, wait=False)
    state, step = advance(state, Outcome.UNREACHABLE)
    assert step == Step(C, wait=True) and state.round_order() == (C, A, B)


def test_a_standby_naming_a_leader_outside_the_list_is_followed():
    D = "10.0.0.9:7000"
    state = begin([A, B])
    state, step = advance(state, Outcome.STANDBY, D)
    assert step == Step(D, wait=False)
    state, step = advance(state, Outcome.LEADER)
    assert step == Step(D, wait=False) and state.leader == D and state.tried == frozenset()


def test_a_standby_without_a_leader_is_like_an_unreachable_one():
    state = begin([A, B])
    state, step = advance(state, Outcome.STANDBY, "")
    assert step == Step(B, wait=False) and state.leader == ""


def test_standbys_naming_a_dead_leader_cannot_loop_without_a_backoff():
    """A and B are standbys that still name C, which is down: each is tried once a round, then a wait."""
    state = begin([A, B, C])
    steps = walk(state, (Outcome.STANDBY, C), (Outcome.UNREACHABLE, ""), (Outcome.STANDBY, C))
    assert steps == [Step(C, wait=False), Step(B, wait=False), Step(C, wait=True)]


def test_a_standby_naming_itself_is_not_taken_for_the_leader():
    state = begin([A, B])
    state, step = advance(state, Outcome.STANDBY, A)
    assert step == Step(B, wait=False) and state.leader == ""


def test_the_leader_answering_ends_the_round_and_a_lost_link_starts_a_new_one_there_after_a_wait():
    state = begin([A, B, C])
    state, _ = advance(state, Outcome.UNREACHABLE)
    state, step = advance(state, Outcome.LEADER)
    assert step == Step(B, wait=False) and state.leader == B and state.tried == frozenset()
    state, step = advance(state, Outcome.LOST)
    assert step == Step(B, wait=True)  # a restart of the same coordinator is found first
    state, step = advance(state, Outcome.UNREACHABLE)
    assert step == Step(A, wait=False)
    state, step = advance(state, Outcome.UNREACHABLE)
    assert step == Step(C, wait=False)


# -- what a standby's answer says --------------------------------------------------------


def test_the_leader_is_read_from_a_standbys_trailing_metadata():
    assert standby_leader(((LEADER_METADATA_KEY, "10.0.0.5:50051"),)) == "10.0.0.5:50051"
    assert standby_leader(((LEADER_METADATA_KEY, b"10.0.0.5"),)) == "10.0.0.5:50051"
    assert standby_leader(((LEADER_METADATA_KEY, ""),)) == ""  # a standby that knows no leader yet
    assert standby_leader((("other", "x"),)) is None  # not a standby's answer
    assert standby_leader(None) is None
    assert standby_leader(((LEADER_METADATA_KEY, "not an address!"),)) == ""


def test_agents_prefer_the_leaders_agent_address_and_fall_back_to_its_client_address():
    both = ((LEADER_METADATA_KEY, "10.0.0.5:50051"), (LEADER_AGENTS_METADATA_KEY, "10.0.0.5:50052"))
    assert standby_leader(both, for_agents=True) == "10.0.0.5:50052"
    assert standby_leader(both) == "10.0.0.5:50051"
    assert standby_leader(((LEADER_METADATA_KEY, "10.0.0.5:50051"),), for_agents=True) == "10.0.0.5:50051"
    assert standby_leader(((LEADER_AGENTS_METADATA_KEY, ""), (LEADER_METADATA_KEY, "h:1")), for_agents=True) == "h:1"
    assert standby_leader(((LEADER_AGENTS_METADATA_KEY, "h:2"),)) is None  # clients read only the client key
