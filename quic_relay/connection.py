"""aioquic QuicConnection tuned for the relay, and the only place that touches aioquic internals.

aioquic (1.7) lacks three things the relay needs, so this module reaches into private state,
each in one small function, so that an aioquic upgrade has one place to check:
- a server cannot ask for a client certificate except through the test-only
  `tls.Context._request_client_certificate` flag, and the peer certificate is only kept in
  `tls.Context._peer_certificate`;
- `send_stream_data` and `send_datagram_frame` buffer without limit, so pacing reads the
  stream sender's buffer and the pending-datagram queue;
- the stream receive window doubles whenever half of it is used, whatever the application has
  consumed, so it cannot apply backpressure; `_write_stream_limits` is replaced by a fixed
  sliding window that stops moving while the stream's consumer is paused;
- stateless resets (RFC 9000 §10.3) are neither sent nor recognized, so a client whose server
  restarted waits out the idle timeout: the server's reset tokens are derived from a key that
  survives a restart, and the client checks incoming datagrams for them;
- packets have one fixed size and there is no path MTU discovery, while aioquic's cost is per
  packet: the connection sends padded PING probes of the sizes `PathMtuSearch` (pmtu.py) asks
  for, outside the congestion window, and moves the packet size of the builder, the congestion
  controller and the pacer to the largest size the peer acknowledged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
from typing import Any

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import RelayConfig
from .identity import Identity
from .pmtu import PathMtuSearch

MAX_DATAGRAM_FRAME_SIZE = 65536
# Room left in a QUIC packet for header, AEAD tag, ACK and DATAGRAM framing; a DATAGRAM frame
# larger than what fits in one packet would stay at the head of aioquic's queue forever.
_DATAGRAM_OVERHEAD = 100
# Pending DATAGRAM frames kept before new ones are dropped (UDP semantics: loss over delay).
MAX_PENDING_DATAGRAMS = 1024
PACING_BURST = 0.002  # seconds of sending the pacer may do at once: twice epoll's 1 ms granularity
RESET_TOKEN_SIZE = 16
MIN_RESET_SIZE = 21  # RFC 9000 §10.3: 5 unpredictable bytes before the token, at least


def make_configuration(
    *,
    is_client: bool,
    identity: Identity,
    config: RelayConfig,
    server_name: str | None = None,
    server_cert_pem: bytes | None = None,
) -> QuicConfiguration:
    """QUIC/TLS 1.3 settings for one side; a client pins `server_cert_pem` as its only CA."""
    quic_config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[config.alpn],
        idle_timeout=config.idle_timeout,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=config.min_datagram_size,
        max_stream_data=config.max_stream_buffer,
        max_data=4 * config.max_stream_buffer,
        server_name=server_name,
        congestion_control_algorithm="cubic",
    )
    quic_config.certificate = x509.load_pem_x509_certificate(identity.cert_pem)
    quic_config.private_key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if is_client:
        quic_config.cadata = server_cert_pem
        quic_config.verify_mode = ssl.CERT_REQUIRED
    return quic_config


def max_datagram_payload(packet_size: int) -> int:
    """Largest DATAGRAM frame payload (relay header included) that fits in one packet of this size."""
    return packet_size - _DATAGRAM_OVERHEAD


def reset_key_of(identity: Identity) -> bytes:
    """The server's stateless-reset key: secret (from its private key) and the same after a restart,
    since a restored session keeps its identity."""
    return hmac.new(identity.key_pem, b"scistream quic stateless reset", hashlib.sha256).digest()


def reset_token(key: bytes, cid: bytes) -> bytes:
    return hmac.new(key, cid, hashlib.sha256).digest()[:RESET_TOKEN_SIZE]


def stateless_reset(key: bytes, cid: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset answering a `trigger_size`-byte packet for the unknown connection id `cid`;
    None when the trigger is too small to answer with a smaller packet (which keeps two endpoints
    from resetting each other forever, and the answer from amplifying anything)."""
    size = min(trigger_size - 1, 41)
    if size < MIN_RESET_SIZE:
        return None
    head = bytearray(os.urandom(size - RESET_TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)  # looks like a short-header packet
    return bytes(head) + reset_token(key, cid)


class RelayQuicConnection(QuicConnection):
    """QuicConnection with client-certificate requests, a pausable stream receive window and
    stateless resets."""

    def __init__(
        self, *, configuration: QuicConfiguration, reset_key: bytes | None = None, **kwargs: Any
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self.receive_window = configuration.max_stream_data
        # streams whose consumer (a TCP socket) has too much unsent data: their window is frozen
        self.receive_paused: set[int] = set()
        self._reset_key = None if configuration.is_client else reset_key
        if self._reset_key is not None:
            first = self._host_cids[0]  # its token goes out in the transport parameters
            first.stateless_reset_token = reset_token(self._reset_key, first.cid)
        # set by the protocol once the handshake is done and the route MTU known
        self.path_mtu: PathMtuSearch | None = None
        self.dropped_on_shrink = 0  # DATAGRAM frames dropped because the packet size fell; see protocol
        self._watch_large_packets()
        self._pace_in_timer_steps()

    # path MTU discovery

    @property
    def peer_address(self) -> NetworkAddress | None:
        return self._network_paths[0].addr if self._network_paths else None

    @property
    def packet_size(self) -> int:
        """Size of the packets sent now (UDP payload)."""
        return self._max_datagram_size

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = super().datagrams_to_send(now)
        search = self.path_mtu
        if search is not None and self._handshake_confirmed and self._state not in END_STATES:
            size = search.next_probe(now)
            if size is not None:
                datagrams += self._mtu_probe(size, now)
        return datagrams

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        # Two probe timeouts in a row while sending packets larger than the base: nothing at all
        # comes back, those packets are vanishing (RFC 8899 §4.3, black hole).
        if self._loss._pto_count >= 2:
            self._black_hole(now)

    def _black_hole(self, now: float) -> None:
        """Back to the base size, which every path carries; the search resumes a little later."""
        search = self.path_mtu
        if search is None or search.current <= search.base:
            return
        # Packets in flight above the base will never arrive: give their data back to be sent again
        # in base-size packets now, rather than one per probe timeout, with an exponential backoff.
        space = self._spaces[tls.Epoch.ONE_RTT]
        stranded = [p for p in space.sent_packets.values() if p.sent_bytes > search.base]
        if stranded:
            self._loss._on_packets_lost(packets=stranded, space=space, now=now, congestion_event=False)
        self._loss._pto_count = 0
        search.black_hole(now)
        self._use_packet_size(search.current)
        self._large_losses = 0

    def _pace_in_timer_steps(self) -> None:
        """Lets the pacer's burst allowance cover the event loop's timer granularity.

        aioquic's pacer allows bursts of at most 16 packets, then asks to be woken some microseconds
        later; asyncio's epoll waits at least a millisecond, so a sender alone on its loop sent 16
        packets per millisecond whatever the congestion window (186 Mbit/s at 1,452 bytes). With
        `PACING_BURST` seconds of credit, a wake-up a millisecond late still finds the credit to send
        at the pacing rate; bursts stay within what the rate allows over that time."""
        pacer: Any = self._loss._pacer
        update_rate = pacer.update_rate

        def paced(*, congestion_window: int, smoothed_rtt: float) -> None:
            update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
            pacer.bucket_max = max(pacer.bucket_max, PACING_BURST)

        pacer.update_rate = paced

    def _watch_large_packets(self) -> None:
        """Counts data packets above the base size that were lost while no large packet sent after
        them was acknowledged: when smaller packets still get through (ACKs, control traffic), that
        is a black hole too, even though probe timeouts never fire. Losses behind a large packet
        that did arrive are congestion, not a path limit."""
        self._large_losses = 0
        self._last_large_acked = -1
        recovery: Any = self._loss
        cc: Any = recovery._cc
        on_packets_lost, on_packet_acked = recovery._on_packets_lost, cc.on_packet_acked
        base = self._configuration.max_datagram_size

        def acked(*, packet: Any, now: float) -> None:
            if packet.sent_bytes > base and packet.packet_number > self._last_large_acked:
                self._last_large_acked = packet.packet_number
            on_packet_acked(packet=packet, now=now)

        def lost(*, packets: Any, space: Any, now: float, congestion_event: bool = True, **kw: Any) -> None:
            packets = list(packets)
            if congestion_event:  # not a PTO's retransmission of data that may well have arrived
                for packet in packets:
                    if (
                        packet.in_flight
                        and packet.sent_bytes > base
                        and packet.packet_number > self._last_large_acked
                    ):
                        self._large_losses += 1
            on_packets_lost(packets=packets, space=space, now=now, congestion_event=congestion_event, **kw)
            if self._large_losses >= 3:
                self._black_hole(now)

        cc.on_packet_acked = acked
        recovery._on_packets_lost = lost

    def acknowledge_now(self, now: float) -> None:
        """Let the next `datagrams_to_send` carry the pending 1-RTT ACK instead of waiting for
        aioquic's 1 ms delayed-ACK timer: the relay calls it after a batch of two or more packets
        (RFC 9000 §13.2.2 asks for an ACK after every second one), so there is one ACK per batch."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _mtu_probe(self, size: int, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """One PING padded to `size` bytes, its loss not counted as congestion (RFC 8899 §4.4)."""
        crypto = self._cryptos[tls.Epoch.ONE_RTT]
        if not crypto.send.is_valid() or self._version is None:
            return []
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        builder.start_frame(
            QuicFrameType.PING, capacity=1, handler=self._on_mtu_probe_delivery, handler_args=(size,)
        )
        builder._datagram_needs_padding = True  # pads the 1-RTT packet to the datagram's size
        datagrams, packets = builder.flush()
        self._packet_number = builder.packet_number
        for packet in packets:
            packet.sent_time = now
            packet.in_flight = False
            self._loss.on_packet_sent(packet=packet, space=self._spaces[packet.epoch])
        addr = self._network_paths[0].addr
        return [(datagram, addr) for datagram in datagrams]

    def _on_mtu_probe_delivery(self, delivery: QuicDeliveryState, size: int) -> None:
        search = self.path_mtu
        if search is None:
            return
        if delivery == QuicDeliveryState.ACKED:
            search.probe_acknowledged(size)
            if search.current > self._max_datagram_size:
                self._use_packet_size(search.current)
        else:
            search.probe_lost(size)

    def _use_packet_size(self, size: int) -> None:
        """Packets from now on are `size` bytes: the builder, congestion control and pacer agree."""
        self._max_datagram_size = size
        loss = self._loss
        loss._pacer._max_datagram_size = size
        cc: Any = loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):  # cubic's Reno-friendly growth
            cc.additive_increase_factor = size
        limit = max_datagram_payload(size)
        pending = self._datagrams_pending
        if any(len(frame) > limit for frame in pending):
            # frames queued for the larger size would never fit a packet again (UDP: lose them)
            kept = [frame for frame in pending if len(frame) <= limit]
            self.dropped_on_shrink += len(pending) - len(kept)
            pending.clear()
            pending.extend(kept)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        if self._reset_key is not None:
            for cid in self._host_cids:
                if not cid.was_sent:
                    cid.stateless_reset_token = reset_token(self._reset_key, cid.cid)

    def is_stateless_reset(self, data: bytes) -> bool:
        """Whether `data` is a stateless reset from the peer: a short-header datagram ending in a token
        the peer issued (RFC 9000 §10.3.1)."""
        if len(data) < MIN_RESET_SIZE or data[0] & 0x80:
            return False
        tail = data[-RESET_TOKEN_SIZE:]
        tokens = [c.stateless_reset_token for c in (self._peer_cid, *self._peer_cid_available)]
        return any(token and hmac.compare_digest(tail, token) for token in tokens)

    def reset_by_peer(self, now: float) -> None:
        """Ends the connection after a stateless reset: draining, nothing more is sent (§10.3.1)."""
        if self._close_event is None:
            self._close_event = events.ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase="stateless reset"
            )
        self._close_begin(is_initiator=False, now=now)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic only sends a CertificateRequest when this private flag is set; the peer
            # certificate is then checked against the pinned fingerprint after the handshake.
            self.tls._request_client_certificate = True

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        stream_id = stream.stream_id
        if stream_id is None or not stream.max_stream_data_local or stream_id in self.receive_paused:
            return
        received = stream.receiver.highest_offset
        if stream.max_stream_data_local - received < self.receive_window // 2:
            stream.max_stream_data_local = received + self.receive_window
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def stream_buffered(conn: QuicConnection, stream_id: int) -> int:
    """Bytes aioquic holds for sending on `stream_id` (unsent plus unacknowledged)."""
    stream = conn._streams.get(stream_id)
    return 0 if stream is None else len(stream.sender._buffer)


def pending_datagrams(conn: QuicConnection) -> int:
    """DATAGRAM frames queued in aioquic and not yet sent."""
    return len(conn._datagrams_pending)


def peer_certificate_der(conn: QuicConnection) -> bytes | None:
    """DER certificate the peer presented in the handshake, if any."""
    cert = conn.tls._peer_certificate
    return None if cert is None else cert.public_bytes(serialization.Encoding.DER)
