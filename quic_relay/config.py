"""Tunables of a relay, shared by both sides."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RelayConfig:
    """Settings of a RelayServer or RelayClient; the defaults suit a WAN link."""

    alpn: str = "scistream-quic/2"  # /2: UDP datagrams may be fragmented (framing.py)
    idle_timeout: float = 30.0  # QUIC idle timeout
    handshake_timeout: float = 10.0
    udp_flow_idle_timeout: float = 60.0  # a UDP flow's socket/mapping is closed after this
    max_stream_buffer: int = 4 * 1024 * 1024  # per-stream high watermark of unsent data, both directions
    # QUIC packet size (UDP payload). A 1,500-byte MTU would allow 1,452 (IPv6) or 1,472 (IPv4), but
    # aioquic does no path MTU discovery: on a tunnelled or PPPoE WAN path every larger packet would
    # be lost. UDP datagrams above what one packet carries are fragmented by the relay anyway.
    max_datagram_size: int = 1350
    connect_timeout: float = 10.0  # producer side: TCP connect to destination
