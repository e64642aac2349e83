"""Consumer side: entry points for local apps, one pinned QUIC connection to the producer side."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from .bridge import StreamBridge
from .config import RelayConfig
from .connection import RelayQuicConnection, make_configuration, max_datagram_payload
from .counters import Counters
from .errors import RelayError
from .framing import encode_stream_header
from .identity import Identity, fingerprint_of
from .protocol import RelayProtocol
from .udp import UDP_RECEIVE_BUFFER, ClientFlowTable, UdpEntry, raise_buffers
from .udpio import DatagramSocket, open_socket

logger = logging.getLogger("quic_relay")

# After the connection ends, reconnect attempts start this soon and back off to this interval, so a
# restarted producer side sees its client again without waiting for a new TCP connection or datagram.
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 5.0


class _ClientProtocol(RelayProtocol):
    def __init__(self, quic: RelayQuicConnection, client: RelayClient) -> None:
        super().__init__(quic, config=client.config, counters=client.counters)
        self.client = client
        self._keepalive: asyncio.TimerHandle | None = None

    def start_keepalive(self) -> None:
        """PING every third of the idle timeout: an idle but healthy link stays up, while an
        outage still ends the connection after the idle timeout (no packets come back)."""
        self._keepalive = self._loop.call_later(self.config.idle_timeout / 3, self._send_keepalive)

    def _send_keepalive(self) -> None:
        if self.terminated:
            return
        self._quic.send_ping(0)
        self.transmit()
        self.start_keepalive()

    def expected_fingerprint(self) -> str | None:
        return self.client.server_fingerprint

    def receive(self, data: bytes, addr: Any) -> None:
        if self._quic.is_stateless_reset(data):
            # The server forgot this connection (it restarted): end it now rather than after the
            # idle timeout, so the client reconnects at once.
            logger.info("relay server reset the connection (it restarted?); reconnecting")
            self._quic.reset_by_peer(now=self._loop.time())
            return  # the batch's transmit() arms the timer that ends the draining period
        super().receive(data, addr)

    def datagram_frame_received(self, data: bytes) -> None:
        self.client.flows.from_peer(data)

    def packet_size_changed(self, size: int) -> None:
        super().packet_size_changed(size)
        if self.client.current_protocol is self:
            self.client.flows.codec.max_frame = max_datagram_payload(size)

    def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def connection_terminated(self) -> None:
        self.stop_keepalive()
        self.client.connection_ended(self)

    def open_stream(self, bridge: StreamBridge, dest_index: int) -> None:
        stream_id = self._quic.get_next_available_stream_id()
        bridge.attach(self, stream_id, encode_stream_header(dest_index))


class RelayClient:
    """Consumer side of a relay. Reconnects (same identity and pin) after the QUIC connection ended,
    in the background with backoff and at once when a new TCP connection arrives; streams of the dead
    connection are closed."""

    def __init__(
        self,
        *,
        server: tuple[str, int],
        server_name: str,
        identity: Identity,
        server_cert_pem: bytes,
        config: RelayConfig,
    ) -> None:
        self.config = config
        self.server = server
        self.server_fingerprint = fingerprint_of(server_cert_pem)
        self.quic_config = make_configuration(
            is_client=True,
            identity=identity,
            config=config,
            server_name=server_name,
            server_cert_pem=server_cert_pem,
        )
        self._counters = Counters()
        self.flows = ClientFlowTable(
            self._counters,
            config.udp_flow_idle_timeout,
            max_datagram_payload(config.min_datagram_size),
            self._send_datagram,
        )
        self._protocol: _ClientProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RECONNECT_FIRST_DELAY
        self._absent_since: float | None = None
        self._waiting: list[tuple[StreamBridge, int]] = []  # accepted while reconnecting
        self._tcp_servers: list[asyncio.Server] = []
        self._udp_entries: list[UdpEntry] = []
        self._closed = False

    @classmethod
    async def start(
        cls,
        *,
        server: tuple[str, int],
        server_name: str,
        identity: Identity,
        server_cert_pem: bytes,
        config: RelayConfig | None = None,
        wait: bool = True,
    ) -> RelayClient:
        """Connect to the producer side; RelayError if the handshake fails or times out.

        With `wait=False` (a restarted appliance restoring its session) nothing is awaited: the client
        connects in the background, retrying with backoff, and counts as absent until it has connected.
        """
        client = cls(
            server=server,
            server_name=server_name,
            identity=identity,
            server_cert_pem=server_cert_pem,
            config=config or RelayConfig(),
        )
        if not wait:
            client._absent_since = time.monotonic()
            client._start_reconnect()
            return client
        try:
            await client._connect()
        except BaseException:
            client.flows.close()
            raise
        return client

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.server
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise RelayError(f"cannot resolve relay server {host}:{port}: {exc}") from exc
        family, addr = infos[0][0], infos[0][4]
        local: tuple[str, int] = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        quic = RelayQuicConnection(configuration=self.quic_config)
        protocol = _ClientProtocol(quic, self)
        sock = open_socket(local, family, lane=self.config.lane)
        raise_buffers(sock, UDP_RECEIVE_BUFFER, send=True)
        transport = DatagramSocket(
            sock, protocol.receive, protocol.transmit, gso=self.config.gso, gro=self.config.gro
        )
        protocol.connection_made(transport)
        try:
            await asyncio.wait_for(self._handshake(protocol, addr), self.config.handshake_timeout)
        except (ConnectionError, TimeoutError, RelayError) as exc:
            reason = protocol.close_reason or ("timed out" if isinstance(exc, TimeoutError) else str(exc))
            protocol.close()
            transport.close()
            raise RelayError(f"QUIC handshake with relay server {host}:{port} failed: {reason}") from exc
        except BaseException:
            protocol.close()
            transport.close()
            raise
        self._protocol, self._transport = protocol, transport
        self.flows.codec.max_frame = max_datagram_payload(protocol.packet_size)
        self._absent_since = None
        self._retry_delay = RECONNECT_FIRST_DELAY
        # The new server connection numbers its fragments afresh: never mix them with old ones.
        self.flows.codec.forget_fragments()
        protocol.start_keepalive()
        logger.info("connected to relay server %s:%d", host, port)

    @staticmethod
    async def _handshake(protocol: _ClientProtocol, addr: Any) -> None:
        protocol.connect(addr)
        await protocol.wait_connected()
        if not protocol.authenticated:
            raise RelayError(protocol.close_reason)
        # The server checks our certificate after its side of the handshake; a round trip
        # tells whether it accepted us.
        await protocol.ping()

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def current_protocol(self) -> _ClientProtocol | None:
        return self._protocol

    @property
    def packet_size(self) -> int | None:
        """Size of the QUIC packets sent now; None while not connected."""
        return self._protocol.packet_size if self.connected and self._protocol is not None else None

    @property
    def connected(self) -> bool:
        protocol = self._protocol
        return protocol is not None and protocol.authenticated and not protocol.terminated

    @property
    def peer_absent_since(self) -> float | None:
        """`time.monotonic()` since when the client has had no connection to the server; None while
        it has one."""
        return None if self.connected else self._absent_since

    async def add_tcp_entry(
        self, host: str, port: int, dest_index: int, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Listen on host:port (or on `sock`, bound and listening already); each connection is
        relayed to destination `dest_index`."""

        def make_bridge() -> StreamBridge:
            return StreamBridge(
                self._counters,
                self.config.max_stream_buffer,
                on_connected=lambda bridge: self._attach(bridge, dest_index),
            )

        loop = asyncio.get_running_loop()
        if sock is None:
            server = await loop.create_server(make_bridge, host, port)
        else:
            server = await loop.create_server(make_bridge, sock=sock)
        self._tcp_servers.append(server)
        sockname = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def add_udp_entry(
        self, host: str, port: int, dest_index: int, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Bind a UDP socket on host:port (or use `sock`, bound already); each source address is one
        flow to `dest_index`."""
        if sock is None:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )
            sock = open_socket(infos[0][4], infos[0][0])
        sock.setblocking(False)
        entry = UdpEntry(self.flows, dest_index, sock)
        self._udp_entries.append(entry)
        sockname = entry.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def _attach(self, bridge: StreamBridge, dest_index: int) -> None:
        if self.connected and self._protocol is not None:
            self._protocol.open_stream(bridge, dest_index)
            return
        assert bridge.transport is not None
        bridge.transport.pause_reading()
        self._waiting.append((bridge, dest_index))
        self._start_reconnect()

    def _send_datagram(self, frames: list[bytes]) -> None:
        if self.connected and self._protocol is not None:
            self._protocol.send_datagrams(frames)
        else:
            self._counters.dropped_datagrams += 1
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._closed or (self._reconnect is not None and not self._reconnect.done()):
            return
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_now())

    def _schedule_reconnect(self, delay: float) -> None:
        if self._closed:
            return
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(delay, self._start_reconnect)

    async def _reconnect_now(self) -> None:
        logger.info("reconnecting to relay server %s:%d", *self.server)
        tried_for = len(self._waiting)
        try:
            await self._connect()
        except RelayError as exc:
            logger.warning("%s", exc)
            # Connections that waited through this whole attempt are refused; those that arrived
            # during it get a fresh attempt right away.
            stale, self._waiting = self._waiting[:tried_for], self._waiting[tried_for:]
            for bridge, _ in stale:
                bridge.abort()
            self._schedule_reconnect(0 if self._waiting else self._retry_delay)
            self._retry_delay = min(2 * self._retry_delay, RECONNECT_MAX_DELAY)
            return
        waiting, self._waiting = self._waiting, []
        for bridge, dest_index in waiting:
            if not bridge.done and self._protocol is not None:
                self._protocol.open_stream(bridge, dest_index)

    def connection_ended(self, protocol: _ClientProtocol) -> None:
        """The QUIC connection terminated: its streams are aborted; forget it."""
        if protocol is self._protocol:
            self._protocol = None
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            self._absent_since = time.monotonic()
            self._schedule_reconnect(RECONNECT_FIRST_DELAY)

    async def close(self) -> None:
        """Close entry points, relayed sockets and the QUIC connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._reconnect is not None:
            self._reconnect.cancel()
        for server in self._tcp_servers:
            server.close()
        for entry in self._udp_entries:
            entry.transport.close()
        self.flows.close()
        for bridge, _ in self._waiting:
            bridge.abort()
        self._waiting.clear()
        protocol, transport = self._protocol, self._transport
        self._protocol, self._transport = None, None
        if protocol is not None:
            protocol.stop_keepalive()
            protocol.abort_streams()
            protocol.close()  # sends CONNECTION_CLOSE right away
        if transport is not None:
            transport.close()
        for server in self._tcp_servers:
            await server.wait_closed()
        logger.info("relay client closed")
