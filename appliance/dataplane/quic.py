"""QUIC mode: `quic_relay` connections per session, TCP as streams and UDP as DATAGRAM frames."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
from typing import Any

from appliance.dataplane.base import ConsumerPlan, Credentials, Driver, ProducerPlan, Tunnel
from appliance.dataplane.pooled import PooledTunnel
from appliance.dataplane.sockets import bind_group, bind_socket
from appliance.dataplane.tlsrelay.pool import WorkerError, WorkerPool
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator
from quic_relay import RelayConfig
from quic_relay.lanes import LANES, steer

logger = logging.getLogger("scistream.quic")
_PROCESS = "appliance.dataplane.quicworker"

WILDCARDS = ("0.0.0.0", "::", "")


def public(host: str, port: int, advertise_host: str) -> Address:
    """The address a peer or user reaches a socket bound to `host:port` at."""
    return Address(advertise_host if host in WILDCARDS else host, port)


class QuicDriver(Driver):
    """QUIC mode over the relay processes of a WorkerPool (`--workers`).

    Producer side: one data endpoint port, one socket on it per relay process (SO_REUSEPORT, steered
    by lane). Consumer side: one QUIC connection per relay process, in lane N for process N; each
    process listens on every TCP entry point (the kernel spreads the connections across them), and
    serves every Nth UDP entry point."""

    mode = Mode.QUIC

    def __init__(
        self, config: RelayConfig | None = None, workers: int = 0, pool: WorkerPool | None = None
    ) -> None:
        self._config = config or RelayConfig()
        self.pool = pool or WorkerPool(min(workers or os.cpu_count() or 1, LANES), _PROCESS)

    def with_config(self, config: RelayConfig) -> QuicDriver:
        """A driver with other settings on the same relay processes."""
        return QuicDriver(config, pool=self.pool)

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        if plan.data_endpoints:
            port = ports.claim(plan.session_id, plan.data_endpoints[0].port, UDP)
        else:
            port = ports.allocate(plan.session_id, UDP)
        try:
            group = bind_group(ports.bind_host, port, UDP, self.pool.size)
        except OSError as exc:
            ports.release(plan.session_id)
            raise Unavailable(f"cannot open the QUIC data endpoint on port {port}: {exc.strerror}") from None
        try:
            steer(group)
        except OSError as exc:
            # Without steering the kernel spreads connections by address hash: uneven, still correct.
            logger.warning("cannot steer QUIC lanes on port %d: %s", port, exc.strerror)
        spec = {
            **self._spec(plan.credentials),
            "destinations": [[d.host, d.port] for d in plan.destinations],
        }
        await self._open(plan.session_id, ports, "producer", spec, {i: [s] for i, s in enumerate(group)})
        endpoint = (public(ports.bind_host, port, advertise_host),)
        return PooledTunnel(self.pool, plan.session_id, endpoint, consumer=False)

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        endpoint = plan.data_endpoints[0]
        kind = UDP if plan.protocol is Protocol.UDP else TCP
        host = plan.bind_host or ports.bind_host
        size = self.pool.size if kind == TCP else min(self.pool.size, plan.num_conn)
        socks: dict[int, list[socket.socket]] = {i: [] for i in range(size)}
        entry_points: list[Address] = []
        try:
            for index in range(plan.num_conn):
                port = _entry_port(plan, ports, index, kind)
                try:
                    if kind == TCP:
                        for i, sock in enumerate(bind_group(host, port, TCP, size)):
                            socks[i].append(sock)
                    else:
                        socks[index % size].append(bind_socket(host, port, UDP))
                except OSError as exc:
                    raise Unavailable(f"cannot bind entry point {host}:{port}: {exc.strerror}") from None
                entry_points.append(public(host, port, advertise_host))
        except BaseException:
            for sock in (s for group in socks.values() for s in group):
                sock.close()
            ports.release(plan.session_id)
            raise
        spec = {
            **self._spec(plan.credentials),
            "server_name": plan.peer_server_name,
            "peer_cert_pem": _b64(plan.peer_cert_pem),
            "endpoint": [endpoint.host, endpoint.port],
            "kind": "udp" if kind == UDP else "tcp",
            "dest_indexes": [i % plan.destination_count for i in range(plan.num_conn)],
            "workers": size,
            "restoring": plan.restoring,
        }
        try:
            await self._open(plan.session_id, ports, "consumer", spec, socks, what="reach")
        except Unavailable as exc:
            raise Unavailable(
                f"cannot reach the producer side's data endpoint {endpoint}: {exc.message}"
            ) from None
        return PooledTunnel(self.pool, plan.session_id, tuple(entry_points), consumer=True)

    def _spec(self, credentials: Credentials) -> dict[str, Any]:
        return {
            "cert_pem": _b64(credentials.cert_pem),
            "key_pem": _b64(credentials.key_pem),
            "server_name": credentials.server_name,
            "config": dataclasses.asdict(self._config),
        }

    async def _open(
        self,
        session_id: str,
        ports: PortAllocator,
        op: str,
        spec: dict[str, Any],
        socks: dict[int, list[socket.socket]],
        what: str = "start",
    ) -> None:
        try:
            await self.pool.open(session_id, op, spec, socks)
        except WorkerError as exc:
            ports.release(session_id)
            raise Unavailable(
                str(exc) if what == "reach" else f"the QUIC relay could not start: {exc}"
            ) from None

    async def start(self) -> None:
        """QUIC is the default mode: its relay processes start with the appliance rather than with the
        first session, which would otherwise wait for them (and a lease of a second could run out)."""
        try:
            await self.pool.start()
        except WorkerError as exc:
            raise Unavailable(f"QUIC mode cannot start: {exc}") from None

    async def close(self) -> None:
        await self.pool.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _entry_port(plan: ConsumerPlan, ports: PortAllocator, index: int, kind: socket.SocketKind) -> int:
    if index < len(plan.entry_ports):
        return ports.claim(plan.session_id, plan.entry_ports[index], kind)
    return ports.allocate(plan.session_id, kind)
