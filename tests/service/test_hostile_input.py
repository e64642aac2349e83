"""Hostile input at the control port: every body that does not decode, every wrong wire type and every
oversize field is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a body over the size limit), answered
without echoing it, never UNKNOWN or INTERNAL, and the appliance keeps serving meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from appliance.api.scistream import v1 as api

from .conftest import Facility, start_facility
from .rawgrpc import Answer, frame, open_raw_channel, raw_call

REFUSED = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}

CHALLENGE = "/scistream.v1.Peer/Challenge"
JOIN = "/scistream.v1.Peer/Join"
LEAVE = "/scistream.v1.Peer/Leave"
CREATE = "/scistream.v1.Control/CreateSession"
JOIN_SESSION = "/scistream.v1.Control/JoinSession"
GET = "/scistream.v1.Control/GetSession"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LEGACY_REQ = "/scistream.Control/req"
LEGACY_HELLO = "/scistream.Control/hello"
LEGACY_RELEASE = "/scistream.Control/release"

EVERY_METHOD = [
    CHALLENGE,
    JOIN,
    LEAVE,
    CREATE,
    JOIN_SESSION,
    GET,
    HEALTH,
    REFLECTION,
    LEGACY_REQ,
    LEGACY_HELLO,
]


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    return varint(number << 3 | wire_type) + payload


@pytest.fixture
async def facility(tmp_path: Path) -> AsyncIterator[Facility]:
    a = await start_facility(tmp_path, "a")
    try:
        yield a
    finally:
        await a.appliance.stop()


async def call(
    facility: Facility, method: str, body: bytes, *, framed: bool = False, user: str | None = "alice"
) -> Answer:
    channel = open_raw_channel(facility.address, facility.ca_file)
    token = facility.tokens[user] if user else None
    try:
        return await raw_call(channel, method, body, token=token, framed=framed)
    finally:
        channel.close()


async def serving(facility: Facility) -> bool:
    async with facility.client() as client:
        return await client.serving()


async def test_a_megabyte_session_id_is_refused_without_echo_while_health_keeps_serving(
    facility: Facility,
) -> None:
    huge = api.ChallengeRequest(session_id="x" * 1_000_000).SerializeToString()
    # Unauthenticated, as an attacker on the network would send it (the Peer service needs no token).
    answer, healthy = await asyncio.gather(call(facility, CHALLENGE, huge, user=None), serving(facility))
    assert answer.status in REFUSED, answer.status
    assert len(answer.message) < 1000 and "xxxxxxxxxx" not in answer.message
    assert healthy and await serving(facility)


async def test_an_oversize_id_under_the_message_limit_is_invalid_argument_and_not_echoed(
    facility: Facility,
) -> None:
    body = api.GetSessionRequest(session_id="y" * 60_000).SerializeToString()
    answer = await call(facility, GET, body)
    assert answer.status is Status.INVALID_ARGUMENT, answer
    assert "yyyyyyyyyy" not in answer.message


@pytest.mark.parametrize("method", EVERY_METHOD)
async def test_a_body_that_does_not_decode_is_invalid_argument(facility: Facility, method: str) -> None:
    # Field 1, length-delimited, two bytes that are not UTF-8 (every request's field 1 is a string).
    answer = await call(facility, method, field(1, 2, b"\x02\xff\xfe"))
    assert answer.status is Status.INVALID_ARGUMENT, answer
    assert await serving(facility)


@pytest.mark.parametrize(
    ("what", "request_frame"),
    [
        ("truncated", frame(b"\x0a\x01a", length=100)),
        ("compressed", frame(b"\x0a\x01a", compressed=True)),
        ("no message", b""),
        ("half a prefix", b"\x00\x00"),
    ],
)
@pytest.mark.parametrize("method", [HEALTH, CHALLENGE, CREATE, LEGACY_RELEASE])
async def test_a_malformed_frame_is_invalid_argument(
    facility: Facility, method: str, what: str, request_frame: bytes
) -> None:
    answer = await call(facility, method, request_frame, framed=True)
    assert answer.status is Status.INVALID_ARGUMENT, (what, answer)


@pytest.mark.parametrize(
    ("method", "body"),
    [
        # destinations sent as a varint: 'int' object has no attribute 'split'
        (CREATE, field(1, 0, varint(5))),
        # the ticket as a group start: betterproto hands the handler None
        (JOIN_SESSION, field(1, 3)),
        # the 1.2.1 uid as a group start
        (LEGACY_REQ, field(1, 3)),
        (LEGACY_HELLO, field(1, 3)),
        # a session id as a 64-bit varint: OverflowError inside SQLite
        (LEAVE, field(1, 0, varint(2**64 - 1))),
        # a uint32 field carrying more than 32 bits
        (CREATE, field(1, 2, b"\x0b127.0.0.1:9") + field(6, 0, varint(2**64 - 1))),
        # a string field as a fixed64
        (CHALLENGE, field(1, 1, b"\x00" * 8)),
        # a single uint32 sent as a packed list: betterproto would make num_conn a list
        (CREATE, field(1, 2, b"\x0b127.0.0.1:9") + field(4, 2, b"\x02\x01\x02")),
    ],
    ids=[
        "dest-varint",
        "ticket-group",
        "uid-group",
        "hello-uid-group",
        "leave-id-huge",
        "ttl-64bit",
        "id-fixed",
        "packed-num-conn",
    ],
)
async def test_a_wrong_wire_type_is_invalid_argument_and_changes_nothing(
    facility: Facility, method: str, body: bytes
) -> None:
    answer = await call(facility, method, body)
    assert answer.status is Status.INVALID_ARGUMENT, answer
    async with facility.client("root") as admin:
        assert await admin.list() == []


async def test_too_many_destinations_are_invalid_argument(facility: Facility) -> None:
    body = api.CreateSessionRequest(destinations=[f"10.0.0.1:{p}" for p in range(1, 302)]).SerializeToString()
    answer = await call(facility, CREATE, body)
    assert answer.status is Status.INVALID_ARGUMENT, answer
    many = api.CreateSessionRequest(destinations=["10.0.0.1:80"] * 10_000).SerializeToString()
    assert (await call(facility, CREATE, many)).status in REFUSED


async def test_health_still_answers_serving_after_hostile_calls(facility: Facility) -> None:
    for method in EVERY_METHOD:
        await call(facility, method, b"\xff" * 64)
    channel = open_raw_channel(facility.address, facility.ca_file)
    try:
        answer = await raw_call(channel, HEALTH, HealthCheckRequest().SerializeToString())
    finally:
        channel.close()
    assert answer.status is Status.OK
    assert await serving(facility)
