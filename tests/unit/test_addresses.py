"""Parsing of destinations and addresses."""

import pytest

from appliance.errors import InvalidArgument
from appliance.sessions.model import Address, parse_destinations


def test_host_port_parses() -> None:
    assert Address.parse("10.1.0.5:5074") == Address("10.1.0.5", 5074)


def test_ipv6_in_brackets_parses_and_prints_back() -> None:
    address = Address.parse("[fd00::1]:80")
    assert address == Address("fd00::1", 80) and str(address) == "[fd00::1]:80"


@pytest.mark.parametrize("text", ["foo", "host:99999", "host:0", "", ":80", "a b:1", "host:-1"])
def test_malformed_destination_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Address.parse(text, what="destination")


def test_destinations_may_be_comma_separated_and_repeated() -> None:
    parsed = parse_destinations(["a:1,b:2", "c:3"])
    assert [str(a) for a in parsed] == ["a:1", "b:2", "c:3"]


def test_no_destination_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="at least one destination"):
        parse_destinations(["", " , "])
