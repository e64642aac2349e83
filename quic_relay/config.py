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
    # QUIC packet sizes (UDP payload). Connections start at the minimum, which every QUIC path
    # carries, and path MTU discovery (pmtu.py) raises it to what the path carries, up to the
    # maximum: 1,452 on a 1,500-byte path, 8,952 on a 9,000-byte one. aioquic's cost is per packet,
    # so this is the first lever on throughput. UDP datagrams above what one packet carries are
    # fragmented by the relay.
    min_datagram_size: int = 1200
    max_datagram_size: int = 8952
    gso: bool = True  # send runs of packets with one UDP_SEGMENT sendmsg where the kernel can
    gro: bool = True  # receive them coalesced (UDP_GRO) where the kernel can
    connect_timeout: float = 10.0  # producer side: TCP connect to destination
    # Client: send from a port of this lane (lanes.py), so that a server running one process per
    # lane serves this connection in its own process. None: any port.
    lane: int | None = None
