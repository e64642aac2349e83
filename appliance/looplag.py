"""How long the event loop is blocked: a task asks to wake every `interval` and records how late it
woke. Everything on the control port and the in-process data planes shares this loop, so a late wake-up
is a stall that every session felt (the 65 s one of issue 12 would show here as one 65 s sample)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
import time
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the lag histogram, in seconds (Prometheus buckets; +Inf is implied)."""

WARN_AFTER = 0.1
"""A lag over this (seconds) is logged as a warning."""


@dataclass
class LagStats:
    """Observed lags: a histogram over BUCKETS, their sum, count and maximum. Sans-I/O."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    samples: int = 0
    max: float = 0.0

    def observe(self, lag: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, lag)] += 1
        self.total += lag
        self.samples += 1
        self.max = max(self.max, lag)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, samples at or below it), Prometheus style, ending with +Inf."""
        running, out = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class LoopLagMonitor:
    """Runs on the loop it measures; `stats` may be read from another thread (the metrics endpoint)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.stats = LagStats()
        self.lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            cpu = time.thread_time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            with self.lock:
                self.stats.observe(lag)
            if lag > WARN_AFTER:
                # The loop thread's CPU time over the same span tells a stall we caused (CPU close to
                # the lag) from one the host caused (little CPU: the process was waiting to be scheduled).
                cpu_ms = round((time.thread_time() - cpu) * 1000)
                log.warning("event loop blocked", lag_ms=round(lag * 1000), loop_cpu_ms=cpu_ms)
