"""Fuzzing every gRPC method on the control port (scistream.v1.Control and Peer, the 1.2.1
scistream.Control, grpc.health.v1.Health, server reflection) and tickets: bad input is answered with
a clear status, never UNKNOWN or INTERNAL, and the appliance keeps serving."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import betterproto
import pytest
from grpclib.const import Status
from grpclib.health.service import Health
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest
from hypothesis import given
from hypothesis import strategies as st

from appliance.api import scistream as legacy
from appliance.api.scistream import v1 as api
from appliance.control import edge
from appliance.control.legacy import LegacyControlService
from appliance.control.services import ControlService, PeerService
from appliance.errors import MAX_STATUS_MESSAGE
from appliance.sessions import ticket as tk
from tests.service.test_hostile_input import field, varint

from .harness import FORBIDDEN, World

REFUSED = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}

# (method, request type, answers with a stream)
METHODS: list[tuple[str, type[Any], bool]] = [
    ("/scistream.v1.Control/CreateSession", api.CreateSessionRequest, False),
    ("/scistream.v1.Control/JoinSession", api.JoinSessionRequest, False),
    ("/scistream.v1.Control/ReleaseSession", api.ReleaseSessionRequest, False),
    ("/scistream.v1.Control/GetSession", api.GetSessionRequest, False),
    ("/scistream.v1.Control/ListSessions", api.ListSessionsRequest, False),
    ("/scistream.v1.Control/WatchSession", api.WatchSessionRequest, True),
    ("/scistream.v1.Peer/Challenge", api.ChallengeRequest, False),
    ("/scistream.v1.Peer/Join", api.JoinRequest, False),
    ("/scistream.v1.Peer/Leave", api.LeaveRequest, False),
    ("/scistream.Control/req", legacy.Request, False),
    ("/scistream.Control/hello", legacy.Hello, False),
    ("/scistream.Control/update", legacy.UpdateTargets, False),
    ("/scistream.Control/release", legacy.Release, False),
    ("/grpc.health.v1.Health/Check", HealthCheckRequest, False),
    ("/grpc.health.v1.Health/Watch", HealthCheckRequest, True),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", ServerReflectionRequest, True),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ServerReflectionRequest, True),
]
BETTERPROTO = [m for m in METHODS if issubclass(m[1], betterproto.Message)]
WITH_FIELDS = [m for m in BETTERPROTO if m[1]._betterproto.meta_by_field_name]
STREAMING = {name for name, _, streaming in METHODS if streaming}
# A deadline is a fine answer where a valid-looking request legitimately waits (a 1.2.1 req for its hello).
WAITS = {"/scistream.Control/req"}


def test_every_method_on_the_control_port_is_fuzzed() -> None:
    services = [ControlService(None), PeerService(None), LegacyControlService(None), Health()]  # type: ignore[arg-type]
    served = {name for s in ServerReflection.extend(services) for name in s.__mapping__()}
    assert served == {name for name, _, _ in METHODS}


def check(world: World, method: str, body: bytes, **kw: Any) -> Status:
    answer = world.call(world.a, method, body, streaming=method in STREAMING, **kw)
    assert answer.status not in FORBIDDEN, (method, answer)
    assert answer.status is not Status.UNAVAILABLE, (method, answer)
    if answer.status is Status.DEADLINE_EXCEEDED:
        assert method in WAITS, (method, answer)
    assert len(answer.message) <= MAX_STATUS_MESSAGE + 10
    assert world.a.alive()
    return answer.status


@given(method=st.sampled_from([m[0] for m in METHODS]), body=st.binary(max_size=600))
def test_random_bodies_get_a_clear_status(world: World, method: str, body: bytes) -> None:
    check(world, method, body)


@given(
    method=st.sampled_from([m[0] for m in METHODS]),
    body=st.binary(max_size=64),
    compressed=st.booleans(),
    lie=st.integers(-8, 1 << 32),
)
def test_random_frames_get_a_clear_status(
    world: World, method: str, body: bytes, compressed: bool, lie: int
) -> None:
    """The 5-byte prefix lies: compressed flag, a length longer or shorter than the body."""
    length = min(max(len(body) + lie, 0), (1 << 32) - 1)
    frame = bytes([int(compressed)]) + length.to_bytes(4, "big") + body
    check(world, method, frame[: 5 + len(body)], framed=True)


def _expected_wire(proto_type: str) -> int:
    return edge._WIRE_OF[proto_type]


@st.composite
def wrong_wire_type(draw: st.DrawFn, cls: type[betterproto.Message]) -> bytes:
    """A valid-looking body in which one known field travels with a wire type its schema forbids."""
    meta: Any = cls._betterproto  # type: ignore[arg-type]
    name = draw(st.sampled_from(sorted(meta.meta_by_field_name)))
    info = meta.meta_by_field_name[name]
    repeated = isinstance(meta.default_gen[name](), list)
    expected = _expected_wire(info.proto_type)
    packed_ok = repeated and info.proto_type in betterproto.PACKED_TYPES
    wire = draw(st.sampled_from([w for w in range(8) if w != expected and not (w == 2 and packed_ok)]))
    if wire == 0:
        payload = varint(draw(st.integers(0, (1 << 64) - 1)))
    elif wire == 1:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif wire == 5:
        payload = draw(st.binary(min_size=4, max_size=4))
    elif wire == 2:
        data = draw(st.binary(max_size=40))
        payload = varint(len(data)) + data
    else:
        payload = b""  # group start/end and the unused wire types carry nothing we could skip
    before, after = draw(st.binary(max_size=0)), draw(st.sampled_from([b"", b"\x0a\x00"]))
    return before + field(info.number, wire, payload) + after


@pytest.mark.parametrize(("method", "cls", "streaming"), WITH_FIELDS, ids=[m[0] for m in WITH_FIELDS])
def test_wrong_wire_types_are_invalid_argument(world: World, method: str, cls: Any, streaming: bool) -> None:
    @given(body=wrong_wire_type(cls))
    def run(body: bytes) -> None:
        answer = world.call(world.a, method, body, streaming=streaming)
        assert answer.status is Status.INVALID_ARGUMENT, (method, body, answer)

    run()


@st.composite
def oversize_field(draw: st.DrawFn, cls: type[betterproto.Message]) -> bytes:
    """A body with one string or bytes field over its bound, or one repeated field over MAX_ITEMS."""
    meta: Any = cls._betterproto  # type: ignore[arg-type]
    names = [
        n
        for n, info in meta.meta_by_field_name.items()
        if info.proto_type in (betterproto.TYPE_STRING, betterproto.TYPE_BYTES)
        or isinstance(meta.default_gen[n](), list)
    ]
    name = draw(st.sampled_from(sorted(names)))
    info = meta.meta_by_field_name[name]
    if isinstance(meta.default_gen[name](), list):
        count = draw(st.integers(edge.MAX_ITEMS + 1, edge.MAX_ITEMS * 40))
        if _expected_wire(info.proto_type) == 0:
            return field(info.number, 0, b"\x01") * count
        return field(info.number, 2, varint(0)) * count
    limit = edge._LIMITS.get(name, edge.MAX_TEXT)
    size = draw(st.one_of(st.integers(limit + 1, limit + 64), st.integers(limit + 1, 1_200_000)))
    return field(info.number, 2, varint(size) + b"x" * size)


@given(data=st.data())
def test_oversize_fields_are_refused_without_echo(world: World, data: st.DataObject) -> None:
    method, cls, streaming = data.draw(st.sampled_from(BETTERPROTO))
    if not any(
        i.proto_type in (betterproto.TYPE_STRING, betterproto.TYPE_BYTES)
        for i in cls._betterproto.meta_by_field_name.values()
    ):
        return
    body = data.draw(oversize_field(cls))
    answer = world.call(world.a, method, body, streaming=streaming)
    assert answer.status in REFUSED, (method, len(body), answer)
    assert len(answer.message) <= MAX_STATUS_MESSAGE and "xxxxxxxxxx" not in answer.message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def mutated_ticket(draw: st.DrawFn, ticket: str) -> str:
    """A real ticket with bytes flipped, cut or inserted, or re-signed around a mutated payload (so it
    passes the check sum and reaches the field checks)."""
    kind = draw(st.sampled_from(["flip", "cut", "insert", "resign", "garbage"]))
    if kind == "flip":
        i = draw(st.integers(0, len(ticket) - 1))
        return ticket[:i] + draw(st.characters(codec="ascii")) + ticket[i + 1 :]
    if kind == "cut":
        i, j = sorted(draw(st.lists(st.integers(0, len(ticket)), min_size=2, max_size=2)))
        return ticket[:i] + ticket[j:]
    if kind == "insert":
        i = draw(st.integers(0, len(ticket)))
        return ticket[:i] + draw(st.text(max_size=20)) + ticket[i:]
    if kind == "garbage":
        return draw(st.text(max_size=300))
    prefix, payload, _ = ticket.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    values = st.one_of(
        st.text(max_size=40),
        st.integers(),
        st.none(),
        st.lists(st.integers(), max_size=3),
        st.sampled_from(["quic", "tls", "wireguard", "auto", "udp", "tcp", "127.0.0.1:1", "[::1]:1"]),
    )
    key = draw(st.sampled_from([*sorted(fields), "extra"]))
    if draw(st.booleans()):
        fields[key] = draw(values)
    else:
        fields.pop(key, None)
    raw = json.dumps(fields).encode() if draw(st.booleans()) else draw(st.binary(max_size=80))
    return f"{prefix}.{_b64(raw)}.{_b64(hashlib.sha256(raw).digest()[: tk._CHECK_BYTES])}"


@given(data=st.data())
def test_mutated_tickets_get_a_clear_status(world: World, data: st.DataObject) -> None:
    ticket = data.draw(mutated_ticket(world.pending_ticket))
    body = api.JoinSessionRequest(ticket=ticket).SerializeToString()
    answer = world.call(world.b, "/scistream.v1.Control/JoinSession", body)
    assert answer.status not in FORBIDDEN, (ticket, answer)
    assert world.b.alive() and world.a.alive()


_INTS = {
    betterproto.TYPE_UINT32: st.integers(0, (1 << 32) - 1),
    betterproto.TYPE_UINT64: st.integers(0, (1 << 64) - 1),
    betterproto.TYPE_INT32: st.integers(-(1 << 31), (1 << 31) - 1),
    betterproto.TYPE_INT64: st.integers(-(1 << 63), (1 << 63) - 1),
    betterproto.TYPE_ENUM: st.integers(-(1 << 31), (1 << 31) - 1),
}
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["127.0.0.1:9", "[::1]:9", "localhost:9", "PROD", "prod", "", " ", "a" * 128]),
    st.uuids().map(str),
)
# Modes whose sessions the fuzzer may create: WireGuard (and auto, which may pick it) starts wireguard-go
# processes per session, which is the chaos suite's business, not this one's.
_MODES = st.sampled_from([0, int(api.Mode.QUIC), int(api.Mode.TLS), 99])


def well_typed(cls: type[betterproto.Message], depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `cls` with every field of its declared type and random values: what gets past the
    edge and reaches the handlers' own checks."""
    meta: Any = cls._betterproto  # type: ignore[arg-type]
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in meta.meta_by_field_name.items():
        value: st.SearchStrategy[Any]
        if name == "mode":
            value = _MODES
        elif info.proto_type == betterproto.TYPE_STRING:
            value = _TEXT
        elif info.proto_type == betterproto.TYPE_BYTES:
            value = st.binary(max_size=64)
        elif info.proto_type == betterproto.TYPE_BOOL:
            value = st.booleans()
        elif info.proto_type in _INTS:
            value = _INTS[info.proto_type]
        elif info.proto_type == betterproto.TYPE_MESSAGE and depth < 3:
            value = well_typed(meta.cls_by_field[name], depth + 1)
        else:
            continue
        fields[name] = st.lists(value, max_size=4) if isinstance(meta.default_gen[name](), list) else value
    return st.builds(cls, **fields)


@given(data=st.data())
def test_well_typed_random_requests_get_a_clear_status(world: World, data: st.DataObject) -> None:
    method, cls, _ = data.draw(st.sampled_from(BETTERPROTO))
    message = data.draw(well_typed(cls))
    check(world, method, bytes(message))
