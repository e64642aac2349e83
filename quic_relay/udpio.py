"""Batched UDP I/O for QUIC connections: drain the socket per wake-up, send with GSO, receive with GRO.

aioquic's cost is per packet, and asyncio's datagram transport adds one loop wake-up, one `recvfrom`
and one `datagrams_to_send()` per received packet. `DatagramSocket` replaces that transport: on each
wake-up it reads until the socket is empty (the kernel hands a GSO burst over as one read when GRO is
on), feeds every datagram to its receiver, and only then lets the receiver transmit; what is queued
for sending leaves as few `sendmsg` calls as possible (one per run of equal-size datagrams to one
address, through UDP_SEGMENT). Kernels without GSO or GRO get plain `sendto`/`recvfrom` behaviour.

The grouping and splitting are plain functions (`plan_sends`, `split_segments`), tested without
sockets; the class is the asyncio adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .lanes import bind_lane

logger = logging.getLogger("quic_relay")

Address = tuple[Any, ...]

SOL_UDP = 17
UDP_SEGMENT = 103  # Linux >= 4.18: segment size of a GSO send (cmsg or socket option)
UDP_GRO = 104  # Linux >= 5.0: coalesce received segments; recvmsg reports the size in a cmsg
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3  # set DF, never fragment, ignore the PMTU cache: our prober decides the size
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3
IPV6_MTU = 24

MAX_UDP_PAYLOAD = 65507  # one IPv4 UDP datagram, also the limit of one GSO send
MAX_GSO_SEGMENTS = 64  # what every kernel with UDP_SEGMENT accepts (newer ones take 128)
RECEIVE_SIZE = 65536  # a GRO read can hold up to 64 KiB of segments
MAX_READS_PER_WAKEUP = 256  # then give the loop back, so other sockets and timers run
# Datagrams handed over before the receiver answers (ACKs, data): large GRO reads would otherwise
# hold the peer's ACK back until a whole burst is processed, and its window with it.
# 16 measured best on loopback (8: more ACKs; 32 and up: the sender idles waiting for them).
BATCH = 16
_CMSG_SPACE = socket.CMSG_SPACE(4)
_SEGMENT_SIZE = struct.Struct("=H")  # the UDP_SEGMENT cmsg
_GRO_SIZE = struct.Struct("=i")  # the UDP_GRO cmsg


@dataclass
class SendBatch:
    """Datagrams that leave in one `sendmsg`: all `segment_size` long but the last, to one address."""

    addr: Address
    segment_size: int
    datagrams: list[bytes] = field(default_factory=list)


def plan_sends(queue: list[tuple[bytes, Address]], *, gso: bool) -> list[SendBatch]:
    """Groups queued datagrams into GSO sends, keeping their order: a batch takes consecutive
    datagrams to one address of one size, the last of which may be shorter (the kernel's rule)."""
    batches: list[SendBatch] = []
    current: SendBatch | None = None
    total = 0
    for data, addr in queue:
        size = len(data)
        if (
            gso
            and current is not None
            and current.addr == addr
            and size <= current.segment_size
            and len(current.datagrams) < MAX_GSO_SEGMENTS
            and total + size <= MAX_UDP_PAYLOAD
            and len(current.datagrams[-1]) == current.segment_size
        ):
            current.datagrams.append(data)
            total += size
            continue
        current = SendBatch(addr, size, [data])
        total = size
        batches.append(current)
    return batches


def split_segments(data: bytes, segment_size: int) -> Iterator[bytes]:
    """The datagrams of one GRO read: `segment_size` bytes each, the last possibly shorter."""
    if segment_size <= 0 or segment_size >= len(data):
        yield data
        return
    view = memoryview(data)
    for start in range(0, len(data), segment_size):
        yield bytes(view[start : start + segment_size])


def _gro_segment_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _GRO_SIZE.size:
            return int(_GRO_SIZE.unpack_from(value)[0])
    return 0


def enable_gro(sock: socket.socket) -> bool:
    """Turns UDP_GRO on; False where the kernel lacks it."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT (reading the option fails where it does not)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def forbid_fragmentation(sock: socket.socket) -> None:
    """DF on every datagram and no fragmentation by the host: a packet too big for the path is lost
    (and a probe of that size fails) instead of arriving in pieces."""
    options = [(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE))
    for level, option, value in options:
        with contextlib.suppress(OSError):  # an IPv6-only socket refuses the IPv4 option
            sock.setsockopt(level, option, value)


def route_mtu(family: int, addr: Address) -> int | None:
    """The kernel's MTU of the route to `addr` (the interface's, or a smaller one learnt from ICMP);
    None if it cannot be read."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr[:2] if family == socket.AF_INET else addr)
            if family == socket.AF_INET6:
                return int(probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
            return int(probe.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return None


class DatagramSocket(asyncio.DatagramTransport):
    """A non-blocking UDP socket driven by loop readiness, in place of asyncio's datagram transport.

    `receive(data, addr)` is called for every datagram of a wake-up, then `received_all()` once.
    `sendto` only queues; `flush()` sends the queue (the QUIC protocol calls it after building what
    it has to send). A queue the kernel cannot take at once waits for writability, in order.
    """

    def __init__(
        self,
        sock: socket.socket,
        receive: Callable[[bytes, Address], None],
        received_all: Callable[[], None],
        *,
        gso: bool = True,
        gro: bool = True,
        dont_fragment: bool = True,
    ) -> None:
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname()})
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._receive = receive
        self._received_all = received_all
        sock.setblocking(False)
        if dont_fragment:  # QUIC sockets; an app's entry point keeps the host's usual behaviour
            forbid_fragmentation(sock)
        self.gso = gso and gso_supported(sock)
        self.gro = gro and enable_gro(sock)
        self._queue: list[tuple[bytes, Address]] = []
        self._blocked: list[SendBatch] = []  # batches waiting for the socket to be writable
        self._closed = False
        self.dropped_sends = 0  # datagrams the kernel refused (e.g. larger than the interface allows)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # asyncio.DatagramTransport

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if not self._closed:
            self._queue.append((bytes(data), tuple(addr) if addr is not None else ()))

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._blocked.clear()
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()

    def abort(self) -> None:
        self.close()

    # sending

    def flush(self) -> None:
        """Send what is queued: GSO batches, in order; what the kernel cannot take now waits."""
        if not self._queue or self._closed:
            return
        batches = plan_sends(self._queue, gso=self.gso)
        self._queue = []
        if self._blocked:
            self._blocked.extend(batches)
            return
        self._send_batches(batches)

    def _send_batches(self, batches: list[SendBatch]) -> None:
        for index, batch in enumerate(batches):
            try:
                self._send(batch)
            except BlockingIOError:
                self._blocked = batches[index:]
                self._loop.add_writer(self._sock.fileno(), self._on_writable)
                return

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        blocked, self._blocked = self._blocked, []
        self._send_batches(blocked)

    def _send(self, batch: SendBatch) -> None:
        addr = batch.addr or None
        if len(batch.datagrams) == 1:
            self._send_one(batch.datagrams[0], addr)
            return
        cmsg = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(batch.segment_size))]
        try:
            if addr is None:
                self._sock.sendmsg([b"".join(batch.datagrams)], cmsg)
            else:
                self._sock.sendmsg([b"".join(batch.datagrams)], cmsg, 0, addr)
        except BlockingIOError:
            raise
        except OSError as exc:
            # e.g. EIO from a device that cannot segment: send them one by one from now on
            logger.debug("GSO send of %d datagrams failed (%s); sending singly", len(batch.datagrams), exc)
            if exc.errno not in (errno.EMSGSIZE, errno.ECONNREFUSED):
                self.gso = False
            for data in batch.datagrams:
                self._send_one(data, addr)

    def _send_one(self, data: bytes, addr: Address | None) -> None:
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except BlockingIOError:
            raise
        except OSError as exc:
            # EMSGSIZE: larger than the interface allows (a path MTU probe that cannot succeed);
            # ECONNREFUSED and friends: an ICMP error of an earlier datagram. UDP: lose it.
            self.dropped_sends += 1
            logger.debug("UDP send of %d bytes failed: %s", len(data), exc)

    # receiving

    def _on_readable(self) -> None:
        sock = self._sock
        receive = self._receive
        pending = 0
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                if self.gro:
                    data, ancdata, _flags, addr = sock.recvmsg(RECEIVE_SIZE, _CMSG_SPACE)
                else:
                    data, addr = sock.recvfrom(RECEIVE_SIZE)
                    ancdata = []
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error reported on this socket; keep reading
                logger.debug("UDP receive: %s", exc)
                continue
            segment_size = _gro_segment_size(ancdata) if ancdata else 0
            if segment_size:
                for segment in split_segments(data, segment_size):
                    receive(segment, addr)
                    pending += 1
                    if pending >= BATCH:
                        self._received_all()
                        pending = 0
            else:
                receive(data, addr)
                pending += 1
            if self._closed:
                return
            if pending >= BATCH:
                self._received_all()
                pending = 0
        if pending:
            self._received_all()


def open_socket(local: Address, family: int, *, lane: int | None = None) -> socket.socket:
    """A bound, non-blocking UDP socket for a QUIC endpoint; with `lane`, on a port of that lane
    (lanes.py), whatever port `local` names."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if lane is None:
            sock.bind(local)
        else:
            bind_lane(sock, str(local[0]), lane)
    except BaseException:
        sock.close()
        raise
    return sock
