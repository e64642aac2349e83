"""One session's relay inside a relay process: the producer side's TLS data endpoint, or the consumer
side's entry points. Both are built from sockets the control process bound and handed over."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from . import channel as channels
from . import contexts
from .channel import Acceptor, TlsChannel
from .relay import Counters, TcpPump
from .udp import ProducerFlows, UdpEntry
from .wire import MAX_HEADER_SIZE, Kind, WireError, decode_header, encode_header

logger = logging.getLogger("scistream.tlsrelay")

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
FAILED = (OSError, TimeoutError, ValueError)  # ssl.SSLError and ConnectionError are OSErrors


@dataclass(frozen=True)
class ProducerSpec:
    session_id: str
    cert_pem: bytes
    key_pem: bytes
    destinations: tuple[tuple[str, int], ...]
    peer_cert_pem: bytes = b""
    udp_idle: float = 60.0


@dataclass(frozen=True)
class ConsumerSpec:
    session_id: str
    cert_pem: bytes
    key_pem: bytes
    peer_cert_pem: bytes
    server_name: str
    endpoint: tuple[str, int]
    kind: Kind
    dest_indexes: tuple[int, ...] = field(default=())  # one per entry socket, in order
    udp_idle: float = 60.0
    probe_interval: float = 10.0  # seconds without a tunnel connection before one is made to probe


class _Opening:
    """Producer side: an accepted TLS connection from the consumer side, until its header is read."""

    def __init__(self, relay: ProducerRelay, channel: TlsChannel) -> None:
        self.relay = relay
        self.channel = channel
        self._header = bytearray()

    def data_received(self, data: memoryview) -> None:
        self._header += data
        try:
            parsed = decode_header(self._header)
        except WireError as exc:
            self.reject(str(exc))
            return
        if parsed is None:
            if len(self._header) > MAX_HEADER_SIZE:
                self.reject("header too long")
            return
        header, size = parsed
        early = bytes(self._header[size:])
        destinations = self.relay.spec.destinations
        if not 0 <= header.dest_index < len(destinations):
            self.reject(f"no destination with index {header.dest_index}")
            return
        self.relay.openings.discard(self)
        self.relay.opened(self.channel, header.kind, destinations[header.dest_index], early)

    def reject(self, why: str) -> None:
        self.relay.reject(why)
        self.channel.abort()

    def eof_received(self) -> None:
        self.channel.abort()

    def write_drained(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay.openings.discard(self)


class _Tasks:
    """Connection set-ups in flight, cancelled when the session's relay closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class ProducerRelay:
    """The session's data endpoint: TLS 1.3, only the pinned consumer side, then destinations."""

    def __init__(self, spec: ProducerSpec, counters: Counters) -> None:
        self.spec = spec
        self.counters = counters
        self.ctx = contexts.server_context(spec.cert_pem, spec.key_pem)
        self.allowed = ""
        self.pumps: set[TcpPump] = set()
        self.flows: set[ProducerFlows] = set()
        self.openings: set[_Opening] = set()
        self._acceptors: list[Acceptor] = []
        self._tasks = _Tasks()
        self.peer_seen = 0.0  # time.monotonic() of the consumer side's last authenticated connection
        if spec.peer_cert_pem:
            self.authorize(spec.peer_cert_pem)

    async def start(self, sock: socket.socket) -> None:
        self._acceptors.append(Acceptor(sock, self._accepted))

    def authorize(self, peer_cert_pem: bytes) -> None:
        contexts.trust(self.ctx, peer_cert_pem)
        self.allowed = contexts.fingerprint_of_pem(peer_cert_pem)

    def reject(self, why: str) -> None:
        self.counters.rejected += 1
        logger.info("session %s: refused a tunnel connection: %s", self.spec.session_id, why)

    def _accepted(self, raw: socket.socket) -> None:
        try:
            sock = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except FAILED:
            raw.close()
            return
        self._tasks.start(self._handshake(sock))

    async def _handshake(self, sock: ssl.SSLSocket) -> None:
        try:
            channel = await channels.handshake(sock, HANDSHAKE_TIMEOUT)
        except FAILED as exc:
            sock.close()
            self.reject(f"TLS handshake failed: {exc}")
            return
        except BaseException:
            sock.close()
            raise
        if not self.allowed or channel.peer_fingerprint != self.allowed:
            self.reject("not the session's consumer side")
            channel.abort()
            return
        self.peer_seen = time.monotonic()
        opening = _Opening(self, channel)
        self.openings.add(opening)
        channel.start(opening)

    def opened(self, channel: TlsChannel, kind: Kind, destination: tuple[str, int], early: bytes) -> None:
        """A connection header named `destination`: UDP flows or one TCP connection to it."""
        if kind is Kind.UDP:
            flows = ProducerFlows(channel, destination, self.counters, self.spec.udp_idle, self.flows)
            channel.start(flows)
            if early:
                flows.data_received(memoryview(early))
            return
        channel.pause_reading(holding=False)  # until the destination answers; `early` is a copy
        self._tasks.start(self._connect(channel, destination, early))

    async def _connect(self, channel: TlsChannel, destination: tuple[str, int], early: bytes) -> None:
        try:
            plain = await channels.connect_tcp(*destination, CONNECT_TIMEOUT)
        except FAILED as exc:
            logger.info("session %s: destination %s:%s: %s", self.spec.session_id, *destination, exc)
            channel.abort()
            return
        except BaseException:
            channel.abort()
            raise
        TcpPump(plain, self.counters, self.pumps).attach(channel, early=early)

    async def close(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._tasks.cancel()
        for pump in list(self.pumps):
            pump.abort()
        for flows in list(self.flows):
            flows.close()
        for opening in list(self.openings):
            opening.channel.abort()


class ConsumerRelay:
    """The session's entry points: each TCP connection (or UDP entry point) gets a TLS connection."""

    def __init__(self, spec: ConsumerSpec, counters: Counters) -> None:
        self.spec = spec
        self.counters = counters
        self.ctx = contexts.client_context(spec.cert_pem, spec.key_pem, spec.peer_cert_pem)
        self.expected = contexts.fingerprint_of_pem(spec.peer_cert_pem)
        self.pumps: set[TcpPump] = set()
        self._acceptors: list[Acceptor] = []
        self._entries: list[UdpEntry] = []
        self._tasks = _Tasks()
        self.peer_seen = 0.0  # time.monotonic() of the last connection the producer side accepted

    async def start(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock, index in zip(socks, self.spec.dest_indexes, strict=True):
            header = encode_header(self.spec.kind, index)
            if self.spec.kind is Kind.UDP:
                entry = UdpEntry(self.connect, header, self.counters, self.spec.udp_idle)
                await loop.create_datagram_endpoint(lambda e=entry: e, sock=sock)  # type: ignore[misc]
                self._entries.append(entry)
            else:
                self._acceptors.append(Acceptor(sock, lambda raw, h=header: self._accepted(raw, h)))  # type: ignore[misc]
        if self.spec.probe_interval > 0:
            self._tasks.start(self._probe())

    async def _probe(self) -> None:
        """TLS mode has no connection that lives as long as the session, so while no tunnel connection
        is made, one is made to probe: a handshake with the pinned data endpoint, then a clean close.
        It tells this side the producer side is there, and shows the producer side this side is."""
        interval = self.spec.probe_interval
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.peer_seen < interval:
                continue  # a tunnel connection proved it already
            try:
                channel = await self.connect()
            except FAILED as exc:
                logger.info("session %s: probe of the data endpoint failed: %s", self.spec.session_id, exc)
                continue
            channel.close()

    def _accepted(self, raw: socket.socket, header: bytes) -> None:
        pump = TcpPump(raw, self.counters, self.pumps)  # the app's bytes wait in the kernel meanwhile
        self._tasks.start(self._tunnel(pump, header))

    async def _tunnel(self, pump: TcpPump, header: bytes) -> None:
        try:
            channel = await self.connect()
        except FAILED as exc:
            logger.info("session %s: tunnel connection failed: %s", self.spec.session_id, exc)
            pump.abort()
            return
        except BaseException:
            pump.abort()
            raise
        pump.attach(channel, header=header)

    async def connect(self) -> TlsChannel:
        """A TLS connection to the data endpoint; fails unless the peer is the pinned one."""
        host, port = self.spec.endpoint
        channel = await channels.connect(
            self.ctx, host, port, self.spec.server_name, CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT
        )
        if channel.peer_fingerprint != self.expected:
            channel.abort()
            raise ConnectionError("the data endpoint presented another certificate")
        self.peer_seen = time.monotonic()
        return channel

    async def close(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._tasks.cancel()
        for entry in self._entries:
            entry.close()
        for pump in list(self.pumps):
            pump.abort()
