"""UDP over one TLS connection: datagram frames with flow ids (wire.py), one socket per flow at the
producer side, idle flows forgotten on both sides."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

from quic_relay.udp import IdleSweeper

from .relay import Counters, Leg, tune
from .wire import DatagramDecoder, FlowIds, WireError, encode_datagram

MAX_QUEUED = 256  # datagrams held while a tunnel or flow socket is being set up
Send = Callable[[bytes], None]


class Batch:
    """Datagram frames bound for one TLS transport, written once per event-loop turn: a TLS record
    (and a send) then carries many datagrams instead of one each."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._transport: asyncio.WriteTransport | None = None

    def add(self, transport: asyncio.WriteTransport, frame: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self._frames.append(frame)
        self._transport = transport

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        transport = self._transport
        if frames and transport is not None and not transport.is_closing():
            transport.write(b"".join(frames))


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

    def __init__(self, tunnel: Leg, destination: tuple[str, int], counters: Counters, idle: float) -> None:
        self._tunnel = tunnel
        self._destination = destination
        self._counters = counters
        self._idle = idle
        self._decoder = DatagramDecoder()
        self._flows: dict[int, _FlowSocket] = {}
        self._batch = Batch()
        self._clock = IdleSweeper(idle, self._sweep)

    def received(self, data: bytes) -> None:
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

    def reply(self, flow_id: int, payload: bytes) -> None:
        transport = self._tunnel.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > 4 * 1024 * 1024:
            self._counters.dropped_datagrams += 1  # the tunnel is backed up: drop, as UDP would
            return
        self._counters.bytes_in += len(payload)
        self._batch.add(transport, encode_datagram(flow_id, payload))

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
        self._clock.cancel()
        for flow_id in list(self._flows):
            self._forget(flow_id)
        self._tunnel.close(abort=True)


class UdpEntry(asyncio.DatagramProtocol):
    """Consumer side: a UDP entry point; its flows share one TLS connection, opened on demand."""

    def __init__(
        self,
        connect: Callable[[Leg], asyncio.Future[Any]],
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
        tunnel = self._tunnel_leg()
        transport = tunnel.transport
        if tunnel.ready and transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size() > 4 * 1024 * 1024:
                self._counters.dropped_datagrams += 1
            else:
                self._batch.add(transport, frame)
        elif len(self._queued) < MAX_QUEUED:
            self._queued.append(frame)
        else:
            self._counters.dropped_datagrams += 1

    def _tunnel_leg(self) -> _UdpTunnel:
        if self._tunnel is None:
            tunnel = self._tunnel = _UdpTunnel(self)
            self._connect(tunnel).add_done_callback(lambda f: self._connected(f, tunnel))
        return self._tunnel

    def _connected(self, future: asyncio.Future[Any], tunnel: _UdpTunnel) -> None:
        if future.cancelled() or future.exception() is not None or tunnel.transport is None:
            self._counters.dropped_datagrams += len(self._queued)
            self._queued.clear()
            if self._tunnel is tunnel:
                self._tunnel = None
            return
        tunnel.ready = True
        tunnel.transport.writelines([self._header, *self._queued])
        self._queued.clear()

    def from_tunnel(self, data: bytes) -> None:
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
            tunnel.close(abort=True)

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
        self.tunnel_lost()
        if self._transport is not None:
            self._transport.close()


class _UdpTunnel(Leg):
    """The consumer side's TLS connection of one UDP entry point."""

    def __init__(self, entry: UdpEntry) -> None:
        super().__init__()
        self.entry = entry
        self.ready = False

    def data_received(self, data: bytes) -> None:
        self.entry.from_tunnel(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.entry._tunnel is self:
            self.entry.tunnel_lost()


def close_quietly(transport: asyncio.BaseTransport | None) -> None:
    with contextlib.suppress(Exception):
        if transport is not None:
            transport.close()
