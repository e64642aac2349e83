"""Prometheus metrics: sessions by state and bytes per direction, computed at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from appliance.auth import Principal
from appliance.looplag import LoopLagMonitor
from appliance.sessions.manager import SYSTEM, SessionManager
from appliance.sessions.model import State


class SessionCollector(Collector):
    def __init__(self, manager: SessionManager, principal: Principal = SYSTEM) -> None:
        self._manager = manager
        self._principal = principal

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sessions = self._manager.list(self._principal)
        by_state = Counter(s.state for s in sessions)
        gauge = GaugeMetricFamily("scistream_sessions", "Sessions known to this appliance", labels=["state"])
        for state in State:
            gauge.add_metric([state.value], by_state.get(state, 0))
        yield gauge
        traffic = CounterMetricFamily(
            "scistream_session_bytes", "Bytes carried by sessions still on record", labels=["direction"]
        )
        traffic.add_metric(["in"], sum(s.bytes_in for s in sessions))
        traffic.add_metric(["out"], sum(s.bytes_out for s in sessions))
        yield traffic


class LoopLagCollector(Collector):
    def __init__(self, monitor: LoopLagMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with self._monitor.lock:
            stats = self._monitor.stats
            buckets, total, peak = stats.cumulative(), stats.total, stats.max
        yield HistogramMetricFamily(
            "scistream_event_loop_lag_seconds",
            "How late the event loop woke a task that slept a fixed interval (time it was blocked)",
            buckets=buckets,
            sum_value=total,
        )
        yield GaugeMetricFamily(
            "scistream_event_loop_lag_max_seconds", "The largest event-loop lag since start", value=peak
        )


def serve_metrics(manager: SessionManager, host: str, port: int, lag: LoopLagMonitor | None = None) -> None:
    """Starts the /metrics HTTP endpoint in a background thread."""
    registry = CollectorRegistry()
    registry.register(SessionCollector(manager))
    if lag is not None:
        registry.register(LoopLagCollector(lag))
    start_http_server(port, addr=host, registry=registry)
