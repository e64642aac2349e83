"""The data port allocator: bind-tested, lowest first, reused after release, exhaustion reported."""

import socket

import pytest

from appliance.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from appliance.sessions.ports import TCP, UDP, PortAllocator, PortRange


def _free_range(size: int) -> PortRange:
    """A range of ports that are free right now (picked near an ephemeral port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    first = min(base, 65535 - size)
    return PortRange(first, first + size - 1)


def test_range_parses() -> None:
    assert PortRange.parse("5100-5200") == PortRange(5100, 5200)


@pytest.mark.parametrize("text", ["5100", "a-b", "5200-5100", "0-10", "1-70000"])
def test_bad_range_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        PortRange.parse(text)


def test_ports_are_handed_out_lowest_first_and_reused_after_release() -> None:
    ports = PortAllocator(_free_range(4), "127.0.0.1")
    first = ports.allocate("s1", TCP)
    second = ports.allocate("s2", TCP)
    assert second == first + 1
    assert ports.release("s1") == [first]
    assert ports.allocate("s3", TCP) == first


def test_exhausted_range_is_resource_exhausted() -> None:
    ports = PortAllocator(_free_range(2), "127.0.0.1")
    ports.allocate("s1", TCP)
    ports.allocate("s1", TCP)
    with pytest.raises(ResourceExhausted):
        ports.allocate("s2", TCP)
    assert ports.owned_by("s2") == []


def test_port_in_use_by_another_program_is_skipped() -> None:
    port_range = _free_range(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port_range.first))
        squatter.listen()
        ports = PortAllocator(port_range, "127.0.0.1")
        assert ports.allocate("s1", TCP) == port_range.first + 1


def test_a_session_cannot_claim_another_sessions_port() -> None:
    ports = PortAllocator(_free_range(2), "127.0.0.1")
    port = ports.allocate("s1", TCP)
    with pytest.raises(AlreadyExists):
        ports.claim("s2", port, TCP)
    assert ports.owned_by("s1") == [port]


def test_claim_outside_range_is_refused_when_range_required() -> None:
    port_range = _free_range(2)
    ports = PortAllocator(port_range, "127.0.0.1")
    with pytest.raises(InvalidArgument):
        ports.claim("s1", port_range.last + 1, TCP, in_range=True)


def test_tcp_and_udp_ports_are_separate_spaces() -> None:
    ports = PortAllocator(_free_range(1), "127.0.0.1")
    tcp = ports.allocate("s1", TCP)
    assert ports.claim("s2", tcp, UDP) == tcp
    with pytest.raises(AlreadyExists):
        ports.claim("s3", tcp, TCP)
