"""The Control and Peer services end to end in one process: two appliances, real QUIC, real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from grpclib.client import Channel

from appliance.api.scistream import v1 as api
from appliance.control.channel import Trust, call, open_channel
from appliance.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from appliance.sessions import ticket as tk
from appliance.sessions.manager import join_transcript

from .conftest import Facility, echo_through, free_port_block, open_session, start_facility

Pair = tuple[Facility, Facility]


def _create(dest: str, **fields: object) -> api.CreateSessionRequest:
    return api.CreateSessionRequest(destinations=[dest], **fields)  # type: ignore[arg-type]


async def _state(facility: Facility, session_id: str) -> api.State:
    async with facility.client() as client:
        return (await client.get(session_id)).state


async def test_inbound_returns_a_pending_session_with_ticket_and_data_endpoint(
    facilities: Pair, echo_server: str
) -> None:
    a, _ = facilities
    async with a.client() as client:
        reply = await client.create(_create(echo_server))
    assert reply.session.state == api.State.PENDING
    assert reply.ticket.startswith("sst1.")
    assert reply.session.destinations == [echo_server]
    assert len(reply.session.data_endpoints) == 1
    assert reply.session.owner == "alice"


async def test_outbound_activates_both_sides_and_carries_tcp(facilities: Pair, echo_server: str) -> None:
    created, joined = await open_session(facilities, echo_server)
    assert joined.state == api.State.ACTIVE and len(joined.entry_points) == 1
    payload = bytes(range(256)) * 4096  # 1 MiB, half-closed after sending
    assert await echo_through(joined.entry_points[0], payload) == payload
    assert await _state(facilities[0], created.session.session_id) == api.State.ACTIVE


async def test_num_conn_binds_that_many_entry_points(facilities: Pair, echo_server: str) -> None:
    _, joined = await open_session(facilities, echo_server, num_conn=3)
    assert len(set(joined.entry_points)) == 3
    for entry_point in joined.entry_points:
        assert await echo_through(entry_point, b"ping") == b"ping"


async def test_counters_grow_with_traffic(facilities: Pair, echo_server: str) -> None:
    created, joined = await open_session(facilities, echo_server)
    await echo_through(joined.entry_points[0], b"x" * 100_000)
    async with facilities[1].client() as client:
        consumer = await client.get(joined.session_id)
    async with facilities[0].client() as client:
        producer = await client.get(created.session.session_id)
    assert consumer.bytes_in >= 100_000 and consumer.bytes_out >= 100_000
    assert producer.bytes_in >= 100_000 and producer.bytes_out >= 100_000


async def test_release_on_consumer_side_releases_both(facilities: Pair, echo_server: str) -> None:
    created, joined = await open_session(facilities, echo_server)
    async with facilities[1].client() as client:
        released = await client.release(joined.session_id)
    assert released.state == api.State.RELEASED
    assert await _state(facilities[0], created.session.session_id) == api.State.RELEASED
    with pytest.raises(OSError):
        await echo_through(joined.entry_points[0], b"gone")


async def test_release_on_producer_side_releases_both(facilities: Pair, echo_server: str) -> None:
    created, joined = await open_session(facilities, echo_server)
    async with facilities[0].client() as client:
        await client.release(created.session.session_id)
    assert await _state(facilities[1], joined.session_id) == api.State.RELEASED


async def test_released_ports_are_reused(facilities: Pair, echo_server: str) -> None:
    created, joined = await open_session(facilities, echo_server)
    async with facilities[1].client() as client:
        await client.release(joined.session_id)
    created2, joined2 = await open_session(facilities, echo_server)
    assert joined2.entry_points == joined.entry_points
    assert created2.session.data_endpoints == created.session.data_endpoints


async def test_ls_shows_ended_sessions_as_records(facilities: Pair, echo_server: str) -> None:
    _, joined = await open_session(facilities, echo_server)
    async with facilities[1].client() as client:
        await client.release(joined.session_id)
        sessions = await client.list()
    assert [(s.session_id, s.state) for s in sessions] == [(joined.session_id, api.State.RELEASED)]


async def test_watch_streams_until_the_session_ends(facilities: Pair, echo_server: str) -> None:
    _, joined = await open_session(facilities, echo_server)
    states: list[api.State] = []

    async def watch() -> None:
        async with facilities[1].client() as client:
            async for session in client.watch(joined.session_id, interval_ms=100):
                states.append(session.state)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    async with facilities[1].client() as client:
        await client.release(joined.session_id)
    await asyncio.wait_for(watcher, 5)
    assert states[0] == api.State.ACTIVE and states[-1] == api.State.RELEASED


async def test_lease_expiry_releases_the_session(facilities: Pair, echo_server: str) -> None:
    created, _ = await open_session(facilities, echo_server, ttl_seconds=1)
    deadline = time.monotonic() + 5
    while await _state(facilities[0], created.session.session_id) != api.State.RELEASED:
        assert time.monotonic() < deadline, "lease did not expire"
        await asyncio.sleep(0.2)


async def test_a_refusing_destination_fails_the_stream_not_the_session(facilities: Pair) -> None:
    closed_port = free_port_block(1)
    _, joined = await open_session(facilities, f"127.0.0.1:{closed_port}")
    try:
        refused = await echo_through(joined.entry_points[0], b"hello")
    except OSError:  # the relay (another process) may reset the app's connection before it half-closes
        refused = b""
    assert refused == b""
    assert await _state(facilities[1], joined.session_id) == api.State.ACTIVE

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads the request first: closing with it unread would reset the connection (RST), and
        # the relay (another process) may well have written it by then.
        await reader.readexactly(len(b"hello"))
        writer.write(b"late")
        writer.close()

    server = await asyncio.start_server(late, "127.0.0.1", closed_port)
    try:
        assert await echo_through(joined.entry_points[0], b"hello") == b"late"
    finally:
        server.close()


# ---- bad input: a clear status, and nothing changes -------------------------------------------


async def _snapshot(facility: Facility) -> list[tuple[str, api.State]]:
    async with facility.client("root") as client:
        return [(s.session_id, s.state) for s in await client.list()]


@pytest.mark.parametrize("dest", ["foo", "host:99999", ""])
async def test_malformed_destination_is_invalid_argument(facilities: Pair, dest: str) -> None:
    a, _ = facilities
    async with a.client() as client:
        with pytest.raises(InvalidArgument):
            await client.create(_create(dest))
    assert await _snapshot(a) == []


async def test_missing_token_is_unauthenticated(facilities: Pair, echo_server: str) -> None:
    async with facilities[0].client(subject=None) as client:
        with pytest.raises(Unauthenticated):
            await client.create(_create(echo_server))
    assert await _snapshot(facilities[0]) == []


async def test_invalid_token_is_unauthenticated(facilities: Pair, echo_server: str) -> None:
    a, _ = facilities
    a.tokens["mallory"] = "sst_" + "x" * 43
    async with a.client("mallory") as client:
        with pytest.raises(Unauthenticated):
            await client.list()


async def test_another_subject_cannot_see_or_release_my_session(facilities: Pair, echo_server: str) -> None:
    created, _ = await open_session(facilities, echo_server)
    session_id = created.session.session_id
    async with facilities[0].client("bob") as bob:
        with pytest.raises(NotFound):
            await bob.get(session_id)
        with pytest.raises(NotFound):
            await bob.release(session_id)
        assert await bob.list() == []
    assert await _state(facilities[0], session_id) == api.State.ACTIVE


async def test_admin_sees_every_session(facilities: Pair, echo_server: str) -> None:
    created, _ = await open_session(facilities, echo_server)
    assert [sid for sid, _ in await _snapshot(facilities[0])] == [created.session.session_id]


async def test_unknown_session_is_not_found(facilities: Pair) -> None:
    async with facilities[0].client() as client:
        with pytest.raises(NotFound):
            await client.get("no-such-session")
        with pytest.raises(NotFound):
            await client.release("no-such-session")


async def test_releasing_twice_is_failed_precondition(facilities: Pair, echo_server: str) -> None:
    _, joined = await open_session(facilities, echo_server)
    async with facilities[1].client() as client:
        await client.release(joined.session_id)
        with pytest.raises(FailedPrecondition):
            await client.release(joined.session_id)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_damaged_ticket_is_invalid_argument(facilities: Pair, echo_server: str, damage: str) -> None:
    a, b = facilities
    async with a.client() as client:
        ticket = (await client.create(_create(echo_server))).ticket
    if damage == "flip":
        ticket = ticket[:10] + ("A" if ticket[10] != "A" else "B") + ticket[11:]
    else:
        ticket = ticket[: len(ticket) - 7]
    async with b.client() as client:
        with pytest.raises(InvalidArgument):
            await client.join(api.JoinSessionRequest(ticket=ticket))
    assert await _snapshot(b) == []


async def test_a_ticket_joins_once(facilities: Pair, echo_server: str) -> None:
    a, b = facilities
    async with a.client() as producer:
        created = await producer.create(_create(echo_server))
    async with b.client() as consumer:
        first = await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
        with pytest.raises(AlreadyExists):
            await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
    assert await _snapshot(b) == [(first.session.session_id, api.State.ACTIVE)]
    assert await echo_through(first.session.entry_points[0], b"still") == b"still"


async def test_port_range_exhausted_is_resource_exhausted(tmp_path: Path, echo_server: str) -> None:
    a = await start_facility(tmp_path, "small", ports=2)
    try:
        async with a.client() as client:
            await client.create(_create(echo_server))
            await client.create(_create(echo_server))
            with pytest.raises(ResourceExhausted):
                await client.create(_create(echo_server))
        assert len(await _snapshot(a)) == 2
    finally:
        await a.appliance.stop()


async def test_entry_port_of_another_session_is_already_exists(facilities: Pair, echo_server: str) -> None:
    _, joined = await open_session(facilities, echo_server)
    taken = int(joined.entry_points[0].rsplit(":", 1)[1])
    a, b = facilities
    async with a.client() as producer:
        created = await producer.create(_create(echo_server))
    async with b.client() as consumer:
        with pytest.raises(AlreadyExists):
            await consumer.join(api.JoinSessionRequest(ticket=created.ticket, entry_ports=[taken]))
    # The failed join told the producer side, which freed its half.
    assert await _state(a, created.session.session_id) == api.State.RELEASED


# ---- the Peer service: proofs, nonces, replays -------------------------------------------------


async def _peer_channel(facility: Facility) -> Channel:
    return await open_channel(facility.address, Trust(ca_file=facility.ca_file))


async def _join_request(peer: api.PeerStub, ticket: tk.Ticket, secret: bytes) -> api.JoinRequest:
    challenge = await peer.challenge(api.ChallengeRequest(session_id=ticket.session_id))
    request = api.JoinRequest(
        session_id=ticket.session_id,
        client_nonce=tk.new_nonce(),
        server_nonce=challenge.server_nonce,
        consumer_session_id="c1",
        consumer_address="127.0.0.1:1",
        data_certificate=b"-----BEGIN CERTIFICATE-----\n",
    )
    request.proof = tk.mac(secret, tk.JOIN_LABEL, *join_transcript(request))
    return request


async def test_join_with_a_wrong_proof_is_permission_denied(facilities: Pair, echo_server: str) -> None:
    a, _ = facilities
    async with a.client() as client:
        ticket = tk.Ticket.decode((await client.create(_create(echo_server))).ticket)
    channel = await _peer_channel(a)
    try:
        peer = api.PeerStub(channel)
        request = await _join_request(peer, ticket, tk.new_secret())
        with pytest.raises(PermissionDenied):
            await call(peer.join(request))
    finally:
        channel.close()
    assert await _state(a, ticket.session_id) == api.State.PENDING


async def test_a_replayed_join_is_permission_denied(facilities: Pair, echo_server: str) -> None:
    a, _ = facilities
    async with a.client() as client:
        ticket = tk.Ticket.decode((await client.create(_create(echo_server))).ticket)
    channel = await _peer_channel(a)
    try:
        peer = api.PeerStub(channel)
        request = await _join_request(peer, ticket, ticket.secret)
        request.proof = b"\0" * 32  # a join that fails consumes its nonce ...
        with pytest.raises(PermissionDenied):
            await call(peer.join(request))
        request.proof = tk.mac(ticket.secret, tk.JOIN_LABEL, *join_transcript(request))
        with pytest.raises(PermissionDenied):  # ... so even a correct proof on it is refused
            await call(peer.join(request))
    finally:
        channel.close()
    assert await _state(a, ticket.session_id) == api.State.PENDING


async def test_challenge_for_unknown_session_is_not_found(facilities: Pair) -> None:
    channel = await _peer_channel(facilities[0])
    try:
        with pytest.raises(NotFound):
            await call(api.PeerStub(channel).challenge(api.ChallengeRequest(session_id="nope")))
    finally:
        channel.close()


async def test_leave_with_a_wrong_proof_is_permission_denied(facilities: Pair, echo_server: str) -> None:
    created, _ = await open_session(facilities, echo_server)
    session_id = created.session.session_id
    channel = await _peer_channel(facilities[0])
    try:
        request = api.LeaveRequest(
            session_id=session_id, nonce=tk.new_nonce(), timestamp=int(time.time()), proof=b"\1" * 32
        )
        with pytest.raises(PermissionDenied):
            await call(api.PeerStub(channel).leave(request))
    finally:
        channel.close()
    assert await _state(facilities[0], session_id) == api.State.ACTIVE
