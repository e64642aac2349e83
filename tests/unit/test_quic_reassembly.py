"""Reassembly of fragmented UDP datagrams: DATAGRAM frame payloads in, whole datagrams out."""

import os
import random

import pytest

from quic_relay.framing import MAX_UDP_PAYLOAD, DatagramFrame, encode_datagram_frames, encode_varint
from quic_relay.reassembly import FRAGMENT_COST, Reassembler

MAX_FRAME = 1250  # the default: max_datagram_size 1350 less QUIC overhead
LIMIT = MAX_FRAME - 2  # largest unfragmented payload of flow 5 to destination 1


def frames_of(payload: bytes, *, flow_id: int = 5, seq: int = 0, max_frame: int = MAX_FRAME) -> list[bytes]:
    return encode_datagram_frames(flow_id, 1, payload, max_frame=max_frame, seq=seq)


def fragment(index: int, count: int, payload: bytes, *, flow_id: int = 5, seq: int = 0) -> bytes:
    fields = (flow_id << 1 | 1, 1, seq, index, count)
    return b"".join(encode_varint(value) for value in fields) + payload


def feed(reassembler: Reassembler, frames: list[bytes], now: float = 0.0) -> list[DatagramFrame]:
    return [frame for data in frames if (frame := reassembler.receive(data, now)) is not None]


@pytest.mark.parametrize("size", [0, 1, LIMIT, LIMIT + 1, 1460, 8000, 65507, MAX_UDP_PAYLOAD])
def test_datagrams_of_every_size_round_trip(size: int) -> None:
    payload = os.urandom(size)
    frames = frames_of(payload)
    assert all(len(frame) <= MAX_FRAME for frame in frames)
    assert feed(Reassembler(), frames) == [DatagramFrame(5, 1, payload)]


def test_fragments_complete_in_any_order() -> None:
    payload = os.urandom(20000)
    frames = frames_of(payload)
    random.Random(7).shuffle(frames)
    reassembler = Reassembler()
    assert feed(reassembler, frames) == [DatagramFrame(5, 1, payload)]
    assert reassembler.pending == reassembler.pending_bytes == 0


def test_interleaved_datagrams_of_several_flows_complete_separately() -> None:
    first, second, third = os.urandom(3000), os.urandom(4000), os.urandom(5000)
    batches = [frames_of(first, seq=0), frames_of(second, seq=1), frames_of(third, flow_id=6, seq=0)]
    interleaved = [frame for group in zip(*batches, strict=False) for frame in group]
    interleaved += [frame for batch in batches for frame in batch[len(batches[0]) :]]
    payloads = {(frame.flow_id, frame.payload) for frame in feed(Reassembler(), interleaved)}
    assert payloads == {(5, first), (5, second), (6, third)}


def test_datagram_missing_a_fragment_expires_and_is_counted() -> None:
    reassembler = Reassembler(timeout=2.0)
    frames = frames_of(os.urandom(5000))
    assert feed(reassembler, frames[:-1], now=10.0) == []
    reassembler.expire(11.9)
    assert reassembler.pending == 1
    reassembler.expire(12.0)
    assert (reassembler.pending, reassembler.pending_bytes) == (0, 0)
    assert reassembler.drops.expired == 1
    assert feed(reassembler, frames[-1:], now=12.5) == []  # too late: starts a new, hopeless datagram


def test_late_fragment_after_expiry_does_not_complete_the_datagram() -> None:
    reassembler = Reassembler(timeout=2.0)
    frames = frames_of(os.urandom(3000))
    feed(reassembler, frames[:1], now=0.0)
    assert feed(reassembler, frames[1:], now=3.0) == []
    assert reassembler.drops.expired == 1


def test_duplicate_fragment_is_dropped_and_the_datagram_still_completes() -> None:
    payload = os.urandom(3000)
    frames = frames_of(payload)
    reassembler = Reassembler()
    assert feed(reassembler, [frames[0], frames[0], *frames[1:]]) == [DatagramFrame(5, 1, payload)]
    assert reassembler.drops.duplicate == 1


def test_fragments_disagreeing_on_the_fragment_count_drop_the_datagram() -> None:
    reassembler = Reassembler()
    three = frames_of(os.urandom(3000))
    two = frames_of(os.urandom(2000))
    assert len(three) == 3 and len(two) == 2
    assert feed(reassembler, [three[0], two[1], *three[1:]]) == []
    assert reassembler.drops.inconsistent == 1


def test_fragments_disagreeing_on_the_destination_drop_the_datagram() -> None:
    reassembler = Reassembler()
    payload = os.urandom(3000)
    to_one = encode_datagram_frames(5, 1, payload, max_frame=MAX_FRAME, seq=0)
    to_two = encode_datagram_frames(5, 2, payload, max_frame=MAX_FRAME, seq=0)
    assert feed(reassembler, [to_one[0], to_two[1], to_one[2]]) == []
    assert reassembler.drops.inconsistent == 1


def test_fragments_adding_up_to_more_than_udp_allows_drop_the_datagram() -> None:
    # fragments of 40 KB each, as a broken peer with huge DATAGRAM frames could send
    frames = [fragment(index, 2, bytes(40000)) for index in range(2)]
    reassembler = Reassembler()
    assert feed(reassembler, frames) == []
    assert reassembler.drops.inconsistent == 1
    assert reassembler.pending == 0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x0b",  # fragment flag, destination missing
        b"\x0b\x01\x00\x00",  # fragment count missing
        b"\x0b\x01\x00\x00\x01x",  # count 1: a single fragment is no fragment
        b"\x0b\x01\x00\x02\x02x",  # index beyond count
        b"\x0b\x01\x00\x00\x02",  # empty fragment
        b"\x0b\x01\x00\x00\x40\xc8x",  # count above MAX_FRAGMENTS
    ],
)
def test_garbage_frames_are_dropped_and_counted(data: bytes) -> None:
    reassembler = Reassembler()
    assert reassembler.receive(data, 0.0) is None
    assert reassembler.drops.invalid == 1
    assert reassembler.pending == 0


def test_a_flow_holds_a_bounded_number_of_incomplete_datagrams_oldest_dropped_first() -> None:
    reassembler = Reassembler(max_pending_per_flow=4)
    incomplete = [frames_of(os.urandom(3000), seq=seq) for seq in range(6)]
    for seq, frames in enumerate(incomplete):
        feed(reassembler, frames[:1], now=seq / 10)
    assert reassembler.pending == 4
    assert reassembler.drops.evicted == 2
    assert feed(reassembler, incomplete[0][1:]) == []  # the oldest went first
    assert len(feed(reassembler, incomplete[5][1:])) == 1


def test_incomplete_datagrams_of_all_flows_hold_a_bounded_number_of_bytes() -> None:
    reassembler = Reassembler(max_bytes=100_000)
    for flow_id in range(200):
        feed(reassembler, frames_of(os.urandom(3000), flow_id=flow_id)[:1], now=flow_id / 100)
        assert reassembler.pending_bytes <= 100_000
    assert reassembler.pending_bytes > 100_000 - (MAX_FRAME + FRAGMENT_COST)  # full, less one fragment
    assert reassembler.drops.evicted == 200 - reassembler.pending


def test_forgetting_a_flow_drops_only_its_incomplete_datagrams() -> None:
    reassembler = Reassembler()
    kept = frames_of(os.urandom(3000), flow_id=6)
    feed(reassembler, [frames_of(os.urandom(3000), flow_id=5)[0], kept[0]])
    reassembler.forget_flow(5)
    assert reassembler.drops.evicted == 1
    assert len(feed(reassembler, kept[1:])) == 1


def test_clear_drops_everything_incomplete() -> None:
    reassembler = Reassembler()
    feed(reassembler, [frames_of(os.urandom(3000), flow_id=flow_id)[0] for flow_id in range(3)])
    reassembler.clear()
    assert (reassembler.pending, reassembler.pending_bytes, reassembler.drops.evicted) == (0, 0, 3)
