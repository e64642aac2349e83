"""Lane steering (quic_relay/lanes.py) with real sockets: which socket of a group gets a datagram."""

from __future__ import annotations

import socket

import pytest

from quic_relay.lanes import LANES, bind_lane, lane_of, steer, steering_program


def _group(family: socket.AddressFamily, host: str, size: int) -> list[socket.socket]:
    group: list[socket.socket] = []
    port = 0
    for _ in range(size):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.settimeout(2.0)
        port = sock.getsockname()[1]
        group.append(sock)
    return group


def _pending(group: list[socket.socket]) -> list[int]:
    """The sockets of the group with a datagram waiting (read it)."""
    found = []
    for index, sock in enumerate(group):
        sock.setblocking(False)
        try:
            sock.recv(100)
            found.append(index)
        except BlockingIOError:
            pass
        finally:
            sock.settimeout(2.0)
    return found


@pytest.mark.parametrize(
    ("family", "bind_host", "source"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # IPv4-mapped on a dual-stack group
        (socket.AF_INET6, "::", "::1"),
    ],
)
@pytest.mark.parametrize("size", [2, 3])
def test_each_lane_lands_on_its_own_socket(
    family: socket.AddressFamily, bind_host: str, source: str, size: int
) -> None:
    group = _group(family, bind_host, size)
    try:
        steer(group)
        port = group[0].getsockname()[1]
        for lane in range(2 * size):
            sender = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                bind_lane(sender, source, lane)
                assert sender.getsockname()[1] % LANES == lane
                sender.sendto(b"x", (source, port))
                expected = lane_of(sender.getsockname()[1], size)
                assert expected == lane % size
                group[expected].recv(100)  # waits for it there
            finally:
                sender.close()
            assert _pending(group) == []  # and it went nowhere else
    finally:
        for sock in group:
            sock.close()


def test_the_program_is_refused_for_more_sockets_than_lanes() -> None:
    assert len(steering_program(LANES)) % 8 == 0
    with pytest.raises(ValueError):
        steering_program(LANES + 1)
    with pytest.raises(ValueError):
        steering_program(0)


def test_a_lane_outside_the_range_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError):
            bind_lane(sock, "127.0.0.1", LANES)
    finally:
        sock.close()
