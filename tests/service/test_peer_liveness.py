"""An ACTIVE session whose peer appliance stays unreachable longer than `peer_grace` ends FAILED on the
side that noticed, with its resources freed; a peer that comes back in time keeps the session."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from appliance.api.scistream import v1 as api
from appliance.control.server import Appliance

from .conftest import Facility, echo_through, facility_pair, open_session


async def _state_when_settled(facility: Facility, session_id: str, timeout: float) -> api.Session:
    """The session once it ended, or as it is after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with facility.client() as client:
            session = await client.get(session_id)
        if session.state in (api.State.FAILED, api.State.RELEASED):
            return session
        if asyncio.get_running_loop().time() > deadline:
            return session
        await asyncio.sleep(0.2)


def _udp_port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


async def test_producer_side_fails_the_session_when_the_consumer_appliance_is_gone(
    tmp_path: Path, echo_server: str
) -> None:
    async with facility_pair(tmp_path, peer_grace=1.0) as (a, b):
        created, _ = await open_session((a, b), echo_server)
        await b.appliance.stop()
        producer = await _state_when_settled(a, created.session.session_id, timeout=10)
        assert producer.state == api.State.FAILED
        assert producer.reason == "consumer appliance unreachable"
        assert _udp_port_free(created.session.data_endpoints[0])


async def test_consumer_side_fails_the_session_when_the_producer_appliance_stays_away(
    tmp_path: Path, echo_server: str
) -> None:
    async with facility_pair(tmp_path, peer_grace=1.0) as (a, b):
        _, joined = await open_session((a, b), echo_server)
        await a.appliance.stop()
        consumer = await _state_when_settled(b, joined.session_id, timeout=10)
        assert consumer.state == api.State.FAILED
        assert consumer.reason == "producer appliance unreachable"


async def test_a_producer_restart_within_the_grace_period_keeps_the_session(
    tmp_path: Path, echo_server: str
) -> None:
    async with facility_pair(tmp_path, peer_grace=4.0) as (a, b):
        created, joined = await open_session((a, b), echo_server)
        await a.appliance.stop()
        a.appliance = Appliance(a.appliance.settings)
        await a.appliance.start()
        # Longer than the grace period, with no traffic: the consumer side reconnected on its own.
        producer = await _state_when_settled(a, created.session.session_id, timeout=6)
        consumer = await _state_when_settled(b, joined.session_id, timeout=0)
        assert (producer.state, consumer.state) == (api.State.ACTIVE, api.State.ACTIVE)
        assert await echo_through(joined.entry_points[0], b"still here") == b"still here"


async def test_tls_mode_producer_side_fails_the_session_when_the_consumer_appliance_is_gone(
    tmp_path: Path, echo_server: str
) -> None:
    async with facility_pair(tmp_path, peer_grace=1.0) as (a, b):
        created, _ = await open_session((a, b), echo_server, mode=api.Mode.TLS)
        await b.appliance.stop()
        producer = await _state_when_settled(a, created.session.session_id, timeout=10)
        assert producer.state == api.State.FAILED
        assert producer.reason == "consumer appliance unreachable"


async def test_tls_mode_consumer_side_fails_the_session_when_the_producer_appliance_stays_away(
    tmp_path: Path, echo_server: str
) -> None:
    async with facility_pair(tmp_path, peer_grace=1.0) as (a, b):
        _, joined = await open_session((a, b), echo_server, mode=api.Mode.TLS)
        await a.appliance.stop()
        consumer = await _state_when_settled(b, joined.session_id, timeout=10)
        assert consumer.state == api.State.FAILED
        assert consumer.reason == "producer appliance unreachable"


async def test_tls_mode_keeps_an_idle_session_whose_peer_is_there(tmp_path: Path, echo_server: str) -> None:
    async with facility_pair(tmp_path, peer_grace=1.0) as (a, b):
        created, joined = await open_session((a, b), echo_server, mode=api.Mode.TLS)
        # Several grace periods without traffic: the data plane still proves each side to the other.
        producer = await _state_when_settled(a, created.session.session_id, timeout=4)
        consumer = await _state_when_settled(b, joined.session_id, timeout=0)
        assert (producer.state, consumer.state) == (api.State.ACTIVE, api.State.ACTIVE)
        assert await echo_through(joined.entry_points[0], b"idle") == b"idle"


async def _restart(facility: Facility) -> None:
    await facility.appliance.stop()
    facility.appliance = Appliance(facility.appliance.settings)
    await facility.appliance.start()


async def test_a_leave_the_peer_missed_is_retried_across_a_restart_until_it_answers(
    tmp_path: Path, echo_server: str
) -> None:
    """Long grace: only the retried Leave can end the producer side's session."""
    async with facility_pair(tmp_path, peer_grace=120.0) as (a, b):
        created, joined = await open_session((a, b), echo_server, mode=api.Mode.TLS)
        await a.appliance.stop()
        async with b.client() as client:
            released = await client.release(joined.session_id)
        assert released.state == api.State.RELEASED
        await _restart(b)  # the undelivered Leave survives the consumer side's restart
        a.appliance = Appliance(a.appliance.settings)
        await a.appliance.start()
        producer = await _state_when_settled(a, created.session.session_id, timeout=20)
        assert producer.state == api.State.RELEASED
        assert producer.reason.startswith("released by peer")


async def test_a_restart_serves_at_once_and_retries_sessions_whose_producer_is_down(
    tmp_path: Path, echo_server: str
) -> None:
    """Both appliances go down; the consumer side comes back first: it serves without waiting for the
    producer side, keeps the session, and carries it again once the producer side is back."""
    async with facility_pair(tmp_path, peer_grace=60.0) as (a, b):
        _, joined = await open_session((a, b), echo_server)  # QUIC
        await a.appliance.stop()
        await _restart(b)
        async with b.client() as client:
            assert await client.serving()
            restored = await client.get(joined.session_id)
        assert restored.state == api.State.ACTIVE
        a.appliance = Appliance(a.appliance.settings)
        await a.appliance.start()
        assert await echo_through(joined.entry_points[0], b"back again") == b"back again"
