"""Sans-I/O wire format of the TLS relay (no sockets, no clock: bytes in, values out).

After the TLS handshake the consumer side sends a connection header: magic byte, kind (TCP or UDP),
destination index (QUIC varint). Then:
- TCP: both directions are frames of a 4-byte big-endian length and that many payload bytes. A frame
  of length 0 is end-of-stream (the sender half-closed); asyncio's TLS transports cannot half-close,
  so end-of-stream travels in band.
- UDP: both directions are datagram frames: flow id (4 bytes), payload length (2 bytes), payload.
  A flow is one client address at the consumer side's entry point, one UDP socket at the producer side.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from quic_relay.framing import decode_varint, encode_varint

ALPN = "scistream-tls/1"
MAGIC = 0x54  # "T": TLS relay connection, version 1
MAX_FRAME = 1 << 20  # largest TCP frame payload; senders split larger chunks
MAX_DATAGRAM = 65527
MAX_FLOW_ID = (1 << 32) - 1
MAX_HEADER_SIZE = 2 + 8

_LENGTH = struct.Struct("!I")
_DATAGRAM = struct.Struct("!IH")
END_OF_STREAM = _LENGTH.pack(0)


class WireError(Exception):
    """Bytes that cannot come from our peer: the connection is closed."""


class Kind(enum.IntEnum):
    TCP = 0
    UDP = 1


@dataclass(frozen=True)
class Header:
    kind: Kind
    dest_index: int


def encode_header(kind: Kind, dest_index: int) -> bytes:
    return bytes((MAGIC, kind)) + encode_varint(dest_index)


def decode_header(data: bytes | bytearray) -> tuple[Header, int] | None:
    """(header, its size) from the start of `data`; None if more bytes are needed; WireError if not ours."""
    if not data:
        return None
    if data[0] != MAGIC:
        raise WireError(f"bad connection header magic 0x{data[0]:02x}")
    if len(data) < 2:
        return None
    try:
        kind = Kind(data[1])
    except ValueError:
        raise WireError(f"unknown connection kind {data[1]}") from None
    parsed = decode_varint(data, 2)
    if parsed is None:
        return None
    dest_index, end = parsed
    return Header(kind, dest_index), end


FRAME_HEADER_SIZE = _LENGTH.size


def put_frame_header(buffer: bytearray, payload_size: int) -> None:
    """Writes the length prefix of a frame whose payload already sits at `buffer[FRAME_HEADER_SIZE:]`,
    so header and payload leave in one write without a copy."""
    if payload_size > MAX_FRAME:
        raise WireError(f"frame of {payload_size} bytes exceeds {MAX_FRAME}")
    _LENGTH.pack_into(buffer, 0, payload_size)


def frame_chunks(data: bytes) -> list[bytes | memoryview]:
    """The frames carrying `data` (length prefix, payload, ...) as pieces for `writelines`."""
    if len(data) <= MAX_FRAME:
        return [_LENGTH.pack(len(data)), data]
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    for start in range(0, len(data), MAX_FRAME):
        part = view[start : start + MAX_FRAME]
        pieces += [_LENGTH.pack(len(part)), part]
    return pieces


class StreamDecoder:
    """TCP frames to payload pieces. Whole chunks inside a frame pass through without a copy."""

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to come
        self._prefix = bytearray()  # a length prefix split across chunks
        self.ended = False  # end-of-stream frame seen

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """Payload pieces in `data` (views of it: valid as long as `data` is); WireError on data after
        end-of-stream or an oversized frame."""
        if self._remaining >= len(data) and data:
            self._remaining -= len(data)
            return [data]
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                out.append(view[pos : pos + take])
                self._remaining -= take
                pos += take
                continue
            if self.ended:
                raise WireError("data after end-of-stream")
            need = 4 - len(self._prefix)
            self._prefix += view[pos : pos + need]
            pos += min(need, size - pos)
            if len(self._prefix) < 4:
                break
            (length,) = _LENGTH.unpack(self._prefix)
            self._prefix.clear()
            if length > MAX_FRAME:
                raise WireError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if length == 0:
                self.ended = True
            self._remaining = length
        return out


def encode_datagram(flow_id: int, payload: bytes) -> bytes:
    if not 0 <= flow_id <= MAX_FLOW_ID:
        raise WireError(f"flow id {flow_id} out of range")
    if len(payload) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(payload)} bytes is too large")
    return _DATAGRAM.pack(flow_id, len(payload)) + payload


class DatagramDecoder:
    """Datagram frames to (flow id, payload) pairs; keeps a partial frame between chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        self._buffer += data
        out: list[tuple[int, bytes]] = []
        pos, buf = 0, self._buffer
        while len(buf) - pos >= _DATAGRAM.size:
            flow_id, length = _DATAGRAM.unpack_from(buf, pos)
            end = pos + _DATAGRAM.size + length
            if end > len(buf):
                break
            out.append((flow_id, bytes(buf[pos + _DATAGRAM.size : end])))
            pos = end
        del buf[:pos]
        return out


class FlowIds:
    """Consumer side: one flow id per client address, reused while the flow lives."""

    def __init__(self) -> None:
        self._by_address: dict[object, int] = {}
        self._by_id: dict[int, object] = {}
        self._next = 0

    def id_for(self, address: object) -> int:
        flow_id = self._by_address.get(address)
        if flow_id is None:
            if len(self._by_id) > MAX_FLOW_ID:
                raise WireError("no flow id left")
            while self._next in self._by_id:
                self._next = (self._next + 1) & MAX_FLOW_ID
            flow_id = self._next
            self._next = (self._next + 1) & MAX_FLOW_ID
            self._by_address[address] = flow_id
            self._by_id[flow_id] = address
        return flow_id

    def address_of(self, flow_id: int) -> object | None:
        return self._by_id.get(flow_id)

    def forget(self, flow_ids: Iterable[int]) -> None:
        for flow_id in flow_ids:
            address = self._by_id.pop(flow_id, None)
            self._by_address.pop(address, None)

    def __len__(self) -> int:
        return len(self._by_id)
