"""`--mode auto` where WireGuard is not available: QUIC, falling back to TLS when QUIC cannot connect.

The producer side opens both data endpoints (QUIC first, then TLS) and admits the consumer side on
both. The consumer side tries the QUIC handshake; when it fails (UDP blocked on the path, most often)
it uses the TLS endpoint. Either way the session records which mode runs and why.
"""

from __future__ import annotations

from dataclasses import replace

from appliance.dataplane.base import ConsumerPlan, Counters, Driver, ProducerPlan, Tunnel
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode
from appliance.sessions.ports import PortAllocator

QUIC_HANDSHAKE_TIMEOUT = 4.0  # how long a consumer side waits for QUIC before it falls back to TLS


class _BothEndpoints(Tunnel):
    """Producer side: the QUIC and the TLS tunnels of one session."""

    def __init__(self, quic: Tunnel, tls: Tunnel) -> None:
        self._quic = quic
        self._tls = tls

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._quic.addresses + self._tls.addresses

    def counters(self) -> Counters:
        a, b = self._quic.counters(), self._tls.counters()
        return Counters(
            bytes_in=a.bytes_in + b.bytes_in,
            bytes_out=a.bytes_out + b.bytes_out,
            packet_size=a.packet_size or b.packet_size,
        )

    def authorize(self, peer_cert_pem: bytes) -> None:
        self._quic.authorize(peer_cert_pem)
        self._tls.authorize(peer_cert_pem)

    def peer_absent_for(self) -> float | None:
        """The consumer side uses one endpoint or the other: absent only while absent from both."""
        quic, tls = self._quic.peer_absent_for(), self._tls.peer_absent_for()
        return None if quic is None or tls is None else min(quic, tls)

    def mode_choice(self) -> tuple[Mode, str] | None:
        """Which endpoint the consumer side uses, as far as this side can tell: the one carrying traffic."""
        quic, tls = self._quic.addresses[0], self._tls.addresses[0]
        quic_used, tls_used = _carried(self._quic.counters()), _carried(self._tls.counters())
        if tls_used and not quic_used:
            return Mode.TLS, f"auto: the consumer side's traffic arrives at the TLS fallback, tcp {tls}"
        if quic_used and not tls_used:
            return Mode.QUIC, f"auto: the consumer side's traffic arrives over QUIC, udp {quic}"
        return Mode.AUTO, f"auto: QUIC at udp {quic}, TLS fallback at tcp {tls}; the consumer side chooses"

    async def close(self) -> None:
        try:
            await self._quic.close()
        finally:
            await self._tls.close()


def _carried(counters: Counters) -> bool:
    return counters.bytes_in > 0 or counters.bytes_out > 0


class _Chosen(Tunnel):
    """Consumer side: the tunnel that came up, with the mode it runs in and why."""

    def __init__(self, tunnel: Tunnel, mode: Mode, why: str) -> None:
        self._tunnel = tunnel
        self._choice = (mode, why)

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._tunnel.addresses

    def counters(self) -> Counters:
        return self._tunnel.counters()

    def peer_absent_for(self) -> float | None:
        return self._tunnel.peer_absent_for()

    def mode_choice(self) -> tuple[Mode, str] | None:
        return self._choice

    async def close(self) -> None:
        await self._tunnel.close()


class AutoDriver(Driver):
    mode = Mode.AUTO

    def __init__(self, quic: Driver, tls: Driver) -> None:
        self._quic = quic
        self._tls = tls

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        restored = plan.data_endpoints
        quic = await self._quic.open_producer(
            replace(plan, data_endpoints=restored[:1]), ports, advertise_host
        )
        try:
            tls_plan = replace(plan, data_endpoints=restored[1:2])
            tls = await self._tls.open_producer(tls_plan, ports, advertise_host)
        except BaseException:
            await quic.close()
            raise
        return _BothEndpoints(quic, tls)

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        if len(plan.data_endpoints) < 2:
            raise Unavailable("auto mode needs the producer side's QUIC and TLS data endpoints")
        quic_endpoint, tls_endpoint = plan.data_endpoints[:2]
        try:
            tunnel = await self._quic.open_consumer(
                replace(plan, data_endpoints=(quic_endpoint,)), ports, advertise_host
            )
        except Unavailable as exc:
            why = f"auto: QUIC to {quic_endpoint} failed ({exc.message}); fell back to TLS at {tls_endpoint}"
        else:
            return _Chosen(tunnel, Mode.QUIC, f"auto: QUIC to {quic_endpoint} works")
        tunnel = await self._tls.open_consumer(
            replace(plan, data_endpoints=(tls_endpoint,)), ports, advertise_host
        )
        return _Chosen(tunnel, Mode.TLS, why)
