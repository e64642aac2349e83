"""Relay wire format: bytes in, bytes out."""

import pytest

from quic_relay.errors import FramingError
from quic_relay.framing import (
    MAX_FLOW_ID,
    MAX_FRAGMENTS,
    STREAM_MAGIC,
    DatagramFragment,
    DatagramFrame,
    StreamTracker,
    decode_datagram,
    decode_stream_header,
    decode_varint,
    encode_datagram,
    encode_datagram_frames,
    encode_stream_header,
    encode_varint,
)


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (2**30 - 1, 4), (2**30, 8), (2**62 - 1, 8)],
)
def test_varint_round_trips_with_rfc9000_sizes(value: int, size: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == size
    assert decode_varint(encoded) == (value, size)


def test_varint_matches_rfc9000_example() -> None:
    assert decode_varint(bytes.fromhex("c2197c5eff14e88c")) == (151288809941952652, 8)
    assert encode_varint(15293) == bytes.fromhex("7bbd")


@pytest.mark.parametrize("value", [-1, 2**62])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(FramingError):
        encode_varint(value)


def test_truncated_varint_needs_more_bytes() -> None:
    assert decode_varint(b"") is None
    assert decode_varint(bytes.fromhex("7b")) is None


def test_stream_header_round_trips_and_reports_its_length() -> None:
    header = encode_stream_header(300)
    assert header[0] == STREAM_MAGIC
    assert decode_stream_header(header + b"payload") == (300, len(header))


def test_incomplete_stream_header_needs_more_bytes() -> None:
    header = encode_stream_header(300)
    assert decode_stream_header(b"") is None
    assert decode_stream_header(header[:-1]) is None


def test_stream_header_with_wrong_magic_is_refused() -> None:
    with pytest.raises(FramingError):
        decode_stream_header(b"GET / HTTP/1.1\r\n")


def test_datagram_round_trips() -> None:
    frame = decode_datagram(encode_datagram(70000, 2, b"\x00\xffdata"))
    assert frame == DatagramFrame(flow_id=70000, dest_index=2, payload=b"\x00\xffdata")


def test_unfragmented_datagram_has_only_flow_and_destination_before_the_payload() -> None:
    assert encode_datagram(3, 1, b"data") == bytes((3 << 1, 1)) + b"data"


def test_datagram_that_fits_travels_in_one_frame_of_at_most_max_frame_bytes() -> None:
    frames = encode_datagram_frames(3, 1, bytes(98), max_frame=100, seq=0)
    assert frames == [encode_datagram(3, 1, bytes(98))]


def test_datagram_one_byte_too_large_is_split_into_two_fragments() -> None:
    payload = bytes(range(99))
    frames = encode_datagram_frames(3, 1, payload, max_frame=100, seq=7)
    assert [len(frame) for frame in frames] == [100, 5 + 99 - 95]
    first, second = (decode_datagram(frame) for frame in frames)
    assert first == DatagramFragment(3, 1, seq=7, index=0, count=2, payload=payload[:95])
    assert second == DatagramFragment(3, 1, seq=7, index=1, count=2, payload=payload[95:])


def test_fragment_header_grows_with_the_fragment_count() -> None:
    payload = bytes(range(256)) * 255
    frames = encode_datagram_frames(3, 1, payload, max_frame=600, seq=0)  # 64+ fragments: 2-byte varints
    fragments = [decode_datagram(frame) for frame in frames]
    assert all(len(frame) <= 600 for frame in frames)
    assert len(frames) == 111
    assert all(isinstance(fragment, DatagramFragment) and fragment.count == 111 for fragment in fragments)
    assert b"".join(fragment.payload for fragment in fragments) == payload


def test_datagram_needing_too_many_fragments_is_refused() -> None:
    with pytest.raises(FramingError, match="fragments"):
        encode_datagram_frames(3, 1, bytes(MAX_FRAGMENTS * 10 + 1), max_frame=15, seq=0)


def test_datagram_larger_than_udp_allows_is_refused() -> None:
    with pytest.raises(FramingError, match="larger than UDP"):
        encode_datagram_frames(3, 1, bytes(65528), max_frame=1250, seq=0)


def test_flow_id_beyond_the_flag_bit_is_refused() -> None:
    assert decode_datagram(encode_datagram(MAX_FLOW_ID, 0, b"")).flow_id == MAX_FLOW_ID
    with pytest.raises(FramingError):
        encode_datagram(MAX_FLOW_ID + 1, 0, b"")


def test_datagram_with_empty_payload_round_trips() -> None:
    assert decode_datagram(encode_datagram(1, 0, b"")).payload == b""


@pytest.mark.parametrize("data", [b"", b"\x40", b"\x05", b"\x05\x80\x00"])
def test_truncated_datagram_is_refused(data: bytes) -> None:
    with pytest.raises(FramingError):
        decode_datagram(data)


def test_stream_tracker_sees_each_stream_once() -> None:
    tracker = StreamTracker()
    assert tracker.is_new(0)
    assert not tracker.is_new(0)
    assert tracker.is_new(4)


def test_stream_tracker_accepts_streams_that_arrive_out_of_order() -> None:
    tracker = StreamTracker()
    assert tracker.is_new(12)
    assert tracker.is_new(4)
    assert not tracker.is_new(4)
    assert tracker.is_new(0)
    assert tracker.is_new(8)
    assert not tracker.is_new(12)
