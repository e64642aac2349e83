"""UDP over one TLS connection: datagram frames with flow ids (wire.py), one socket per flow at the
producer side, idle flows forgotten on both sides."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from quic_relay.udp import IdleSweeper, raise_buffers

from .channel import TlsChannel
from .relay import Counters
from .wire import DatagramDecoder, FlowIds, WireError, encode_datagram

MAX_QUEUED = 256  # datagrams held while a tunnel or flow socket is being set up
MAX_BACKLOG = 4 * 1024 * 1024  # bytes waiting for the TLS channel; beyond it datagrams are dropped
SOCKET_BUFFER = 4 * 1024 * 1024


def tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        raise_buffers(sock, SOCKET_BUFFER, send=True)


class Batch:
    """Datagram frames bound for one TLS channel, written once per event-loop turn: a TLS record
    (and a send) then carries many datagrams instead of one each."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._channel: TlsChannel | None = None

    def add(self, channel: TlsChannel, frame: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self._frames.append(frame)
        self._channel = channel

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        channel = self._channel
        if frames and channel is not None and not channel.closed:
            channel.write(b"".join(frames))


class _FlowSocket(asyncio.DatagramProtocol):
    """Producer side: the socket of one flow, connected to the destination."""

    def __init__(self, flows: ProducerFlows, flow_id: int) -> None:
        self.flows = flows
        self.flow_id = flow_id
        self.transport: asyncio.DatagramTransport | None = None
        self.queued: list[bytes] = []
        self.last_seen = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        tune(transport)
        for payload in self.queued:
            self.transport.sendto(payload)
        self.queued.clear()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        self.flows.reply(self.flow_id, data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from the destination: UDP semantics, nothing to do


class ProducerFlows:
    """Producer side of one UDP tunnel connection: flow id → a socket connected to the destination."""

    def __init__(
        self,
        tunnel: TlsChannel,
        destination: tuple[str, int],
        counters: Counters,
        idle: float,
        tracked: set[ProducerFlows],
    ) -> None:
        self._tunnel = tunnel
        self._tracked = tracked
        tracked.add(self)
        self._destination = destination
        self._counters = counters
        self._idle = idle
        self._decoder = DatagramDecoder()
        self._flows: dict[int, _FlowSocket] = {}
        self._batch = Batch()
        self._clock = IdleSweeper(idle, self._sweep)

    # ---- the TLS channel's protocol ----------------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            datagrams = self._decoder.feed(data)
        except WireError:
            self.close()
            return
        loop = asyncio.get_running_loop()
        for flow_id, payload in datagrams:
            flow = self._flows.get(flow_id)
            if flow is None:
                flow = self._flows[flow_id] = _FlowSocket(self, flow_id)
                self._counters.connections += 1
                self._counters.active += 1
                self._open_flow(loop, flow)
            flow.last_seen = loop.time()
            self._counters.bytes_out += len(payload)
            if flow.transport is not None:
                flow.transport.sendto(payload)
            elif len(flow.queued) < MAX_QUEUED:
                flow.queued.append(payload)
            else:
                self._counters.dropped_datagrams += 1

    def _open_flow(self, loop: asyncio.AbstractEventLoop, flow: _FlowSocket) -> None:
        task = asyncio.ensure_future(
            loop.create_datagram_endpoint(lambda: flow, remote_addr=self._destination)
        )
        task.add_done_callback(lambda t: self._created(t, flow))

    def _created(self, task: asyncio.Future[Any], flow: _FlowSocket) -> None:
        if task.cancelled() or task.exception() is not None:
            self._forget(flow.flow_id)
        elif self._flows.get(flow.flow_id) is not flow:
            task.result()[0].close()  # closed while being created

    def eof_received(self) -> None:
        self.close()

    def write_drained(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------

    def reply(self, flow_id: int, payload: bytes) -> None:
        channel = self._tunnel
        if channel.closed:
            return
        if channel.write_buffer_size > MAX_BACKLOG:
            self._counters.dropped_datagrams += 1  # the tunnel is backed up: drop, as UDP would
            return
        self._counters.bytes_in += len(payload)
        self._batch.add(channel, encode_datagram(flow_id, payload))

    def _sweep(self, now: float) -> None:
        for flow_id in [f for f, flow in self._flows.items() if now - flow.last_seen > self._idle]:
            self._forget(flow_id)

    def _forget(self, flow_id: int) -> None:
        flow = self._flows.pop(flow_id, None)
        if flow is not None:
            self._counters.active -= 1
            if flow.transport is not None:
                flow.transport.close()

    def close(self) -> None:
        self._tracked.discard(self)
        self._clock.cancel()
        for flow_id in list(self._flows):
            self._forget(flow_id)
        self._tunnel.abort()


class UdpEntry(asyncio.DatagramProtocol):
    """Consumer side: a UDP entry point; its flows share one TLS connection, opened on demand."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[TlsChannel]],
        header: bytes,
        counters: Counters,
        idle: float,
    ) -> None:
        self._connect = connect
        self._header = header
        self._counters = counters
        self._idle = idle
        self._ids = FlowIds()
        self._last_seen: dict[int, float] = {}
        self._decoder = DatagramDecoder()
        self._transport: asyncio.DatagramTransport | None = None
        self._tunnel: _UdpTunnel | None = None
        self._connecting: asyncio.Task[TlsChannel] | None = None
        self._queued: list[bytes] = []
        self._batch = Batch()
        self._clock: IdleSweeper | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        tune(transport)
        self._clock = IdleSweeper(self._idle, self._sweep)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow_id = self._ids.id_for(addr)
        if flow_id not in self._last_seen:
            self._counters.connections += 1
            self._counters.active += 1
        self._last_seen[flow_id] = asyncio.get_running_loop().time()
        try:
            frame = encode_datagram(flow_id, data)
        except WireError:
            self._counters.dropped_datagrams += 1
            return
        self._counters.bytes_in += len(data)
        tunnel = self._tunnel
        if tunnel is not None and not tunnel.channel.closed:
            if tunnel.channel.write_buffer_size > MAX_BACKLOG:
                self._counters.dropped_datagrams += 1
            else:
                self._batch.add(tunnel.channel, frame)
            return
        if len(self._queued) < MAX_QUEUED:
            self._queued.append(frame)
        else:
            self._counters.dropped_datagrams += 1
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[TlsChannel]) -> None:
        self._connecting = None
        if task.cancelled() or task.exception() is not None:
            self._counters.dropped_datagrams += len(self._queued)
            self._queued.clear()
            return
        channel = task.result()
        if self._transport is None or self._transport.is_closing():
            channel.abort()  # the entry point closed while the tunnel was being opened
            return
        self._tunnel = _UdpTunnel(self, channel)
        channel.write(b"".join([self._header, *self._queued]))
        self._queued.clear()
        channel.start(self._tunnel)

    def from_tunnel(self, data: bytes | memoryview) -> None:
        try:
            datagrams = self._decoder.feed(data)
        except WireError:
            self.tunnel_lost()
            return
        for flow_id, payload in datagrams:
            addr = self._ids.address_of(flow_id)
            if addr is None or self._transport is None:
                self._counters.dropped_datagrams += 1
                continue
            self._counters.bytes_out += len(payload)
            self._transport.sendto(payload, addr)  # type: ignore[arg-type]

    def tunnel_lost(self) -> None:
        tunnel, self._tunnel = self._tunnel, None
        self._decoder = DatagramDecoder()
        if tunnel is not None:
            tunnel.channel.abort()

    def _sweep(self, now: float) -> None:
        idle = [f for f, seen in self._last_seen.items() if now - seen > self._idle]
        for flow_id in idle:
            del self._last_seen[flow_id]
            self._counters.active -= 1
        self._ids.forget(idle)

    def close(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._counters.active -= len(self._last_seen)
        self._last_seen.clear()
        if self._connecting is not None:
            self._connecting.cancel()
        self.tunnel_lost()
        if self._transport is not None:
            self._transport.close()


class _UdpTunnel:
    """The consumer side's TLS channel of one UDP entry point (its protocol)."""

    def __init__(self, entry: UdpEntry, channel: TlsChannel) -> None:
        self.entry = entry
        self.channel = channel

    def data_received(self, data: memoryview) -> None:
        self.entry.from_tunnel(data)

    def eof_received(self) -> None:
        self.channel.abort()

    def write_drained(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.entry._tunnel is self:
            self.entry.tunnel_lost()
