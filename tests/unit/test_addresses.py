"""Parsing of destinations and addresses."""

import pytest

from appliance.errors import InvalidArgument
from appliance.sessions.model import MAX_DESTINATIONS, Address, parse_destinations


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


@pytest.mark.parametrize(
    "text",
    [
        "256.256.256.256:80",
        "1.2.3.4:00080",
        "1.2.3:80",
        "[fd00::1::2]:80",
        "-host:80",
        "host-:80",
        "a..b:80",
        f"{'a' * 64}.example:80",
        "host_name:80",
        "1.2.3.4:0",
    ],
)
def test_destination_must_be_an_address_or_a_hostname_with_a_canonical_port(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Address.parse(text, what="destination")


@pytest.mark.parametrize(
    "text", ["192.0.2.1:1", "[2001:db8::1]:65535", "data-1.example.org:5074", "localhost:80", "a:9"]
)
def test_valid_addresses_and_hostnames_parse(text: str) -> None:
    assert str(Address.parse(text, what="destination")) == text


def test_more_destinations_than_the_cap_are_invalid_argument() -> None:
    parse_destinations([f"10.0.0.1:{port}" for port in range(1, MAX_DESTINATIONS + 1)])
    with pytest.raises(InvalidArgument, match="at most"):
        parse_destinations([",".join(f"10.0.0.1:{port}" for port in range(1, MAX_DESTINATIONS + 2))])


def test_ten_thousand_destinations_are_refused_before_they_are_parsed() -> None:
    with pytest.raises(InvalidArgument, match="at most"):
        parse_destinations(["10.0.0.1:80"] * 10_000)
