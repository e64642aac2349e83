"""The TLS relay's wire format, bytes in and values out (no I/O)."""

from __future__ import annotations

import socket

import pytest

from appliance.dataplane.tlsrelay import channel
from appliance.dataplane.tlsrelay.wire import (
    END_OF_STREAM,
    MAX_FRAME,
    DatagramDecoder,
    FlowIds,
    Header,
    Kind,
    StreamDecoder,
    WireError,
    decode_header,
    encode_datagram,
    encode_header,
    frame_chunks,
)


def joined(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def test_header_round_trips_kind_and_destination_index() -> None:
    for kind in Kind:
        for index in (0, 1, 63, 64, 16383, 16384, 2**30):
            data = encode_header(kind, index) + b"rest"
            assert decode_header(data) == (Header(kind, index), len(data) - 4)


def test_header_split_anywhere_asks_for_more_bytes() -> None:
    data = encode_header(Kind.TCP, 300)
    for cut in range(len(data)):
        assert decode_header(data[:cut]) is None


def test_plaintext_is_not_a_header() -> None:
    with pytest.raises(WireError):
        decode_header(b"GET / HTTP/1.1\r\n")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(WireError):
        decode_header(bytes((0x54, 7, 0)))


def test_stream_frames_round_trip_through_any_chunking() -> None:
    payloads = [b"a", b"hello" * 1000, b"", b"x" * 70000]
    wire = b"".join(b"".join(bytes(p) for p in frame_chunks(d)) for d in payloads if d) + END_OF_STREAM
    for size in (1, 3, 4, 5, 4096, len(wire)):
        decoder = StreamDecoder()
        out = b""
        for start in range(0, len(wire), size):
            out += joined(decoder.feed(wire[start : start + size]))
        assert out == b"".join(payloads)
        assert decoder.ended


def test_a_chunk_inside_one_frame_passes_through_without_a_copy() -> None:
    decoder = StreamDecoder()
    decoder.feed(frame_chunks(b"z" * 1000)[0])  # the length prefix only
    chunk = b"z" * 600
    assert decoder.feed(chunk)[0] is chunk


def test_large_chunks_are_split_into_frames_of_at_most_max_frame() -> None:
    data = b"q" * (2 * MAX_FRAME + 5)
    pieces = frame_chunks(data)
    assert len(pieces) == 6
    decoder = StreamDecoder()
    assert joined(decoder.feed(b"".join(bytes(p) for p in pieces))) == data


def test_oversized_frame_length_is_refused() -> None:
    with pytest.raises(WireError):
        StreamDecoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_data_after_end_of_stream_is_refused() -> None:
    with pytest.raises(WireError):
        StreamDecoder().feed(END_OF_STREAM + b"\x00\x00\x00\x01x")


def test_datagrams_keep_their_flow_ids_and_boundaries_across_chunks() -> None:
    wire = encode_datagram(1, b"one") + encode_datagram(7, b"") + encode_datagram(2**32 - 1, b"x" * 1400)
    decoder = DatagramDecoder()
    out = []
    for byte in range(len(wire)):
        out += decoder.feed(wire[byte : byte + 1])
    assert out == [(1, b"one"), (7, b""), (2**32 - 1, b"x" * 1400)]


def test_datagram_too_large_or_flow_id_out_of_range_is_refused() -> None:
    with pytest.raises(WireError):
        encode_datagram(0, b"x" * 65528)
    with pytest.raises(WireError):
        encode_datagram(2**32, b"x")


def test_flow_ids_are_stable_per_address_and_reused_after_forget() -> None:
    ids = FlowIds()
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    assert ids.id_for(a) == ids.id_for(a) == 0
    assert ids.id_for(b) == 1
    assert ids.address_of(1) == b
    ids.forget([0])
    assert ids.address_of(0) is None
    assert len(ids) == 1
    assert ids.id_for(a) == 2  # a new flow gets a new id: late replies of the old one are not misrouted


def test_relay_sockets_probe_an_idle_peer_so_a_vanished_host_ends_the_connection() -> None:
    with socket.socket() as sock:
        channel.tune(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        idle, interval, count = channel.KEEPALIVE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == count
        assert idle + interval * count <= 60  # well inside the default --peer-grace
