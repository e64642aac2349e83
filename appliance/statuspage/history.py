"""Throughput of each session over the last minute, from the byte counters the appliance keeps.

Sans-I/O: `observe(now, sessions)` takes a snapshot of the counters and the time it was taken; the
rates are the differences between consecutive snapshots. Nothing here reads a clock or a socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.sessions.model import Session

DEFAULT_POINTS = 60


@dataclass(frozen=True)
class Rate:
    """Bits per second in and out over the interval that ended at `at` (Unix time)."""

    at: float
    bps_in: float
    bps_out: float


@dataclass(frozen=True)
class _Sample:
    at: float
    bytes_in: int
    bytes_out: int


def _bps(before: int, after: int, seconds: float) -> float:
    # Counters start again from zero when a tunnel is rebuilt (an appliance restart restores the
    # session): a fall is a restart, not negative traffic.
    return max(0, after - before) * 8 / seconds


class ThroughputHistory:
    """The last `points` rates of every session seen in the latest observation."""

    def __init__(self, points: int = DEFAULT_POINTS) -> None:
        if points < 1:
            raise ValueError("points must be at least 1")
        self._points = points
        self._samples: dict[str, _Sample] = {}
        self._rates: dict[str, deque[Rate]] = {}
        self._last: float | None = None  # time of the previous observation

    def observe(self, now: float, sessions: Iterable[Session]) -> None:
        """Records the counters of `sessions` at time `now`; forgets sessions that are not among them
        (ended and purged sessions stop costing memory). A `now` not after the previous one is ignored
        for a session, so a clock step back never yields an infinite or negative rate.

        A session created since the previous observation had zero bytes when it was created, so its
        first traffic counts from then: every byte a session carries shows in some rate."""
        seen: set[str] = set()
        for session in sessions:
            seen.add(session.session_id)
            sample = _Sample(now, session.bytes_in, session.bytes_out)
            previous = self._samples.get(session.session_id)
            if previous is None and self._last is not None and session.created_at >= self._last:
                previous = _Sample(session.created_at, 0, 0)
            if previous is not None and now <= previous.at:
                continue
            self._samples[session.session_id] = sample
            if previous is None:
                continue
            seconds = now - previous.at
            rates = self._rates.setdefault(session.session_id, deque(maxlen=self._points))
            rates.append(
                Rate(
                    now,
                    _bps(previous.bytes_in, sample.bytes_in, seconds),
                    _bps(previous.bytes_out, sample.bytes_out, seconds),
                )
            )
        self._last = now if self._last is None else max(self._last, now)
        for gone in self._samples.keys() - seen:
            del self._samples[gone]
            self._rates.pop(gone, None)

    def rates(self, session_id: str) -> list[Rate]:
        """Oldest first; empty until the session has been observed twice (once, if it was created
        since the observation before)."""
        return list(self._rates.get(session_id, ()))

    def __len__(self) -> int:
        return len(self._samples)
