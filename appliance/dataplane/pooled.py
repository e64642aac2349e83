"""A tunnel whose relays run in relay processes (WorkerPool): TLS and QUIC modes."""

from __future__ import annotations

import time

from appliance.dataplane.base import Counters, Tunnel
from appliance.dataplane.tlsrelay.pool import WorkerPool
from appliance.sessions.model import Address


class PooledTunnel(Tunnel):
    """One side of a session whose relays run in the processes of a WorkerPool."""

    def __init__(
        self, pool: WorkerPool, session_id: str, addresses: tuple[Address, ...], *, consumer: bool
    ) -> None:
        self._pool = pool
        self._session_id = session_id
        self._addresses = addresses
        self._closed = False
        # The producer side expects its peer once it is authorized; the consumer side at once.
        self._expecting_since: float | None = time.monotonic() if consumer else None

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._addresses

    def counters(self) -> Counters:
        values = self._pool.counters(self._session_id)
        return Counters(
            bytes_in=values[0], bytes_out=values[1], packet_size=self._pool.gauge(self._session_id)
        )

    def authorize(self, peer_cert_pem: bytes) -> None:
        self._pool.authorize(self._session_id, peer_cert_pem)
        self._expecting_since = time.monotonic()

    def peer_absent_for(self) -> float | None:
        """Since a relay process last saw the peer side: a connection open, made or accepted, or a
        probe (TLS mode's consumer side probes every `probe_interval` while no connection is made)."""
        if self._closed or self._expecting_since is None:
            return None
        seen = max(self._pool.peer_seen(self._session_id), self._expecting_since)
        return time.monotonic() - seen

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close_session(self._session_id)
