"""The event-loop lag monitor: a histogram of how late the loop woke it, and a warning for stalls."""

import asyncio
import time

from appliance.looplag import BUCKETS, LagStats, LoopLagMonitor


def test_lags_fall_into_cumulative_buckets_and_the_maximum_is_kept() -> None:
    stats = LagStats()
    for lag in (0.0005, 0.003, 0.2, 7.0, 30.0):
        stats.observe(lag)
    cumulative = dict(stats.cumulative())
    assert cumulative["0.001"] == 1 and cumulative["0.005"] == 2 and cumulative["0.25"] == 3
    assert cumulative["10.0"] == 4 and cumulative["+Inf"] == 5 == stats.samples
    assert stats.max == 30.0 and len(stats.cumulative()) == len(BUCKETS) + 1


async def test_a_blocking_call_on_the_loop_shows_as_lag() -> None:
    monitor = LoopLagMonitor(interval=0.01)
    monitor.start()
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # what a slow handler does to every other task on the loop
    await asyncio.sleep(0.05)
    await monitor.stop()
    # A lower bound only: the blocked 0.3 s minus at most one interval cannot be missed.
    assert monitor.stats.max >= 0.25
