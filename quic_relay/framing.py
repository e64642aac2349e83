"""Sans-I/O wire format of the relay: stream headers, datagram frames, QUIC varints.

A TCP connection travels on one bidirectional QUIC stream that starts with a stream header:
one magic/version byte followed by the destination index as a QUIC varint (RFC 9000 §16).
A UDP datagram travels in one QUIC DATAGRAM frame (RFC 9221) whose payload is
varint flow id, varint destination index, then the UDP payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FramingError

STREAM_MAGIC = 0x51  # "relay stream, version 1"; bump for incompatible header changes
MAX_VARINT = (1 << 62) - 1
MAX_STREAM_HEADER_SIZE = 1 + 8

_LENGTH_BY_PREFIX = (1, 2, 4, 8)


def encode_varint(value: int) -> bytes:
    """Encode `value` as a QUIC variable-length integer."""
    if value < 0 or value > MAX_VARINT:
        raise FramingError(f"varint out of range: {value}")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a varint at `offset`; return (value, next offset), or None if `data` ends first."""
    if offset >= len(data):
        return None
    length = _LENGTH_BY_PREFIX[data[offset] >> 6]
    end = offset + length
    if end > len(data):
        return None
    value = int.from_bytes(data[offset:end], "big") & ((1 << (8 * length - 2)) - 1)
    return value, end


def encode_stream_header(dest_index: int) -> bytes:
    """Bytes that open a relay stream towards destination `dest_index`."""
    return bytes((STREAM_MAGIC,)) + encode_varint(dest_index)


def decode_stream_header(data: bytes | bytearray) -> tuple[int, int] | None:
    """Parse a stream header at the start of `data`.

    Returns (dest_index, header length), or None when more bytes are needed.
    Raises FramingError when the bytes cannot be a stream header.
    """
    if not data:
        return None
    if data[0] != STREAM_MAGIC:
        raise FramingError(f"bad stream header magic 0x{data[0]:02x}")
    return decode_varint(data, 1)


@dataclass(frozen=True)
class DatagramFrame:
    """One relayed UDP datagram."""

    flow_id: int
    dest_index: int
    payload: bytes


def encode_datagram(flow_id: int, dest_index: int, payload: bytes) -> bytes:
    """Payload of the QUIC DATAGRAM frame that carries `payload` on flow `flow_id`."""
    return encode_varint(flow_id) + encode_varint(dest_index) + payload


def decode_datagram(data: bytes) -> DatagramFrame:
    """Parse a DATAGRAM frame payload; FramingError when it is truncated."""
    flow = decode_varint(data)
    if flow is None:
        raise FramingError("datagram truncated in flow id")
    dest = decode_varint(data, flow[1])
    if dest is None:
        raise FramingError("datagram truncated in destination index")
    return DatagramFrame(flow_id=flow[0], dest_index=dest[0], payload=data[dest[1] :])


class StreamTracker:
    """Tells a stream the peer has just opened from one we already saw and forgot.

    Stream ids of one type grow by 4. The first data of any stream starts at offset 0, but
    frames of different streams may be reordered, so ids skipped over are remembered until
    they show up. The set stays as small as the number of streams the peer may open at once.
    """

    def __init__(self, first_stream_id: int = 0) -> None:
        self._next = first_stream_id
        self._skipped: set[int] = set()

    def is_new(self, stream_id: int) -> bool:
        """Record `stream_id`; True the first time it is seen, False afterwards."""
        if stream_id >= self._next:
            self._skipped.update(range(self._next, stream_id, 4))
            self._next = stream_id + 4
            return True
        if stream_id in self._skipped:
            self._skipped.discard(stream_id)
            return True
        return False
