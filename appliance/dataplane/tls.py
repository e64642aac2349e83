"""TLS mode: TCP connections and UDP flows over TLS 1.3 with pinned per-session certificates.

For hosts where UDP is blocked or slow. The control process binds every socket (so errors surface
here, synchronously) and hands it to the relay processes of a WorkerPool, which carry the payload:
each TCP connection at an entry point becomes one TLS connection to the producer side's data endpoint.
"""

from __future__ import annotations

import socket

from appliance.dataplane.base import ConsumerPlan, Counters, Driver, ProducerPlan, Tunnel
from appliance.dataplane.quic import public
from appliance.dataplane.tlsrelay import messages
from appliance.dataplane.tlsrelay.pool import WorkerError, WorkerPool
from appliance.dataplane.tlsrelay.sessions import BACKLOG, ConsumerSpec, ProducerSpec
from appliance.dataplane.tlsrelay.wire import Kind
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator


def _bind(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == TCP:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _TlsTunnel(Tunnel):
    def __init__(self, pool: WorkerPool, session_id: str, addresses: tuple[Address, ...]) -> None:
        self._pool = pool
        self._session_id = session_id
        self._addresses = addresses
        self._closed = False

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._addresses

    def counters(self) -> Counters:
        values = self._pool.counters(self._session_id)
        return Counters(bytes_in=values[0], bytes_out=values[1])

    def authorize(self, peer_cert_pem: bytes) -> None:
        self._pool.authorize(self._session_id, peer_cert_pem)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close_session(self._session_id)


class TlsDriver(Driver):
    mode = Mode.TLS

    def __init__(self, workers: int = 0, udp_idle: float = 60.0) -> None:
        self.pool = WorkerPool(workers)
        self._udp_idle = udp_idle

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        if plan.data_endpoints:
            port = ports.claim(plan.session_id, plan.data_endpoints[0].port, TCP)
        else:
            port = ports.allocate(plan.session_id, TCP)
        try:
            sock = _bind(ports.bind_host, port, TCP)
        except OSError as exc:
            ports.release(plan.session_id)
            raise Unavailable(f"cannot open the TLS data endpoint on port {port}: {exc.strerror}") from None
        spec = ProducerSpec(
            session_id=plan.session_id,
            cert_pem=plan.credentials.cert_pem,
            key_pem=plan.credentials.key_pem,
            destinations=tuple((d.host, d.port) for d in plan.destinations),
            udp_idle=self._udp_idle,
        )
        await self._open(plan.session_id, ports, "producer", spec, [sock], spread=True)
        return _TlsTunnel(self.pool, plan.session_id, (public(ports.bind_host, port, advertise_host),))

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        endpoint = plan.data_endpoints[-1]  # in auto mode the QUIC endpoint comes first
        kind = UDP if plan.protocol is Protocol.UDP else TCP
        host = plan.bind_host or ports.bind_host
        socks: list[socket.socket] = []
        entry_points: list[Address] = []
        try:
            for index in range(plan.num_conn):
                if index < len(plan.entry_ports):
                    port = ports.claim(plan.session_id, plan.entry_ports[index], kind)
                else:
                    port = ports.allocate(plan.session_id, kind)
                try:
                    socks.append(_bind(host, port, kind))
                except OSError as exc:
                    raise Unavailable(f"cannot bind entry point {host}:{port}: {exc.strerror}") from None
                entry_points.append(public(host, socks[-1].getsockname()[1], advertise_host))
        except BaseException:
            for sock in socks:
                sock.close()
            ports.release(plan.session_id)
            raise
        spec = ConsumerSpec(
            session_id=plan.session_id,
            cert_pem=plan.credentials.cert_pem,
            key_pem=plan.credentials.key_pem,
            peer_cert_pem=plan.peer_cert_pem,
            server_name=plan.peer_server_name,
            endpoint=(endpoint.host, endpoint.port),
            kind=Kind.UDP if kind == UDP else Kind.TCP,
            dest_indexes=tuple(i % plan.destination_count for i in range(plan.num_conn)),
            udp_idle=self._udp_idle,
        )
        # TCP listeners are shared by all relay processes; a UDP socket is read by one.
        await self._open(plan.session_id, ports, "consumer", spec, socks, spread=kind == TCP)
        return _TlsTunnel(self.pool, plan.session_id, tuple(entry_points))

    async def _open(
        self,
        session_id: str,
        ports: PortAllocator,
        op: str,
        spec: ProducerSpec | ConsumerSpec,
        socks: list[socket.socket],
        *,
        spread: bool,
    ) -> None:
        try:
            await self.pool.open(session_id, op, messages.spec_to_json(spec), socks, spread=spread)
        except WorkerError as exc:
            ports.release(session_id)
            raise Unavailable(f"the TLS relay could not start: {exc}") from None

    async def close(self) -> None:
        await self.pool.close()
