"""UDP over QUIC DATAGRAM frames: flow tables of the consumer and producer sides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .counters import Counters
from .errors import FramingError
from .framing import DatagramFrame, encode_datagram_frames
from .reassembly import Reassembler
from .udpio import DatagramSocket

logger = logging.getLogger("quic_relay")

Address = tuple[Any, ...]
SendFrames = Callable[[list[bytes]], object]  # queues the DATAGRAM frames of one UDP datagram
_MAX_QUEUED_BEFORE_CONNECT = 64  # datagrams kept while a producer-side flow socket is created
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
SO_SNDBUFFORCE = 32  # Linux: like SO_SNDBUF but past net.core.wmem_max, for holders of CAP_NET_ADMIN
SO_RCVBUFFORCE = 33


def raise_buffers(sock: socket.socket, size: int, *, send: bool = False) -> None:
    """Sets the socket's receive buffer (and its send buffer) to `size`. UDP has no autotuning, and a
    burst that finds the buffer full while the event loop is busy is dropped. Forced where the process
    holds CAP_NET_ADMIN (the appliance does), so a host's low net.core.rmem_max (208 KiB by default)
    does not cap it; without the capability, as far as that limit allows."""
    options = [(SO_RCVBUFFORCE, socket.SO_RCVBUF)]
    if send:
        options.append((SO_SNDBUFFORCE, socket.SO_SNDBUF))
    for forced, capped in options:
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, capped, size)


def enlarge_receive_buffer(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        raise_buffers(sock, UDP_RECEIVE_BUFFER)


class IdleSweeper:
    """Calls `sweep(now)` periodically, often enough to expire flows about on time."""

    def __init__(self, timeout: float, sweep: Callable[[float], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._interval = max(0.05, min(5.0, timeout / 4))
        self._sweep = sweep
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self._sweep(self._loop.time())
        self._handle = self._loop.call_later(self._interval, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class DatagramCodec:
    """UDP datagrams of one flow table to and from DATAGRAM frames; every loss is counted.

    A datagram too large for one frame leaves as fragments numbered per flow; fragments from the
    peer are put back together by a Reassembler.
    """

    def __init__(self, counters: Counters, max_frame: int, send: SendFrames) -> None:
        self._counters = counters
        self.max_frame = max_frame  # follows the connection's packet size
        self._send = send
        self._next_seq: dict[int, int] = {}  # flow id -> sequence number of its next large datagram
        self._reassembler = Reassembler()
        self._drops_counted = 0

    def send(self, flow_id: int, dest_index: int, payload: bytes) -> None:
        """Send one UDP datagram in as many frames as it needs; one that cannot be is dropped."""
        seq = self._next_seq.get(flow_id, 0)
        try:
            frames = encode_datagram_frames(flow_id, dest_index, payload, max_frame=self.max_frame, seq=seq)
        except FramingError as exc:
            logger.debug("UDP flow %d: %s", flow_id, exc)
            self._counters.dropped_datagrams += 1
            return
        if len(frames) > 1:
            self._next_seq[flow_id] = seq + 1
        self._send(frames)

    def receive(self, data: bytes, now: float) -> DatagramFrame | None:
        """The datagram a DATAGRAM frame from the peer carries or completes, if any."""
        frame = self._reassembler.receive(data, now)
        self._count_drops()
        return frame

    def expire(self, now: float) -> None:
        self._reassembler.expire(now)
        self._count_drops()

    def forget_flow(self, flow_id: int) -> None:
        self._next_seq.pop(flow_id, None)
        self._reassembler.forget_flow(flow_id)
        self._count_drops()

    def forget_fragments(self) -> None:
        """Fragments received so far can never complete (their QUIC connection ended)."""
        self._reassembler.clear()
        self._count_drops()

    def _count_drops(self) -> None:
        total = self._reassembler.drops.total
        self._counters.dropped_datagrams += total - self._drops_counted
        self._drops_counted = total


# consumer side


class UdpEntry:
    """A UDP entry point: each source address is one flow towards `dest_index`.

    Reads drain the socket on each wake-up (udpio), so a fast app costs one loop iteration per
    burst, not per datagram; the DATAGRAM frames of a burst leave in one transmit."""

    def __init__(self, flows: ClientFlowTable, dest_index: int, sock: socket.socket) -> None:
        self.flows = flows
        self.dest_index = dest_index
        raise_buffers(sock, UDP_RECEIVE_BUFFER)
        self.transport = DatagramSocket(
            sock, self._from_app, _nothing, gso=False, gro=False, dont_fragment=False
        )

    def _from_app(self, data: bytes, addr: Address) -> None:
        self.flows.from_app(self, addr, data)

    def send(self, payload: bytes, addr: Address) -> None:
        self.transport.sendto(payload, addr)
        self.transport.flush()

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()


def _nothing() -> None:
    pass


@dataclass
class _ClientFlow:
    flow_id: int
    entry: UdpEntry
    addr: Address
    last_seen: float


class ClientFlowTable:
    """Maps (entry point, source address) to flow ids and back; idle mappings expire."""

    def __init__(self, counters: Counters, idle_timeout: float, max_frame: int, send: SendFrames) -> None:
        self._counters = counters
        self._idle_timeout = idle_timeout
        self.codec = DatagramCodec(counters, max_frame, send)
        self._loop = asyncio.get_running_loop()
        self._by_source: dict[tuple[UdpEntry, Address], _ClientFlow] = {}
        self._by_id: dict[int, _ClientFlow] = {}
        self._next_flow_id = 0
        self._sweeper = IdleSweeper(idle_timeout, self.expire)

    def from_app(self, entry: UdpEntry, addr: Address, payload: bytes) -> None:
        flow = self._by_source.get((entry, addr))
        if flow is None:
            flow = _ClientFlow(self._next_flow_id, entry, addr, 0.0)
            self._next_flow_id += 1
            self._by_source[(entry, addr)] = flow
            self._by_id[flow.flow_id] = flow
            self._counters.opened()
        flow.last_seen = self._loop.time()
        self._counters.bytes_in += len(payload)
        self.codec.send(flow.flow_id, entry.dest_index, payload)

    def from_peer(self, data: bytes) -> None:
        """A DATAGRAM frame from the peer: deliver the datagram it carries or completes."""
        frame = self.codec.receive(data, self._loop.time())
        if frame is None:
            return
        flow = self._by_id.get(frame.flow_id)
        if flow is None or flow.entry.closed:
            self._counters.dropped_datagrams += 1
            return
        flow.last_seen = self._loop.time()
        flow.entry.send(frame.payload, flow.addr)
        self._counters.bytes_out += len(frame.payload)

    def expire(self, now: float) -> None:
        self.codec.expire(now)
        for flow in [f for f in self._by_id.values() if now - f.last_seen > self._idle_timeout]:
            self._remove(flow)

    def remove_entry(self, entry: UdpEntry) -> None:
        for flow in [f for f in self._by_id.values() if f.entry is entry]:
            self._remove(flow)

    def close(self) -> None:
        self._sweeper.cancel()
        for flow in list(self._by_id.values()):
            self._remove(flow)

    def _remove(self, flow: _ClientFlow) -> None:
        del self._by_id[flow.flow_id]
        del self._by_source[(flow.entry, flow.addr)]
        self.codec.forget_flow(flow.flow_id)
        self._counters.closed()


# producer side


class _ServerFlow(asyncio.DatagramProtocol):
    """A connected UDP socket towards one destination, for one flow id."""

    def __init__(self, table: ServerFlowTable, flow_id: int, dest_index: int) -> None:
        self.table = table
        self.flow_id = flow_id
        self.dest_index = dest_index
        self.last_seen = asyncio.get_running_loop().time()
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] = []
        self.task: asyncio.Task[Any] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)
        enlarge_receive_buffer(transport)
        self.table.counters.opened()
        queue, self.queue = self.queue, []
        for payload in queue:
            self.send(payload)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        self.table.counters.bytes_in += len(data)
        self.table.codec.send(self.flow_id, self.dest_index, data)

    def error_received(self, exc: Exception) -> None:
        logger.debug("UDP flow %d: %s", self.flow_id, exc)  # e.g. ICMP port unreachable

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.table.counters.closed()
        self.table.discard(self)

    def send(self, payload: bytes) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        if self.transport is None:
            if len(self.queue) < _MAX_QUEUED_BEFORE_CONNECT:
                self.queue.append(payload)
            else:
                self.table.counters.dropped_datagrams += 1
            return
        self.transport.sendto(payload)
        self.table.counters.bytes_out += len(payload)

    def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()


class ServerFlowTable:
    """Producer side flows of one QUIC connection: one connected UDP socket per flow id."""

    def __init__(
        self,
        destinations: list[tuple[str, int]],
        counters: Counters,
        idle_timeout: float,
        max_frame: int,
        send: SendFrames,
    ) -> None:
        self.destinations = destinations
        self.counters = counters
        self.codec = DatagramCodec(counters, max_frame, send)
        self._loop = asyncio.get_running_loop()
        self._idle_timeout = idle_timeout
        self._flows: dict[int, _ServerFlow] = {}
        self._sweeper = IdleSweeper(idle_timeout, self.expire)

    def from_peer(self, data: bytes) -> None:
        """A DATAGRAM frame from the peer: send the datagram it carries or completes."""
        frame = self.codec.receive(data, self._loop.time())
        if frame is None:
            return
        flow = self._flows.get(frame.flow_id)
        if flow is None:
            if not 0 <= frame.dest_index < len(self.destinations):
                self.counters.dropped_datagrams += 1
                return
            flow = _ServerFlow(self, frame.flow_id, frame.dest_index)
            self._flows[frame.flow_id] = flow
            flow.task = self._loop.create_task(self._open(flow))
        flow.send(frame.payload)

    async def _open(self, flow: _ServerFlow) -> None:
        host, port = self.destinations[flow.dest_index]
        try:
            await self._loop.create_datagram_endpoint(lambda: flow, remote_addr=(host, port))
        except OSError as exc:
            logger.warning("UDP flow %d to %s:%d failed: %s", flow.flow_id, host, port, exc)
            self.discard(flow)
        finally:
            flow.task = None
        if flow.closed and flow.transport is not None:
            flow.transport.close()

    def discard(self, flow: _ServerFlow) -> None:
        if self._flows.get(flow.flow_id) is flow:
            del self._flows[flow.flow_id]
            self.codec.forget_flow(flow.flow_id)

    def expire(self, now: float) -> None:
        self.codec.expire(now)
        for flow in [f for f in self._flows.values() if now - f.last_seen > self._idle_timeout]:
            self.discard(flow)
            flow.close()

    def close(self) -> None:
        self._sweeper.cancel()
        for flow in list(self._flows.values()):
            self.discard(flow)
            flow.close()
