"""One session's relay inside a relay process: the producer side's TLS data endpoint, or the consumer
side's entry points. Both are built from sockets the control process bound and handed over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from . import contexts
from .relay import Counters, Leg, Splice
from .udp import ProducerFlows, UdpEntry
from .wire import MAX_HEADER_SIZE, Kind, WireError, decode_header, encode_header

logger = logging.getLogger("scistream.tlsrelay")

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
BACKLOG = 4096


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


class _Acceptor(Leg):
    """Producer side: one accepted TLS connection, until its header is read; then a tunnel leg."""

    def __init__(self, relay: ProducerRelay) -> None:
        super().__init__()
        self.relay = relay
        self._header = bytearray()
        self._flows: ProducerFlows | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        fingerprint = contexts.peer_fingerprint(transport.get_extra_info("ssl_object"))
        if not self.relay.allowed or fingerprint != self.relay.allowed:
            self.reject("not the session's consumer side")
            return
        self.relay.legs.add(self)

    def reject(self, why: str) -> None:
        self.relay.counters.rejected += 1
        logger.info("session %s: refused a tunnel connection: %s", self.relay.spec.session_id, why)
        self.close(abort=True)

    def data_received(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(self, data)
        elif self._flows is not None:
            self._flows.received(data)
        else:
            self._read_header(data)

    def _read_header(self, data: bytes) -> None:
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
        rest = bytes(self._header[size:])
        self._header.clear()
        destinations = self.relay.spec.destinations
        if not 0 <= header.dest_index < len(destinations):
            self.reject(f"no destination with index {header.dest_index}")
            return
        destination = destinations[header.dest_index]
        if header.kind is Kind.UDP:
            self._flows = ProducerFlows(self, destination, self.relay.counters, self.relay.spec.udp_idle)
            if rest:
                self._flows.received(rest)
            return
        splice = Splice(self.relay.counters, self.relay.splices, tunnel=self)
        splice.tunnel_ready()
        if rest:
            splice.from_tunnel(rest)
        self.relay.connect(splice, destination)

    def eof_received(self) -> bool:
        if self.splice is None:
            self.close(abort=True)
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.legs.discard(self)
        if self._flows is not None:
            self._flows.close()
        super().connection_lost(exc)


class ProducerRelay:
    """The session's data endpoint: TLS 1.3, only the pinned consumer side, then destinations."""

    def __init__(self, spec: ProducerSpec, counters: Counters) -> None:
        self.spec = spec
        self.counters = counters
        self.ctx = contexts.server_context(spec.cert_pem, spec.key_pem)
        self.allowed = ""
        self.splices: set[Splice] = set()
        self.legs: set[_Acceptor] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._connects: set[asyncio.Task[Any]] = set()
        if spec.peer_cert_pem:
            self.authorize(spec.peer_cert_pem)

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Acceptor(self),
            sock=sock,
            ssl=self.ctx,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            backlog=BACKLOG,
        )
        self._servers.append(server)

    def authorize(self, peer_cert_pem: bytes) -> None:
        contexts.trust(self.ctx, peer_cert_pem)
        self.allowed = contexts.fingerprint_of_pem(peer_cert_pem)

    def connect(self, splice: Splice, destination: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        coro = loop.create_connection(lambda: splice.plain, *destination)
        task = loop.create_task(asyncio.wait_for(coro, CONNECT_TIMEOUT))
        self._connects.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._connects.discard(t)
            if t.cancelled() or t.exception() is not None:
                splice.abort()

        task.add_done_callback(done)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connects):
            task.cancel()
        for splice in list(self.splices):
            splice.abort()
        for leg in list(self.legs):
            leg.close(abort=True)


class ConsumerRelay:
    """The session's entry points: each TCP connection (or UDP entry point) gets a TLS connection."""

    def __init__(self, spec: ConsumerSpec, counters: Counters) -> None:
        self.spec = spec
        self.counters = counters
        self.ctx = contexts.client_context(spec.cert_pem, spec.key_pem, spec.peer_cert_pem)
        self.expected = contexts.fingerprint_of_pem(spec.peer_cert_pem)
        self.splices: set[Splice] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._entries: list[UdpEntry] = []
        self._connects: set[asyncio.Future[Any]] = set()

    async def start(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock, index in zip(socks, self.spec.dest_indexes, strict=True):
            header = encode_header(self.spec.kind, index)
            if self.spec.kind is Kind.UDP:
                entry = UdpEntry(self._connect, header, self.counters, self.spec.udp_idle)
                await loop.create_datagram_endpoint(lambda e=entry: e, sock=sock)  # type: ignore[misc]
                self._entries.append(entry)
            else:
                server = await loop.create_server(
                    lambda h=header: self._accept(h),  # type: ignore[misc]
                    sock=sock,
                    backlog=BACKLOG,
                )
                self._servers.append(server)

    def _accept(self, header: bytes) -> Leg:
        splice = Splice(self.counters, self.splices)

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                splice.abort()
            else:
                splice.tunnel_ready(header)

        self._connect(splice.tunnel).add_done_callback(done)
        return splice.plain

    def _connect(self, leg: Leg) -> asyncio.Future[Any]:
        """Opens a TLS connection to the data endpoint for `leg`; fails unless the peer is the pinned one."""
        loop = asyncio.get_running_loop()
        host, port = self.spec.endpoint
        future = asyncio.ensure_future(self._open(loop, leg, host, port))
        self._connects.add(future)
        future.add_done_callback(self._connects.discard)
        return future

    async def _open(self, loop: asyncio.AbstractEventLoop, leg: Leg, host: str, port: int) -> None:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: leg,
                host,
                port,
                ssl=self.ctx,
                server_hostname=self.spec.server_name,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ),
            CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
        )
        if contexts.peer_fingerprint(transport.get_extra_info("ssl_object")) != self.expected:
            transport.abort()
            raise ConnectionError("the data endpoint presented another certificate")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for future in list(self._connects):
            future.cancel()
        for entry in self._entries:
            entry.close()
        for splice in list(self.splices):
            splice.abort()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
