"""udpio: GSO batching and GRO splitting (plain functions), and DatagramSocket on real sockets."""

import asyncio
import os
import socket

from quic_relay import udpio
from quic_relay.udpio import MAX_GSO_SEGMENTS, DatagramSocket, open_socket, plan_sends, split_segments

A = ("127.0.0.1", 1000)
B = ("127.0.0.1", 2000)


def sizes(batches: list[udpio.SendBatch]) -> list[list[int]]:
    return [[len(d) for d in batch.datagrams] for batch in batches]


def test_equal_datagrams_to_one_address_leave_in_one_send() -> None:
    batches = plan_sends([(b"x" * 1400, A)] * 10, gso=True)
    assert sizes(batches) == [[1400] * 10]
    assert batches[0].segment_size == 1400


def test_a_shorter_datagram_ends_its_batch() -> None:
    queue = [(b"x" * 1400, A), (b"x" * 1400, A), (b"x" * 90, A), (b"x" * 1400, A)]
    assert sizes(plan_sends(queue, gso=True)) == [[1400, 1400, 90], [1400]]


def test_a_larger_datagram_or_another_address_starts_a_new_batch() -> None:
    queue = [(b"x" * 100, A), (b"x" * 1400, A), (b"x" * 1400, B)]
    assert sizes(plan_sends(queue, gso=True)) == [[100], [1400], [1400]]


def test_batches_respect_the_segment_count_and_the_64_kib_limit() -> None:
    small = plan_sends([(b"x" * 100, A)] * (MAX_GSO_SEGMENTS + 1), gso=True)
    assert sizes(small) == [[100] * MAX_GSO_SEGMENTS, [100]]
    jumbo = plan_sends([(b"x" * 8952, A)] * 8, gso=True)
    assert sizes(jumbo) == [[8952] * 7, [8952]]


def test_without_gso_every_datagram_is_its_own_send() -> None:
    assert sizes(plan_sends([(b"x" * 1400, A)] * 3, gso=False)) == [[1400], [1400], [1400]]


def test_split_segments_cuts_a_gro_read_back_into_datagrams() -> None:
    data = b"a" * 1400 + b"b" * 1400 + b"c" * 10
    assert list(split_segments(data, 1400)) == [b"a" * 1400, b"b" * 1400, b"c" * 10]
    assert list(split_segments(b"single", 0)) == [b"single"]


async def exchange(gso: bool, gro: bool, count: int) -> tuple[list[bytes], list[int], DatagramSocket]:
    received: list[bytes] = []
    batches: list[int] = []
    a = open_socket(("127.0.0.1", 0), socket.AF_INET)
    b = open_socket(("127.0.0.1", 0), socket.AF_INET)
    receiver = DatagramSocket(
        b, lambda data, addr: received.append(data), lambda: batches.append(len(received)), gro=gro
    )
    sender = DatagramSocket(a, lambda data, addr: None, lambda: None, gso=gso)
    sent = [os.urandom(1350) for _ in range(count)] + [os.urandom(77)]
    for data in sent:
        sender.sendto(data, b.getsockname())
    sender.flush()
    for _ in range(100):
        if len(received) == len(sent):
            break
        await asyncio.sleep(0.01)
    sender.close()
    receiver.close()
    assert received == sent
    return received, batches, receiver


async def test_datagrams_cross_in_order_with_gso_and_gro() -> None:
    _, batches, receiver = await exchange(gso=True, gro=True, count=40)
    assert receiver.gro
    assert batches[-1] == 41


async def test_datagrams_cross_in_order_without_gso_or_gro() -> None:
    _, _, receiver = await exchange(gso=False, gro=False, count=40)
    assert not receiver.gro


async def test_the_receiver_answers_every_batch_of_datagrams() -> None:
    # received_all() runs at least once per BATCH datagrams, so ACKs are not held for a whole burst
    _, batches, _ = await exchange(gso=True, gro=True, count=3 * udpio.BATCH)
    assert len(batches) >= 3


async def test_a_datagram_the_kernel_refuses_is_counted_and_the_rest_still_leave() -> None:
    received: list[bytes] = []
    a = open_socket(("127.0.0.1", 0), socket.AF_INET)
    b = open_socket(("127.0.0.1", 0), socket.AF_INET)
    receiver = DatagramSocket(b, lambda data, addr: received.append(data), lambda: None)
    sender = DatagramSocket(a, lambda data, addr: None, lambda: None)
    sender.sendto(b"x" * 70000, b.getsockname())  # cannot be one UDP datagram
    sender.sendto(b"after", b.getsockname())
    sender.flush()
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.01)
    assert sender.dropped_sends == 1
    assert received == [b"after"]
    sender.close()
    receiver.close()


async def test_sockets_set_dont_fragment_so_path_mtu_probes_are_honest() -> None:
    sock = open_socket(("127.0.0.1", 0), socket.AF_INET)
    transport = DatagramSocket(sock, lambda data, addr: None, lambda: None)
    assert sock.getsockopt(socket.IPPROTO_IP, udpio.IP_MTU_DISCOVER) == udpio.IP_PMTUDISC_PROBE
    transport.close()
