"""The dashboard's --coordinator: a list checked as gpuctl checks it, handed whole to the SDK (which follows the leader)."""

from __future__ import annotations

import pytest

from gpuorch.dashboard.feed import ClientOptions, Coordinators, parse_addresses


def test_a_list_gets_default_ports_and_keeps_its_order():
    assert parse_addresses("head-b, head-a:6000") == ("head-b:50051", "head-a:6000")


@pytest.mark.parametrize("text", ["", "a,,b", "head:http"])
def test_a_bad_list_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--coordinator"):
        parse_addresses(text)


async def test_every_client_is_given_the_whole_list():
    coordinators = Coordinators(ClientOptions(parse_addresses("a:1,b:2")))
    client = coordinators.client("token")
    try:
        assert client.addresses == ("a:1", "b:2")
    finally:
        await client.close()
