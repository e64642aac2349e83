"""The SciStream 1.2.1 service (`scistream.Control`) between two in-process appliances, driven by a
grpclib client built from our copy of the 1.2.1 proto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from appliance.api import scistream as legacy
from appliance.control.channel import Trust, open_channel
from appliance.sessions.legacy import LegacyCoordinator, session_id_for
from appliance.sessions.manager import SYSTEM
from appliance.sessions.model import Side, State

from .conftest import Facility, echo_through, start_facility

Pair = tuple[Facility, Facility]
HELLO_TIMEOUT = 1.0


@asynccontextmanager
async def legacy_pair(
    tmp_path: Path, consumer: dict[str, Any] | None = None, **both: Any
) -> AsyncIterator[Pair]:
    """(producer side, consumer side) with Settings `both` (and `consumer` for B only); B reaches A's
    control port for 1.2.1 joins."""
    a = await start_facility(tmp_path, "a", **both)
    peer_port = int(a.address.rsplit(":", 1)[1])
    b = await start_facility(tmp_path, "b", legacy_peer_port=peer_port, **both, **(consumer or {}))
    try:
        yield a, b
    finally:
        await b.appliance.stop()
        await a.appliance.stop()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    async with legacy_pair(tmp_path, legacy_hello_timeout=HELLO_TIMEOUT) as facilities:
        yield facilities


@asynccontextmanager
async def client(f: Facility, authorization: str | None = "alice") -> AsyncIterator[legacy.ControlStub]:
    """A 1.2.1-style client: the token bare in `authorization` (a subject's token, or a literal value)."""
    channel = await open_channel(f.address, Trust(ca_file=f.ca_file))
    value = f.tokens.get(authorization or "", authorization)
    try:
        yield legacy.ControlStub(channel, timeout=15, metadata={"authorization": value} if value else None)
    finally:
        channel.close()


def coordinator(f: Facility) -> LegacyCoordinator:
    assert f.appliance.legacy is not None
    return f.appliance.legacy


async def request_with_hello(
    stub: legacy.ControlStub, uid: str, role: str, listeners: list[str], num_conn: int = 1
) -> legacy.Response:
    """req and hello concurrently, as s2uc sends them."""
    req = asyncio.create_task(stub.req(legacy.Request(uid=uid, role=role, num_conn=num_conn, rate=10000)))
    await stub.hello(legacy.Hello(uid=uid, prod_listeners=listeners, role="PROD"))
    return await req


async def inbound(f: Facility, uid: str, dest: str, num_conn: int = 1) -> list[str]:
    """s2uc inbound-request: returns the producer appliance's listeners."""
    async with client(f) as stub:
        answer = await request_with_hello(stub, uid, "PROD", [dest], num_conn)
        assert list(answer.prod_listeners) == [dest]
        await stub.update(legacy.UpdateTargets(uid=uid, remote_listeners=answer.prod_listeners, role="PROD"))
    return list(answer.listeners)


async def outbound(
    f: Facility,
    uid: str,
    producer_listeners: list[str],
    num_conn: int = 1,
    receivers: list[str] | None = None,
) -> list[str]:
    """s2uc outbound-request: returns the consumer appliance's listeners (entry points)."""
    async with client(f) as stub:
        answer = await request_with_hello(stub, uid, "CONS", receivers or [], num_conn)
        updated = await stub.update(
            legacy.UpdateTargets(uid=uid, remote_listeners=producer_listeners, role="CONS")
        )
    assert list(updated.listeners) == list(answer.listeners)
    return list(answer.listeners)


def state(f: Facility, uid: str, side: Side) -> State:
    assert f.appliance.manager is not None
    return f.appliance.manager.get(SYSTEM, session_id_for(uid, side)).state


async def status_of(call: object) -> Status:
    with pytest.raises(GRPCError) as caught:
        await call  # type: ignore[misc]
    return caught.value.status


async def test_inbound_then_outbound_carries_tcp_through_an_encrypted_session(
    pair: Pair, echo_server: str
) -> None:
    a, b = pair
    producer_listeners = await inbound(a, "uid-1", echo_server, num_conn=2)
    entry_points = await outbound(b, "uid-1", producer_listeners, num_conn=2)

    assert len(entry_points) == 2
    for entry_point in entry_points:
        assert await echo_through(entry_point, b"x" * 100_000) == b"x" * 100_000
    assert state(a, "uid-1", Side.PRODUCER) is State.ACTIVE
    assert state(b, "uid-1", Side.CONSUMER) is State.ACTIVE


async def test_producer_listeners_are_its_data_endpoints(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    listeners = await inbound(a, "uid-1", echo_server)
    assert a.appliance.manager is not None
    session = a.appliance.manager.get(SYSTEM, session_id_for("uid-1", Side.PRODUCER))
    assert listeners == [str(e) for e in session.data_endpoints]
    assert [str(d) for d in session.destinations] == [echo_server]


async def test_hello_before_req_answers_the_req_at_once(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    async with client(a) as stub:
        await stub.hello(legacy.Hello(uid="early", prod_listeners=[echo_server], role="PROD"))
        answer = await asyncio.wait_for(stub.req(legacy.Request(uid="early", role="PROD", num_conn=1)), 5)
    assert list(answer.prod_listeners) == [echo_server]
    assert len(answer.listeners) == 1


async def test_req_without_hello_times_out_with_a_clear_error_and_holds_nothing(pair: Pair) -> None:
    _, b = pair
    async with client(b) as stub:
        with pytest.raises(GRPCError) as caught:
            await stub.req(legacy.Request(uid="lonely", role="CONS", num_conn=3))
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert "no hello for uid lonely" in (caught.value.message or "")
    assert coordinator(b).pending_uids == []
    # The uid is free again.
    async with client(b) as stub:
        answer = await request_with_hello(stub, "lonely", "CONS", [], num_conn=3)
    assert len(answer.listeners) == 3


async def test_a_req_whose_client_goes_away_is_forgotten(pair: Pair) -> None:
    a, _ = pair
    async with client(a) as stub:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stub.req(legacy.Request(uid="gone", role="PROD")), 0.2)
    for _ in range(50):
        if not coordinator(a).pending_uids:
            break
        await asyncio.sleep(0.02)
    assert coordinator(a).pending_uids == []


async def test_an_early_hello_without_req_expires(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    async with client(a) as stub:
        await stub.hello(legacy.Hello(uid="orphan", prod_listeners=[echo_server]))
    assert coordinator(a).pending_uids == ["orphan"]
    await asyncio.sleep(HELLO_TIMEOUT + 0.3)
    assert coordinator(a).pending_uids == []


async def test_duplicate_uid_is_already_exists(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    async with client(a) as stub:
        waiting = asyncio.create_task(stub.req(legacy.Request(uid="dup", role="PROD")))
        await asyncio.sleep(0.1)
        assert await status_of(stub.req(legacy.Request(uid="dup", role="PROD"))) is Status.ALREADY_EXISTS
        await stub.hello(legacy.Hello(uid="dup", prod_listeners=[echo_server]))
        await waiting
        # Also once the session exists.
        assert await status_of(stub.req(legacy.Request(uid="dup", role="PROD"))) is Status.ALREADY_EXISTS
        hello = legacy.Hello(uid="dup", prod_listeners=[echo_server])
        assert await status_of(stub.hello(hello)) is Status.ALREADY_EXISTS


async def test_unknown_uid_is_not_found(pair: Pair) -> None:
    a, _ = pair
    async with client(a) as stub:
        update = legacy.UpdateTargets(uid="nope", remote_listeners=["127.0.0.1:1"], role="PROD")
        assert await status_of(stub.update(update)) is Status.NOT_FOUND
        assert await status_of(stub.release(legacy.Release(uid="nope"))) is Status.NOT_FOUND


async def test_two_concurrent_sessions_never_see_each_others_ports(pair: Pair, echo_server: str) -> None:
    a, b = pair
    one, two = await asyncio.gather(inbound(a, "one", echo_server), inbound(a, "two", echo_server))
    assert not set(one) & set(two)
    # Consumer "one" pointed at session two's listeners still joins session one: the uid decides.
    entry_one = await outbound(b, "one", two)
    entry_two = await outbound(b, "two", one)
    assert not set(entry_one) & set(entry_two)
    assert await echo_through(entry_one[0], b"one") == b"one"
    async with client(b) as stub:
        await stub.release(legacy.Release(uid="one"))
    assert state(a, "two", Side.PRODUCER) is State.ACTIVE
    assert await echo_through(entry_two[0], b"two") == b"two"


async def test_an_update_for_another_uid_cannot_bind_its_ports(pair: Pair, echo_server: str) -> None:
    a, b = pair
    listeners = await inbound(a, "mine", echo_server)
    async with client(b) as stub:
        await request_with_hello(stub, "mine", "CONS", [])
        # "theirs" has no completed request here: refused, and "mine" keeps its reservation.
        update = legacy.UpdateTargets(uid="theirs", remote_listeners=listeners, role="CONS")
        assert await status_of(stub.update(update)) is Status.NOT_FOUND
        await stub.update(legacy.UpdateTargets(uid="mine", remote_listeners=listeners, role="CONS"))
    assert state(b, "mine", Side.CONSUMER) is State.ACTIVE


async def test_consumer_receiver_ports_become_the_entry_points(pair: Pair, echo_server: str) -> None:
    a, b = pair
    wanted = b.port_range[1] - 1
    listeners = await inbound(a, "ports", echo_server)
    entry_points = await outbound(b, "ports", listeners, num_conn=2, receivers=[f"localhost:{wanted}"])
    assert entry_points[0] == f"127.0.0.1:{wanted}"
    assert len(entry_points) == 2
    assert await echo_through(entry_points[0], b"hi") == b"hi"


async def test_release_frees_both_sides_and_the_ports_are_reused(pair: Pair, echo_server: str) -> None:
    a, b = pair
    first = await outbound(b, "r1", await inbound(a, "r1", echo_server))
    async with client(b) as stub:
        response = await stub.release(legacy.Release(uid="r1"))
    assert list(response.listeners) == []
    assert state(b, "r1", Side.CONSUMER) is State.RELEASED
    for _ in range(50):
        if state(a, "r1", Side.PRODUCER) is State.RELEASED:
            break
        await asyncio.sleep(0.05)
    assert state(a, "r1", Side.PRODUCER) is State.RELEASED
    with pytest.raises(OSError):
        await echo_through(first[0], b"x")
    second = await outbound(b, "r2", await inbound(a, "r2", echo_server))
    assert second == first
    # Releasing an ended uid again is fine, and the uid may be used again.
    async with client(a) as stub:
        await stub.release(legacy.Release(uid="r1"))
    await inbound(a, "r1", echo_server)


async def test_release_ends_a_waiting_req(pair: Pair) -> None:
    a, _ = pair
    async with client(a) as stub:
        waiting = asyncio.create_task(stub.req(legacy.Request(uid="w", role="PROD")))
        await asyncio.sleep(0.1)
        await stub.release(legacy.Release(uid="w"))
        assert await status_of(waiting) is Status.FAILED_PRECONDITION
    assert coordinator(a).pending_uids == []


async def test_stopping_the_appliance_ends_waiting_reqs(tmp_path: Path) -> None:
    a = await start_facility(tmp_path, "a")
    try:
        async with client(a) as stub:
            waiting = asyncio.create_task(stub.req(legacy.Request(uid="w", role="PROD")))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(a.appliance.stop(), 5)
            assert await status_of(waiting) in (Status.UNAVAILABLE, Status.CANCELLED)
    finally:
        await a.appliance.stop()


async def test_producer_update_with_other_destinations_is_invalid_argument(
    pair: Pair, echo_server: str
) -> None:
    a, _ = pair
    await inbound(a, "d", echo_server)
    async with client(a) as stub:
        update = legacy.UpdateTargets(uid="d", remote_listeners=["127.0.0.1:9"], role="PROD")
        assert await status_of(stub.update(update)) is Status.INVALID_ARGUMENT


async def test_consumer_without_a_producer_session_fails_and_frees_its_reservation(
    pair: Pair, echo_server: str
) -> None:
    a, b = pair
    listeners = await inbound(a, "known", echo_server)
    async with client(b) as stub:
        first = await request_with_hello(stub, "unknown", "CONS", [])
        update = legacy.UpdateTargets(uid="unknown", remote_listeners=listeners, role="CONS")
        assert await status_of(stub.update(update)) is Status.NOT_FOUND
        again = await request_with_hello(stub, "again", "CONS", [])
    assert list(again.listeners) == list(first.listeners)
    assert coordinator(b).pending_uids == ["again"]


async def test_a_wrong_peer_ca_refuses_the_producer_appliance(tmp_path: Path, echo_server: str) -> None:
    wrong_ca = {"legacy_peer_ca": tmp_path / "b/tls/control.crt"}  # B's own certificate
    async with legacy_pair(tmp_path, consumer=wrong_ca) as (a, b):
        listeners = await inbound(a, "ca", echo_server)
        async with client(b) as stub:
            await request_with_hello(stub, "ca", "CONS", [])
            update = legacy.UpdateTargets(uid="ca", remote_listeners=listeners, role="CONS")
            assert await status_of(stub.update(update)) is Status.UNAVAILABLE
        assert state(a, "ca", Side.PRODUCER) is State.PENDING


async def test_the_right_peer_ca_admits_the_producer_appliance(tmp_path: Path, echo_server: str) -> None:
    right_ca = {"legacy_peer_ca": tmp_path / "a/tls/control.crt"}  # A's certificate
    async with legacy_pair(tmp_path, consumer=right_ca) as (a, b):
        entry_points = await outbound(b, "ca", await inbound(a, "ca", echo_server))
        assert await echo_through(entry_points[0], b"ok") == b"ok"


@pytest.mark.parametrize("authorization", ["INVALID_TOKEN", None, "not-a-token"])
async def test_calls_without_a_valid_token_are_unauthenticated(pair: Pair, authorization: str | None) -> None:
    a, _ = pair
    async with client(a, authorization) as stub:
        assert await status_of(stub.release(legacy.Release(uid="x"))) is Status.UNAUTHENTICATED


async def test_bearer_prefix_is_accepted_too(pair: Pair) -> None:
    a, _ = pair
    async with client(a, f"Bearer {a.tokens['alice']}") as stub:
        assert await status_of(stub.release(legacy.Release(uid="x"))) is Status.NOT_FOUND


async def test_another_users_uid_is_not_found(pair: Pair, echo_server: str) -> None:
    a, _ = pair
    await inbound(a, "alices", echo_server)
    async with client(a, "bob") as stub:
        assert await status_of(stub.release(legacy.Release(uid="alices"))) is Status.NOT_FOUND
        update = legacy.UpdateTargets(uid="alices", remote_listeners=[echo_server], role="PROD")
        assert await status_of(stub.update(update)) is Status.NOT_FOUND


async def test_a_malformed_prod_listener_is_invalid_argument(pair: Pair) -> None:
    a, _ = pair
    async with client(a) as stub:
        hello = legacy.Hello(uid="bad", prod_listeners=["no-port"], role="PROD")
        assert await status_of(stub.hello(hello)) is Status.INVALID_ARGUMENT
    assert coordinator(a).pending_uids == []


async def test_the_legacy_mode_setting_chooses_the_data_plane(tmp_path: Path, echo_server: str) -> None:
    async with legacy_pair(tmp_path, legacy_mode="quic") as (a, b):  # not the default (tls)
        entry_points = await outbound(b, "t", await inbound(a, "t", echo_server))
        assert await echo_through(entry_points[0], b"over quic") == b"over quic"
        assert a.appliance.manager is not None
        session = a.appliance.manager.get(SYSTEM, session_id_for("t", Side.PRODUCER))
        assert session.mode.value == "quic"


async def test_1_2_1_sessions_are_tls_over_tcp_by_default(pair: Pair, echo_server: str) -> None:
    a, b = pair
    await outbound(b, "d", await inbound(a, "d", echo_server))
    for f, side in ((a, Side.PRODUCER), (b, Side.CONSUMER)):
        assert f.appliance.manager is not None
        assert f.appliance.manager.get(SYSTEM, session_id_for("d", side)).mode.value == "tls"


async def _wait_pending(f: Facility, uids: list[str]) -> None:
    for _ in range(100):
        if coordinator(f).pending_uids == uids:
            return
        await asyncio.sleep(0.02)
    assert coordinator(f).pending_uids == uids


@pytest.mark.parametrize(
    ("limits", "why"),
    [
        ({"legacy_max_pending_per_client": 2}, "from 127.0.0.1"),
        ({"legacy_max_pending_per_client": 10, "legacy_max_pending": 2}, "on this appliance"),
    ],
)
async def test_uids_waiting_for_their_next_call_are_bounded_per_client_and_in_all(
    tmp_path: Path, echo_server: str, limits: dict[str, int], why: str
) -> None:
    async with legacy_pair(tmp_path, legacy_hello_timeout=60, **limits) as (a, _), client(a) as stub:
        requests = [legacy.Request(uid=u, role="PROD") for u in ("w0", "w1")]
        waiting = [asyncio.create_task(stub.req(r)) for r in requests]
        await _wait_pending(a, ["w0", "w1"])

        with pytest.raises(GRPCError) as caught:
            await stub.req(legacy.Request(uid="w2", role="PROD"))
        assert caught.value.status is Status.RESOURCE_EXHAUSTED
        assert why in (caught.value.message or "")
        early = legacy.Hello(uid="w3", prod_listeners=[echo_server])
        assert await status_of(stub.hello(early)) is Status.RESOURCE_EXHAUSTED
        assert coordinator(a).pending_uids == ["w0", "w1"]

        # The hello a waiting req needs is never refused, and its answer frees the place.
        await stub.hello(legacy.Hello(uid="w0", prod_listeners=[echo_server]))
        assert len((await waiting[0]).listeners) == 1
        answer = await request_with_hello(stub, "w2", "PROD", [echo_server])
        assert len(answer.listeners) == 1
        waiting[1].cancel()
