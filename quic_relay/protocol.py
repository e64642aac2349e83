"""asyncio glue shared by both relay sides: QUIC events to stream bridges and datagrams."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import NetworkAddress

from .bridge import StreamBridge
from .config import RelayConfig
from .connection import (
    MAX_PENDING_DATAGRAMS,
    RelayQuicConnection,
    max_datagram_payload,
    peer_certificate_der,
    pending_datagrams,
    stream_buffered,
)
from .counters import Counters
from .pmtu import PathMtuSearch, packet_size_for_mtu
from .udpio import DatagramSocket, route_mtu

logger = logging.getLogger("quic_relay")

CONNECTION_UNAUTHORIZED = 0x1  # application close code: peer certificate does not match the pin


def describe_close(event: events.ConnectionTerminated) -> str:
    """Human-readable reason of a connection close; TLS alerts use QUIC codes 0x100-0x1ff."""
    reason = event.reason_phrase or "no reason given"
    if 0x100 <= event.error_code <= 0x1FF and event.frame_type is not None:
        return f"TLS alert {event.error_code - 0x100}: {reason} (wrong pinned certificate or server name?)"
    return f"{reason} (error 0x{event.error_code:x})"


class RelayProtocol(QuicConnectionProtocol):
    """One QUIC connection of a relay. Subclasses handle new streams and datagrams.

    Nothing a peer sends on streams or in datagrams is acted on before the handshake completed
    and the peer certificate matched the pinned fingerprint (`authenticated`).
    """

    _quic: RelayQuicConnection

    def __init__(self, quic: RelayQuicConnection, *, config: RelayConfig, counters: Counters) -> None:
        super().__init__(quic)
        self.config = config
        self.counters = counters
        self.authenticated = False
        self.terminated = False
        self.close_reason = ""
        self._bridges: dict[int, StreamBridge] = {}
        self._send_watch: dict[int, StreamBridge] = {}
        self.packet_size = quic.packet_size
        self._batch_size = 0  # datagrams received since the last transmit
        self._app_writes: list[StreamBridge] = []  # bridges holding stream data for their app

    # pinning

    def expected_fingerprint(self) -> str | None:
        """SHA-256 fingerprint the peer certificate must have; None refuses every peer."""
        raise NotImplementedError

    def peer_fingerprint(self) -> str | None:
        der = peer_certificate_der(self._quic)
        return None if der is None else hashlib.sha256(der).hexdigest()

    def _check_peer(self) -> None:
        expected = self.expected_fingerprint()
        actual = self.peer_fingerprint()
        if expected is not None and actual == expected:
            self.authenticated = True
            self._start_path_mtu_search()
            return
        self.close_reason = "peer certificate not authorized" if actual else "peer sent no certificate"
        logger.warning("refusing QUIC peer: %s (fingerprint %s)", self.close_reason, actual)
        self.close(error_code=CONNECTION_UNAUTHORIZED, reason_phrase=self.close_reason)

    # packet size

    def _start_path_mtu_search(self) -> None:
        """Probe for larger packets, up to what the kernel's route to the peer allows."""
        base, cap = self.config.min_datagram_size, self.config.max_datagram_size
        if cap <= base or self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        peer = self._quic.peer_address
        mtu = route_mtu(sock.family, peer) if sock is not None and peer is not None else None
        ceiling = min(cap, packet_size_for_mtu(mtu)) if mtu is not None else base
        if ceiling > base:
            self._quic.path_mtu = PathMtuSearch(base=base, ceiling=ceiling)

    def packet_size_changed(self, size: int) -> None:
        """Packets are `size` bytes from now on (path MTU discovery or a black hole)."""
        logger.info("QUIC packet size now %d bytes", size)

    # events

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._check_peer()
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event)
        elif not self.authenticated:
            return  # nothing from an unauthenticated peer is acted on
        elif isinstance(event, events.StreamDataReceived):
            bridge = self._bridges.get(event.stream_id)
            if bridge is not None:
                bridge.stream_data(event.data, event.end_stream)
            else:
                self.unknown_stream_data(event)
        elif isinstance(event, events.StreamReset | events.StopSendingReceived):
            bridge = self._bridges.get(event.stream_id)
            if bridge is not None:
                bridge.abort()
            else:
                self.forget_stream(event.stream_id)
        elif isinstance(event, events.DatagramFrameReceived):
            self.datagram_frame_received(event.data)

    def unknown_stream_data(self, event: events.StreamDataReceived) -> None:
        """Data on a stream with no bridge: a new stream, or one already forgotten."""

    def datagram_frame_received(self, data: bytes) -> None:
        """A DATAGRAM frame from the authenticated peer."""

    def connection_terminated(self) -> None:
        """Called once when the QUIC connection has ended, after all bridges were aborted."""

    def _terminated(self, event: events.ConnectionTerminated) -> None:
        if self.terminated:
            return
        self.terminated = True
        if not self.close_reason:
            self.close_reason = describe_close(event)
        logger.info("QUIC connection ended: %s", self.close_reason)
        for bridge in list(self._bridges.values()):
            bridge.abort()
        self._bridges.clear()
        self._send_watch.clear()
        self.connection_terminated()

    # stream operations used by the bridges

    def register_stream(self, stream_id: int, bridge: StreamBridge) -> None:
        self._bridges[stream_id] = bridge

    def forget_stream(self, stream_id: int) -> None:
        self._bridges.pop(stream_id, None)
        self._send_watch.pop(stream_id, None)
        self._quic.receive_paused.discard(stream_id)

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self.terminated:
            return
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except ValueError as exc:  # stream already finished or reset
            logger.debug("stream %d: send failed: %s", stream_id, exc)
            return
        self._transmit_soon()

    def flush_later(self, bridge: StreamBridge) -> None:
        """`bridge` has stream data for its app: flush it at the next transmit (end of the batch)."""
        if not self._app_writes:
            self._transmit_soon()  # in case no batch is running (a timer, a direct call)
        self._app_writes.append(bridge)

    def stream_abort(self, stream_id: int, error_code: int) -> None:
        """Reset our sending half and ask the peer to stop sending."""
        if self.terminated:
            return
        for operation in (self._quic.reset_stream, self._quic.stop_stream):
            with contextlib.suppress(ValueError):  # that half is already finished
                operation(stream_id, error_code)
        self._transmit_soon()

    def stream_buffered(self, stream_id: int) -> int:
        return stream_buffered(self._quic, stream_id)

    def watch_send_buffer(self, stream_id: int, bridge: StreamBridge) -> None:
        """Resume `bridge` once the stream's send buffer is below half the high watermark."""
        self._send_watch[stream_id] = bridge

    def set_receive_paused(self, stream_id: int, paused: bool) -> None:
        """Freeze (or move again) the stream's receive window; see RelayQuicConnection."""
        if paused:
            self._quic.receive_paused.add(stream_id)
        elif stream_id in self._quic.receive_paused:
            self._quic.receive_paused.discard(stream_id)
            self._transmit_soon()

    def receive(self, data: bytes, addr: NetworkAddress) -> None:
        """One datagram of a batch (udpio.DatagramSocket): processed now, answered by the
        `transmit()` after the whole batch, so ACKs and data go out once per wake-up."""
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        self._batch_size += 1
        self._process_events()

    def transmit(self) -> None:
        # Called after every batch of received datagrams and timer: acknowledgements free send
        # buffers.
        writes, self._app_writes = self._app_writes, []
        for bridge in writes:
            bridge.flush_to_app()
        if self._batch_size > 1:
            self._quic.acknowledge_now(self._loop.time())
        self._batch_size = 0
        super().transmit()
        transport = self._transport
        if isinstance(transport, DatagramSocket):
            transport.flush()
        if self._quic.packet_size != self.packet_size:
            self.packet_size = self._quic.packet_size
            self.counters.dropped_datagrams += self._quic.dropped_on_shrink
            self._quic.dropped_on_shrink = 0
            self.packet_size_changed(self.packet_size)
        if not self._send_watch:
            return
        low = self.config.max_stream_buffer // 2
        for stream_id, bridge in list(self._send_watch.items()):
            if stream_buffered(self._quic, stream_id) <= low:
                del self._send_watch[stream_id]
                bridge.resume_reading()

    # datagrams

    def send_datagrams(self, frames: Sequence[bytes]) -> bool:
        """Queue the DATAGRAM frames of one UDP datagram, all or none.

        False (and one dropped datagram counted) if a frame is too big or the queue is too full:
        sending only some fragments would waste the link on a datagram the peer must drop.
        """
        if (
            self.terminated
            or any(len(frame) > max_datagram_payload(self.packet_size) for frame in frames)
            or pending_datagrams(self._quic) + len(frames) > MAX_PENDING_DATAGRAMS
        ):
            self.counters.dropped_datagrams += 1
            return False
        for frame in frames:
            self._quic.send_datagram_frame(frame)
        self._transmit_soon()
        return True

    def abort_streams(self) -> None:
        for bridge in list(self._bridges.values()):
            bridge.abort()
