"""Packetization-layer path MTU discovery (RFC 8899, for QUIC as in RFC 9000 §14.3), sans I/O.

aioquic sends every packet at one fixed size. Its cost is per packet, so the relay wants packets as
large as the path carries: 8,952 bytes instead of 1,200 is about ten times the throughput per core.
`PathMtuSearch` decides which probe size to try next and which size is confirmed; the connection
sends the probes (PING + PADDING, not counted against the congestion window) and reports whether
the peer acknowledged them. Time is passed in.

The search starts at the largest size the route allows (the kernel's route MTU less IP and UDP
headers) because on science networks that size usually works, then bisects between the largest
confirmed and the smallest failed size. A probe size fails after `MAX_PROBES` losses in a row. When
packets of the confirmed size stop arriving (a black hole), the size drops back to the base at once
and the search starts again after `BLACK_HOLE_HOLD`. A search that ended below the ceiling tries
the ceiling again every `RAISE_INTERVAL`, in case the path got better.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_SIZE = 1200  # RFC 9000 §14: every QUIC path must carry this
HEADER_OVERHEAD = 48  # IPv6 + UDP; also used for IPv4, so a size means the same on either family
MAX_PROBES = 3  # RFC 8899 MAX_PROBES
RAISE_INTERVAL = 600.0  # RFC 8899 PMTU_RAISE_TIMER: try larger sizes again this long after a search
BLACK_HOLE_HOLD = 1.0  # after a black hole, carry data at the base size this long before searching
SEARCH_GRANULARITY = 32  # stop bisecting when confirmed and failed sizes are this close


def packet_size_for_mtu(mtu: int) -> int:
    """The largest QUIC packet (UDP payload) a link of `mtu` bytes carries."""
    return mtu - HEADER_OVERHEAD


@dataclass
class PathMtuSearch:
    """Which packet size is confirmed for a path, and which size to probe next."""

    base: int = BASE_SIZE
    ceiling: int = BASE_SIZE  # largest size worth trying: route MTU and configured cap
    current: int = field(init=False)  # largest size acknowledged on this path
    in_flight: int | None = field(default=None, init=False)  # size of the probe awaiting an answer
    black_holes: int = field(default=0, init=False)
    _failed: int = field(init=False)  # smallest size known not to get through
    _losses: int = field(default=0, init=False)  # losses in a row of the size being probed
    _resume_at: float | None = field(default=None, init=False)  # search paused until then
    _completed_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.base)
        self.current = self.base
        self._failed = self.ceiling + 1

    @property
    def searching(self) -> bool:
        return self._failed - self.current > SEARCH_GRANULARITY

    def next_probe(self, now: float) -> int | None:
        """The size to probe now, or None (a probe is in flight, or the search is over or paused)."""
        if self.in_flight is not None:
            return None
        if not self.searching:
            if self._completed_at is None:
                self._completed_at = now
            if self._failed > self.ceiling or now < self._completed_at + RAISE_INTERVAL:
                return None
            self._failed = self.ceiling + 1  # the path may carry more now: try the ceiling again
        self._completed_at = None
        if self._resume_at is not None:
            if now < self._resume_at:
                return None
            self._resume_at = None
        # the first try (and its retries) is the route's own MTU; after that, bisect
        size = self.ceiling if self._failed > self.ceiling else (self.current + self._failed) // 2
        self.in_flight = size
        return size

    def probe_acknowledged(self, size: int) -> None:
        if size == self.in_flight:
            self.in_flight = None
        self._losses = 0
        if size > self.current:
            self.current = min(size, self._failed - 1)

    def probe_lost(self, size: int) -> None:
        if size == self.in_flight:
            self.in_flight = None
        if size <= self.current:
            return  # smaller than what the path has confirmed since: not a path limit
        self._losses += 1
        if self._losses >= MAX_PROBES:
            self._failed = min(self._failed, size)
            self._losses = 0

    def black_hole(self, now: float) -> None:
        """Packets of the confirmed size stopped arriving: back to the base, search again later."""
        self.black_holes += 1
        self.current = self.base
        self.in_flight = None
        self._losses = 0
        self._failed = self.ceiling + 1
        self._completed_at = None
        self._resume_at = now + BLACK_HOLE_HOLD
