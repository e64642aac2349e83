"""Fuzzing the data plane from outside: random datagrams at the QUIC data endpoint, random bytes at the
TLS data endpoint, and random payloads through the entry points. The appliances stay alive and
serving, and both sessions still carry data, byte for byte, afterwards."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .harness import World, assert_sessions_carry_data, echo_through, split_address


@given(datagrams=st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=16))
def test_random_datagrams_at_the_quic_data_endpoint(world: World, datagrams: list[bytes]) -> None:
    target = split_address(world.sessions["quic"].producer.data_endpoints[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in datagrams:
            s.sendto(datagram, target)
    world.tally.count("udp datagram", len(datagrams))
    assert world.a.alive()


@given(payload=st.binary(max_size=4096), half_close=st.booleans())
def test_random_bytes_at_the_tls_data_endpoint(world: World, payload: bytes, half_close: bool) -> None:
    target = split_address(world.sessions["tls"].producer.data_endpoints[0])
    with socket.create_connection(target, timeout=10) as s:
        s.settimeout(0.5)
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            s.recv(4096)  # an alert, a close, or nothing
        except OSError:
            pass  # refused, reset or timed out: the appliance's right
    world.tally.count("tcp payload (data endpoint)")
    assert world.a.alive()


@pytest.mark.parametrize("mode", ["quic", "tls"])
def test_random_payloads_through_an_entry_point_arrive_intact(world: World, mode: str) -> None:
    entry_point = world.sessions[mode].consumer.entry_points[0]

    @given(payload=st.binary(max_size=8192))
    def run(payload: bytes) -> None:
        assert echo_through(entry_point, payload) == payload
        world.tally.count(f"tcp payload (entry point, {mode})")

    run()


def test_sessions_still_carry_data_after_the_fuzzing(world: World) -> None:
    """Runs last in this module (pytest keeps file order): the garbage above broke nothing."""
    assert_sessions_carry_data(world)
    world.assert_well()
