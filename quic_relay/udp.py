"""UDP over QUIC DATAGRAM frames: flow tables of the consumer and producer sides."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .counters import Counters
from .framing import DatagramFrame, encode_datagram

logger = logging.getLogger("quic_relay")

Address = tuple[Any, ...]
_MAX_QUEUED_BEFORE_CONNECT = 64  # datagrams kept while a producer-side flow socket is created


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


# consumer side


class UdpEntry(asyncio.DatagramProtocol):
    """A UDP entry point: each source address is one flow towards `dest_index`."""

    def __init__(self, flows: ClientFlowTable, dest_index: int) -> None:
        self.flows = flows
        self.dest_index = dest_index
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.flows.from_app(self, addr, data)


@dataclass
class _ClientFlow:
    flow_id: int
    entry: UdpEntry
    addr: Address
    last_seen: float


class ClientFlowTable:
    """Maps (entry point, source address) to flow ids and back; idle mappings expire."""

    def __init__(self, counters: Counters, idle_timeout: float, send: Callable[[bytes], None]) -> None:
        self._counters = counters
        self._idle_timeout = idle_timeout
        self._send = send
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
        self._send(encode_datagram(flow.flow_id, entry.dest_index, payload))

    def from_peer(self, frame: DatagramFrame) -> None:
        flow = self._by_id.get(frame.flow_id)
        if flow is None or flow.entry.transport is None:
            self._counters.dropped_datagrams += 1
            return
        flow.last_seen = self._loop.time()
        flow.entry.transport.sendto(frame.payload, flow.addr)
        self._counters.bytes_out += len(frame.payload)

    def expire(self, now: float) -> None:
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
        self.table.counters.opened()
        queue, self.queue = self.queue, []
        for payload in queue:
            self.send(payload)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        self.table.counters.bytes_in += len(data)
        self.table.send(encode_datagram(self.flow_id, self.dest_index, data))

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
        send: Callable[[bytes], object],
    ) -> None:
        self.destinations = destinations
        self.counters = counters
        self.send = send
        self._idle_timeout = idle_timeout
        self._flows: dict[int, _ServerFlow] = {}
        self._sweeper = IdleSweeper(idle_timeout, self.expire)

    def from_peer(self, frame: DatagramFrame) -> None:
        flow = self._flows.get(frame.flow_id)
        if flow is None:
            if not 0 <= frame.dest_index < len(self.destinations):
                self.counters.dropped_datagrams += 1
                return
            flow = _ServerFlow(self, frame.flow_id, frame.dest_index)
            self._flows[frame.flow_id] = flow
            flow.task = asyncio.get_running_loop().create_task(self._open(flow))
        flow.send(frame.payload)

    async def _open(self, flow: _ServerFlow) -> None:
        host, port = self.destinations[flow.dest_index]
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: flow, remote_addr=(host, port))
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

    def expire(self, now: float) -> None:
        for flow in [f for f in self._flows.values() if now - f.last_seen > self._idle_timeout]:
            self.discard(flow)
            flow.close()

    def close(self) -> None:
        self._sweeper.cancel()
        for flow in list(self._flows.values()):
            self.discard(flow)
            flow.close()
