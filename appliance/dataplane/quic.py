"""QUIC mode: one `quic_relay` connection per session, TCP as streams and UDP as DATAGRAM frames."""

from __future__ import annotations

import socket
import time

from appliance.dataplane.base import ConsumerPlan, Counters, Driver, ProducerPlan, Tunnel
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator
from quic_relay import Identity, RelayClient, RelayConfig, RelayError, RelayServer

WILDCARDS = ("0.0.0.0", "::", "")


def _seconds_since(moment: float | None) -> float | None:
    return None if moment is None else time.monotonic() - moment


def public(host: str, port: int, advertise_host: str) -> Address:
    """The address a peer or user reaches a socket bound to `host:port` at."""
    return Address(advertise_host if host in WILDCARDS else host, port)


class _ProducerTunnel(Tunnel):
    def __init__(self, server: RelayServer, endpoint: Address) -> None:
        self._server = server
        self._endpoint = endpoint

    @property
    def addresses(self) -> tuple[Address, ...]:
        return (self._endpoint,)

    def counters(self) -> Counters:
        c = self._server.counters
        return Counters(bytes_in=c.bytes_in, bytes_out=c.bytes_out, packet_size=self._server.packet_size or 0)

    def authorize(self, peer_cert_pem: bytes) -> None:
        self._server.authorize(peer_cert_pem)

    def peer_absent_for(self) -> float | None:
        return _seconds_since(self._server.peer_absent_since)

    async def close(self) -> None:
        await self._server.close()


class _ConsumerTunnel(Tunnel):
    def __init__(self, client: RelayClient, entry_points: tuple[Address, ...]) -> None:
        self._client = client
        self._entry_points = entry_points

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._entry_points

    def counters(self) -> Counters:
        c = self._client.counters
        return Counters(bytes_in=c.bytes_in, bytes_out=c.bytes_out, packet_size=self._client.packet_size or 0)

    def peer_absent_for(self) -> float | None:
        return _seconds_since(self._client.peer_absent_since)

    async def close(self) -> None:
        await self._client.close()


class QuicDriver(Driver):
    mode = Mode.QUIC

    def __init__(self, config: RelayConfig | None = None) -> None:
        self._config = config or RelayConfig()

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        if plan.data_endpoints:
            port = ports.claim(plan.session_id, plan.data_endpoints[0].port, UDP)
        else:
            port = ports.allocate(plan.session_id, UDP)
        identity = Identity(plan.credentials.cert_pem, plan.credentials.key_pem)
        try:
            server = await RelayServer.start(
                host=ports.bind_host,
                port=port,
                identity=identity,
                server_name=plan.credentials.server_name,
                destinations=[(d.host, d.port) for d in plan.destinations],
                config=self._config,
            )
        except OSError as exc:
            ports.release(plan.session_id)
            raise Unavailable(f"cannot open the QUIC data endpoint on port {port}: {exc.strerror}") from None
        return _ProducerTunnel(server, public(ports.bind_host, port, advertise_host))

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        endpoint = plan.data_endpoints[0]
        try:
            client = await RelayClient.start(
                server=(endpoint.host, endpoint.port),
                server_name=plan.peer_server_name,
                identity=Identity(plan.credentials.cert_pem, plan.credentials.key_pem),
                server_cert_pem=plan.peer_cert_pem,
                config=self._config,
                wait=not plan.restoring,
            )
        except RelayError as exc:
            raise Unavailable(f"cannot reach the producer side's data endpoint {endpoint}: {exc}") from None
        kind = UDP if plan.protocol is Protocol.UDP else TCP
        host = plan.bind_host or ports.bind_host
        entry_points: list[Address] = []
        try:
            for index in range(plan.num_conn):
                port = _entry_port(plan, ports, index, kind)
                add = client.add_udp_entry if kind == UDP else client.add_tcp_entry
                _, bound = await add(host, port, index % plan.destination_count)
                entry_points.append(public(host, bound, advertise_host))
        except BaseException:
            await client.close()
            ports.release(plan.session_id)
            raise
        return _ConsumerTunnel(client, tuple(entry_points))


def _entry_port(plan: ConsumerPlan, ports: PortAllocator, index: int, kind: socket.SocketKind) -> int:
    if index < len(plan.entry_ports):
        return ports.claim(plan.session_id, plan.entry_ports[index], kind)
    return ports.allocate(plan.session_id, kind)
