"""Sans-I/O wire format of the relay: stream headers, datagram frames, QUIC varints.

A TCP connection travels on one bidirectional QUIC stream that starts with a stream header:
one magic/version byte followed by the destination index as a QUIC varint (RFC 9000 §16).
A UDP datagram travels in QUIC DATAGRAM frames (RFC 9221). Every frame payload starts with
varint (flow id << 1 | fragmented), varint destination index. A datagram that fits in one
frame follows unfragmented (flag 0) with nothing else before the UDP payload. A larger one is
split into fragments (flag 1), each carrying varint datagram sequence number (per flow and
sender), varint fragment index, varint fragment count, then its slice of the UDP payload.
Losing any fragment loses the whole datagram, as UDP would; `Reassembler` rebuilds the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FramingError

STREAM_MAGIC = 0x51  # "relay stream, version 1"; bump for incompatible header changes
MAX_VARINT = (1 << 62) - 1
MAX_STREAM_HEADER_SIZE = 1 + 8
MAX_FLOW_ID = MAX_VARINT >> 1  # one bit of the flow id varint is the fragmented flag
MAX_UDP_PAYLOAD = 65527  # 65535 minus the UDP header: nothing larger can be a UDP datagram
MAX_FRAGMENTS = 128  # 65,527 bytes in fragments of at least 512 bytes

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
    """One whole relayed UDP datagram."""

    flow_id: int
    dest_index: int
    payload: bytes


@dataclass(frozen=True)
class DatagramFragment:
    """One slice of a UDP datagram too large for a single DATAGRAM frame."""

    flow_id: int
    dest_index: int
    seq: int  # datagram sequence number, per flow and sender
    index: int  # 0 <= index < count
    count: int  # 2 <= count <= MAX_FRAGMENTS
    payload: bytes  # never empty


def _frame_prefix(flow_id: int, dest_index: int, fragmented: bool) -> bytes:
    if not 0 <= flow_id <= MAX_FLOW_ID:
        raise FramingError(f"flow id out of range: {flow_id}")
    return encode_varint(flow_id << 1 | fragmented) + encode_varint(dest_index)


def encode_datagram(flow_id: int, dest_index: int, payload: bytes) -> bytes:
    """Payload of the one unfragmented DATAGRAM frame that carries `payload` on flow `flow_id`."""
    return _frame_prefix(flow_id, dest_index, False) + payload


def encode_datagram_frames(
    flow_id: int, dest_index: int, payload: bytes, *, max_frame: int, seq: int
) -> list[bytes]:
    """DATAGRAM frame payloads of at most `max_frame` bytes that together carry `payload`.

    One unfragmented frame when it fits. Otherwise fragments of datagram `seq`: the caller must
    give the next large datagram of this flow another number (see `fits_in_one_frame`), or the
    peer could mix their fragments. FramingError when `payload` cannot be carried at all.
    """
    if fits_in_one_frame(flow_id, dest_index, len(payload), max_frame):
        return [encode_datagram(flow_id, dest_index, payload)]
    if len(payload) > MAX_UDP_PAYLOAD:
        raise FramingError(f"datagram of {len(payload)} bytes is larger than UDP allows")
    prefix = _frame_prefix(flow_id, dest_index, True) + encode_varint(seq)
    room, count = _fragment_room(len(prefix), len(payload), max_frame)
    return [
        prefix + encode_varint(index) + encode_varint(count) + payload[index * room : (index + 1) * room]
        for index in range(count)
    ]


def fits_in_one_frame(flow_id: int, dest_index: int, size: int, max_frame: int) -> bool:
    """True when a `size`-byte datagram travels unfragmented (and needs no sequence number)."""
    return len(_frame_prefix(flow_id, dest_index, False)) + size <= max_frame


def _fragment_room(prefix_size: int, size: int, max_frame: int) -> tuple[int, int]:
    """(payload bytes per fragment, fragment count) for a `size`-byte datagram."""
    varint_size = 1  # of the fragment index and count, which grows with the count
    while True:
        room = max_frame - prefix_size - 2 * varint_size
        count = -(-size // room) if room > 0 else MAX_FRAGMENTS + 1
        if count > MAX_FRAGMENTS:
            raise FramingError(f"datagram of {size} bytes needs more than {MAX_FRAGMENTS} fragments")
        if len(encode_varint(count)) <= varint_size:
            return room, count
        varint_size = len(encode_varint(count))


def decode_datagram(data: bytes) -> DatagramFrame | DatagramFragment:
    """Parse a DATAGRAM frame payload; FramingError when it is truncated or malformed."""
    head, offset = _pull_varint(data, 0, "flow id")
    dest_index, offset = _pull_varint(data, offset, "destination index")
    flow_id = head >> 1
    if not head & 1:
        return DatagramFrame(flow_id=flow_id, dest_index=dest_index, payload=data[offset:])
    seq, offset = _pull_varint(data, offset, "datagram sequence number")
    index, offset = _pull_varint(data, offset, "fragment index")
    count, offset = _pull_varint(data, offset, "fragment count")
    if not 2 <= count <= MAX_FRAGMENTS or index >= count:
        raise FramingError(f"bad fragment {index} of {count}")
    if offset == len(data):
        raise FramingError("empty fragment")
    return DatagramFragment(flow_id, dest_index, seq, index, count, data[offset:])


def _pull_varint(data: bytes, offset: int, what: str) -> tuple[int, int]:
    parsed = decode_varint(data, offset)
    if parsed is None:
        raise FramingError(f"datagram truncated in {what}")
    return parsed


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
