"""The edge of the control port: every request body is read, bounded and checked here, for every
service on the port (ours, the 1.2.1 one, health, reflection), before a handler sees it.

Why here and not in grpclib: grpclib reads a body inside `Stream.recv_message` and answers UNKNOWN
for whatever goes wrong there (a short body, a compressed flag, bytes that do not parse), and it
buffers whatever length the 5-byte prefix claims. betterproto accepts a field sent with the wrong wire
type and hands the handler an int, bytes or None where it declared a str. All of that is bad input:
INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a body over MAX_MESSAGE_BYTES, refused before it is read.
Every string, bytes and repeated field is bounded too (`_LIMITS`), so nothing downstream, an error
message included, ever handles an unbounded value.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

import betterproto
import structlog
from grpclib.const import Handler
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from appliance.errors import ApplianceError, Internal, InvalidArgument, ResourceExhausted, to_grpc
from appliance.sessions.manager import MAX_NUM_CONN

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
"""The largest request body accepted (our largest real one, a Join with its certificate, is ~2 KB)."""

MAX_TEXT = 1024
"""Default bound of a string or bytes field, in bytes."""

MAX_ITEMS = MAX_NUM_CONN
"""Bound of a repeated field, in items: one per connection at most (TLS mode has a data endpoint per
connection, and 1.2.1's listeners follow them), and connections are at most MAX_NUM_CONN."""

# Fields whose bound differs from MAX_TEXT, by name (the same name means the same thing in every message).
_LIMITS: dict[str, int] = {
    "session_id": 128,
    "consumer_session_id": 128,
    "uid": 128,
    "ticket": 4096,
    "data_certificate": 16 * 1024,
    "destinations": 16 * 1024,  # one item may list several, comma-separated
    "reason": 4096,  # a Leave's reason, which quotes an error of the peer appliance
}

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5
_WIRE_OF: dict[str, int] = {
    **{t: _WIRE_VARINT for t in betterproto.WIRE_VARINT_TYPES},
    **{t: _WIRE_FIXED32 for t in betterproto.WIRE_FIXED_32_TYPES},
    **{t: _WIRE_FIXED64 for t in betterproto.WIRE_FIXED_64_TYPES},
    **{t: _WIRE_LEN for t in betterproto.WIRE_LEN_DELIM_TYPES},
}
_U32, _U64 = 1 << 32, 1 << 64
_MAX_DEPTH = 16


class Malformed(InvalidArgument):
    def __init__(self, what: str) -> None:
        super().__init__(f"malformed request: {what}")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= _U64:
                raise Malformed("varint over 64 bits")
            return value, pos
    raise Malformed("varint over 10 bytes")


def _fields(data: bytes) -> Any:
    """(number, wire type, value) of each field: an int for varints, bytes otherwise; strict about
    lengths and wire types, unlike betterproto's reader."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Malformed("field number 0")
        value: int | bytes
        if wire == _WIRE_VARINT:
            value, pos = _varint(data, pos)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32, _WIRE_LEN):
            size = 8 if wire == _WIRE_FIXED64 else 4 if wire == _WIRE_FIXED32 else None
            if size is None:
                size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise Malformed(f"field {number} is truncated")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise Malformed(f"field {number} has wire type {wire} (groups are not supported)")
        yield number, wire, value


def _check_varint(name: str, proto_type: str, value: int) -> None:
    # int32 and enums: negative values travel sign-extended to 64 bits.
    if proto_type in (betterproto.TYPE_UINT32, betterproto.TYPE_FIXED32) and value >= _U32:
        raise Malformed(f"{name} is over 32 bits")
    signed = proto_type in (betterproto.TYPE_INT32, betterproto.TYPE_ENUM)
    if signed and _U32 // 2 <= value < _U64 - _U32 // 2:
        raise Malformed(f"{name} is over 32 bits")


def _check_packed(name: str, proto_type: str, payload: bytes) -> int:
    """Checks a packed repeated scalar; returns how many items it holds."""
    wire = _WIRE_OF[proto_type]
    if wire != _WIRE_VARINT:
        size = 4 if wire == _WIRE_FIXED32 else 8
        if len(payload) % size:
            raise Malformed(f"{name} is truncated")
        return len(payload) // size
    pos = count = 0
    while pos < len(payload):
        value, pos = _varint(payload, pos)
        _check_varint(name, proto_type, value)
        count += 1
    return count


def check_wire(data: bytes, cls: type[betterproto.Message], depth: int = 0, *, bounded: bool = True) -> None:
    """Raises InvalidArgument unless `data` is a well-formed `cls` whose known fields carry the wire
    types the schema declares and (with `bounded`) whose strings, bytes and lists are within bounds."""
    if depth > _MAX_DEPTH:
        raise Malformed("nested too deep")
    meta: Any = cls._betterproto  # type: ignore[arg-type]  # betterproto's classproperty is mistyped
    counts: dict[str, int] = {}
    for number, wire, value in _fields(data):
        name = meta.field_name_by_number.get(number)
        if name is None:
            continue  # an unknown field is skipped, as protobuf does
        proto_type = meta.meta_by_field_name[name].proto_type
        expected = _WIRE_OF.get(proto_type)
        if isinstance(value, int):
            if wire != expected:
                raise Malformed(f"{name} has the wrong wire type")
            _check_varint(name, proto_type, value)
            items = 1
        elif wire != expected:
            # A packed list is a repeated field's only other form; betterproto would also unpack one
            # into a single-valued field and hand the handler a list where it declared an int.
            repeated = isinstance(meta.default_gen[name](), list)
            if wire != _WIRE_LEN or proto_type not in betterproto.PACKED_TYPES or not repeated:
                raise Malformed(f"{name} has the wrong wire type")
            items = _check_packed(name, proto_type, value)
        else:
            items = 1
            if bounded and proto_type in (betterproto.TYPE_STRING, betterproto.TYPE_BYTES):
                limit = _LIMITS.get(name, MAX_TEXT)
                if len(value) > limit:
                    raise InvalidArgument(f"{name} is {len(value)} bytes; at most {limit} are accepted")
            elif proto_type == betterproto.TYPE_MESSAGE:
                nested = meta.cls_by_field[name]
                if isinstance(nested, type) and issubclass(nested, betterproto.Message):
                    check_wire(value, nested, depth + 1, bounded=bounded)
        counts[name] = counts.get(name, 0) + items
        if bounded and counts[name] > MAX_ITEMS:
            raise InvalidArgument(f"{name} has more than {MAX_ITEMS} items")


def decode(data: bytes, cls: type[Any], *, bounded: bool = True) -> Any:
    """A message from its body; InvalidArgument for anything that is not a valid `cls`. Requests are
    `bounded`; answers from other appliances are checked for their wire types only."""
    if isinstance(cls, type) and issubclass(cls, betterproto.Message):
        check_wire(data, cls, bounded=bounded)
    try:
        return cls.FromString(data)
    except Exception:  # whatever the parser raises, the cause is the bytes we were sent
        raise Malformed(f"the body is not a {cls.__name__}") from None


class BoundedStream:
    """A grpclib server stream whose `recv_message` reads through `decode`, bounded in size.

    It reads the length prefix itself, so an oversize body is refused before it is buffered; that
    needs grpclib's private stream attributes (`_stream`, `_codec` is not used: bodies are decoded
    by `decode`), and tests/service/test_hostile_input.py fails if a grpclib release moves them.
    """

    def __init__(self, stream: Stream[Any, Any], *, unary: bool) -> None:
        self._inner = stream
        self._unary = unary

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __aiter__(self) -> BoundedStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def recv_message(self) -> Any:
        inner = self._inner
        data = await self._read_body()
        if data is None:
            if self._unary:
                raise InvalidArgument("malformed request: no message")
            return None
        message = decode(data, inner._recv_type)
        (message,) = await inner._dispatch.recv_message(message)
        inner._messages_received += 1
        inner._stream.connection.messages_received += 1
        inner._stream.connection.last_message_received = time.monotonic()
        return message

    async def _read_body(self) -> bytes | None:
        h2_stream = self._inner._stream
        try:
            prefix = await h2_stream.recv_data(5)
            if not prefix:
                return None
            compressed, length = struct.unpack(">BI", prefix)
            if compressed:
                raise InvalidArgument("compressed requests are not supported")
            if length > MAX_MESSAGE_BYTES:
                raise ResourceExhausted(
                    f"the request is {length} bytes; at most {MAX_MESSAGE_BYTES} are accepted"
                )
            data: bytes = await h2_stream.recv_data(length)
        except (AssertionError, struct.error):
            # grpclib's buffer asserts when the stream ends before the length it was promised.
            raise Malformed("the body is shorter than its length prefix") from None
        return data


StreamHandler = Callable[[Any], Coroutine[Any, Any, None]]


def _guarded(func: StreamHandler, *, unary: bool, method: str) -> StreamHandler:
    async def handler(stream: Stream[Any, Any]) -> None:
        try:
            await func(BoundedStream(stream, unary=unary))
        except ApplianceError as exc:
            raise to_grpc(exc) from None
        except (GRPCError, StreamTerminatedError, TimeoutError):
            raise  # grpclib's own: a status already, a reset by the client, a deadline
        except Exception:
            # A bug, not bad input: logged with its traceback, answered INTERNAL (never UNKNOWN).
            log.exception("unexpected error", method=method)
            raise to_grpc(Internal("internal error (see the appliance log)")) from None

    return handler


class GuardedService:
    """A service whose every method reads its request through BoundedStream and maps our errors."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            name: Handler(
                _guarded(h.func, unary=not h.cardinality.client_streaming, method=name),
                h.cardinality,
                h.request_type,
                h.reply_type,
            )
            for name, h in self._service.__mapping__().items()
        }


def guard(services: Collection[Any]) -> list[GuardedService]:
    """`services` (anything with grpclib's `__mapping__`), each behind the edge."""
    return [GuardedService(s) for s in services]
