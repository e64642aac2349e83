"""Tunables of a relay, shared by both sides."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RelayConfig:
    """Settings of a RelayServer or RelayClient; the defaults suit a WAN link."""

    alpn: str = "scistream-quic/1"
    idle_timeout: float = 30.0  # QUIC idle timeout
    handshake_timeout: float = 10.0
    udp_flow_idle_timeout: float = 60.0  # a UDP flow's socket/mapping is closed after this
    max_stream_buffer: int = 4 * 1024 * 1024  # per-stream high watermark of unsent data, both directions
    max_datagram_size: int = 1350  # QUIC packet size
    connect_timeout: float = 10.0  # producer side: TCP connect to destination
