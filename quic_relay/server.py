"""Producer side: accepts the pinned client's QUIC connection and connects to destinations."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from aioquic._buffer import Buffer  # aioquic.buffer re-exports it without __all__
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from .bridge import BAD_STREAM_HEADER, DESTINATION_UNREACHABLE, StreamBridge
from .config import RelayConfig
from .connection import (
    RelayQuicConnection,
    make_configuration,
    max_datagram_payload,
    reset_key_of,
    stateless_reset,
)
from .counters import Counters
from .errors import FramingError
from .framing import StreamTracker, decode_stream_header
from .identity import Identity, fingerprint_of
from .protocol import CONNECTION_UNAUTHORIZED, RelayProtocol
from .udp import UDP_RECEIVE_BUFFER, ServerFlowTable, raise_buffers
from .udpio import DatagramSocket, open_socket

logger = logging.getLogger("quic_relay")

_MAX_CONNECTIONS = 64  # QUIC connections (mostly unauthenticated attempts) held at once


class _ServerProtocol(RelayProtocol):
    """One client connection: new streams become TCP connections, datagrams UDP flows."""

    def __init__(self, quic: RelayQuicConnection, server: RelayServer) -> None:
        super().__init__(quic, config=server.config, counters=server.counters)
        self.server = server
        self._tracker = StreamTracker(first_stream_id=0)  # client-initiated bidirectional ids
        self._headers: dict[int, bytearray] = {}
        self._connects: set[asyncio.Task[None]] = set()
        self._flows = ServerFlowTable(
            server.destinations,
            server.counters,
            server.config.udp_flow_idle_timeout,
            max_datagram_payload(self.packet_size),
            self.send_datagrams,
        )

    def expected_fingerprint(self) -> str | None:
        return self.server.allowed_fingerprint

    def unknown_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        if stream_id % 4 != 0:
            return  # the client only opens bidirectional streams
        pending = self._headers.get(stream_id)
        if pending is None:
            if not self._tracker.is_new(stream_id):
                return  # late data on a stream already closed here
            pending = self._headers[stream_id] = bytearray()
        pending += event.data
        try:
            parsed = decode_stream_header(pending)
            if parsed is None and event.end_stream:
                raise FramingError("stream ended inside its header")
        except FramingError as exc:
            logger.warning("stream %d: %s", stream_id, exc)
            self._refuse_stream(stream_id, BAD_STREAM_HEADER)
            return
        if parsed is not None:
            del self._headers[stream_id]
            dest_index, header_size = parsed
            self._open_stream(stream_id, dest_index, bytes(pending[header_size:]), event.end_stream)

    def _open_stream(self, stream_id: int, dest_index: int, data: bytes, end_stream: bool) -> None:
        if not 0 <= dest_index < len(self.server.destinations):
            logger.warning("stream %d: no destination with index %d", stream_id, dest_index)
            self._refuse_stream(stream_id, DESTINATION_UNREACHABLE)
            return
        bridge = StreamBridge(self.counters, self.config.max_stream_buffer, link=self, stream_id=stream_id)
        self.register_stream(stream_id, bridge)
        self.set_receive_paused(stream_id, True)  # no more data than one window until connected
        bridge.stream_data(data, end_stream)
        task = asyncio.get_running_loop().create_task(self._connect(bridge, dest_index))
        self._connects.add(task)
        task.add_done_callback(self._connects.discard)

    async def _connect(self, bridge: StreamBridge, dest_index: int) -> None:
        host, port = self.server.destinations[dest_index]
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(lambda: bridge, host, port),
                self.config.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            logger.warning("connect to destination %s:%d failed: %s", host, port, exc or "timeout")
            assert bridge.stream_id is not None
            self._refuse_stream(bridge.stream_id, DESTINATION_UNREACHABLE)

    def _refuse_stream(self, stream_id: int, error_code: int) -> None:
        self.stream_abort(stream_id, error_code)
        self.forget_stream(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        super().forget_stream(stream_id)
        self._headers.pop(stream_id, None)

    def datagram_frame_received(self, data: bytes) -> None:
        self._flows.from_peer(data)

    def packet_size_changed(self, size: int) -> None:
        super().packet_size_changed(size)
        self._flows.codec.max_frame = max_datagram_payload(size)

    def shutdown(self) -> None:
        """Drop every stream, flow and pending connect of this connection."""
        for task in list(self._connects):
            task.cancel()
        self.abort_streams()
        self._flows.close()

    def connection_terminated(self) -> None:
        self.shutdown()
        self.server.forget(self)


class _Endpoint:
    """The server's UDP socket: routes QUIC packets to connections by connection id.

    aioquic's own `serve()` cannot be used because it always builds a plain QuicConnection. Each
    connection that received packets in one wake-up of the socket transmits once, after all of them.
    """

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.transport: DatagramSocket | None = None
        self.dropped = 0  # packets that are not QUIC or belong to no connection
        self._by_cid: dict[bytes, _ServerProtocol] = {}
        self._touched: set[_ServerProtocol] = set()

    def open(self, sock: socket.socket) -> None:
        config = self.server.config
        self.transport = DatagramSocket(sock, self.receive, self.received_all, gso=config.gso, gro=config.gro)

    def receive(self, data: bytes, addr: Any) -> None:
        config = self.server.quic_config
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=config.connection_id_length)
        except ValueError:
            self.dropped += 1
            return
        protocol = self._by_cid.get(header.destination_cid)
        if protocol is None and header.packet_type == QuicPacketType.ONE_RTT:
            # A connection this process does not know, e.g. from before a restart: tell the client
            # with a stateless reset, so it reconnects now instead of after its idle timeout.
            self.dropped += 1
            reset = stateless_reset(self.server.reset_key, header.destination_cid, len(data))
            if reset is not None and self.transport is not None:
                self.transport.sendto(reset, addr)
            return
        if protocol is None:
            if (
                header.packet_type != QuicPacketType.INITIAL
                or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
                or header.version not in config.supported_versions
                or len(self.server.protocols) >= _MAX_CONNECTIONS
            ):
                self.dropped += 1
                return
            protocol = self._accept(header.destination_cid)
        try:
            protocol.receive(data, addr)
        except Exception:  # one bad packet must never take the endpoint down
            logger.exception("error handling a QUIC packet from %s", addr)
        self._touched.add(protocol)

    def received_all(self) -> None:
        touched, self._touched = self._touched, set()
        for protocol in touched:
            protocol.transmit()
        if self.transport is not None:
            self.transport.flush()  # stateless resets

    def _accept(self, original_cid: bytes) -> _ServerProtocol:
        assert self.transport is not None
        quic = RelayQuicConnection(
            configuration=self.server.quic_config,
            original_destination_connection_id=original_cid,
            reset_key=self.server.reset_key,
        )
        protocol = _ServerProtocol(quic, self.server)
        protocol.connection_made(self.transport)
        protocol._connection_id_issued_handler = partial(self._cid_issued, protocol=protocol)
        protocol._connection_id_retired_handler = self._cid_retired
        self._by_cid[original_cid] = protocol
        self._by_cid[quic.host_cid] = protocol
        self.server.protocols.add(protocol)
        asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self._check_handshake, protocol
        )
        return protocol

    def _cid_issued(self, cid: bytes, protocol: _ServerProtocol) -> None:
        self._by_cid[cid] = protocol

    def _cid_retired(self, cid: bytes) -> None:
        self._by_cid.pop(cid, None)

    def _check_handshake(self, protocol: _ServerProtocol) -> None:
        if not protocol.authenticated and not protocol.terminated:
            logger.info("QUIC handshake timed out")
            protocol.close(error_code=CONNECTION_UNAUTHORIZED, reason_phrase="handshake timeout")
            protocol.shutdown()
            self.server.forget(protocol)

    def forget(self, protocol: _ServerProtocol) -> None:
        for cid in [cid for cid, proto in self._by_cid.items() if proto is protocol]:
            del self._by_cid[cid]


class RelayServer:
    """Producer side of a relay: one UDP port, the pinned client, a list of destinations."""

    def __init__(
        self,
        *,
        identity: Identity,
        server_name: str,
        destinations: Sequence[tuple[str, int]],
        config: RelayConfig,
    ) -> None:
        self.config = config
        self.server_name = server_name
        self.destinations = list(destinations)
        self.quic_config: QuicConfiguration = make_configuration(
            is_client=False, identity=identity, config=config
        )
        self.reset_key = reset_key_of(identity)
        self.allowed_fingerprint: str | None = None
        self.protocols: set[_ServerProtocol] = set()
        self._counters = Counters()
        self._peer_absent_since = time.monotonic()
        self._endpoint = _Endpoint(self)
        self._closed = False

    @classmethod
    async def start(
        cls,
        *,
        host: str,
        port: int,
        identity: Identity,
        server_name: str,
        destinations: Sequence[tuple[str, int]],
        config: RelayConfig | None = None,
        sock: socket.socket | None = None,
    ) -> RelayServer:
        """Bind the UDP port (or take `sock`, bound already) and start accepting. No client is
        accepted before `authorize()`."""
        server = cls(
            identity=identity,
            server_name=server_name,
            destinations=destinations,
            config=config or RelayConfig(),
        )
        if sock is None:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
            sock = open_socket(infos[0][4], infos[0][0])
        sock.setblocking(False)
        raise_buffers(sock, UDP_RECEIVE_BUFFER, send=True)
        server._endpoint.open(sock)
        logger.info("relay server listening on %s:%d", *server.local_address)
        return server

    def authorize(self, peer_cert_pem: bytes) -> None:
        """Accept only a client presenting exactly this certificate; replaces any earlier one.

        Connections already open with another certificate are closed.
        """
        self.allowed_fingerprint = fingerprint_of(peer_cert_pem)
        self._peer_absent_since = time.monotonic()  # the authorized client is expected from now on
        for protocol in list(self.protocols):
            if protocol.authenticated and protocol.peer_fingerprint() != self.allowed_fingerprint:
                protocol.close(error_code=CONNECTION_UNAUTHORIZED, reason_phrase="authorization replaced")
                protocol.shutdown()

    @property
    def local_address(self) -> tuple[str, int]:
        assert self._endpoint.transport is not None
        sockname = self._endpoint.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def packet_size(self) -> int | None:
        """Size of the QUIC packets sent to the authorized client now; None without a connection."""
        sizes = [p.packet_size for p in self.protocols if p.authenticated and not p.terminated]
        return max(sizes) if sizes else None

    @property
    def peer_absent_since(self) -> float | None:
        """`time.monotonic()` since when no authorized client connection has been open (counted from
        start or `authorize()`); None while one is. A dead client's connection counts until the idle
        timeout ends it."""
        if any(p.authenticated and not p.terminated for p in self.protocols):
            return None
        return self._peer_absent_since

    def forget(self, protocol: _ServerProtocol) -> None:
        if protocol in self.protocols and protocol.authenticated:
            self._peer_absent_since = time.monotonic()
        self.protocols.discard(protocol)
        self._endpoint.forget(protocol)

    async def close(self) -> None:
        """Close QUIC connections, the UDP socket and every TCP/UDP socket to destinations."""
        if self._closed:
            return
        self._closed = True
        for protocol in list(self.protocols):
            protocol.close()  # sends CONNECTION_CLOSE right away
            protocol.shutdown()
            self.forget(protocol)
        if self._endpoint.transport is not None:
            self._endpoint.transport.close()
        await asyncio.sleep(0)  # let transports finish closing
        logger.info("relay server closed")
