"""TLS mode: TCP connections and UDP flows over TLS 1.3 with pinned per-session certificates.

For hosts where UDP is blocked or slow. The control process binds every socket (so errors surface
here, synchronously) and hands it to the relay processes of a WorkerPool, which carry the payload:
each TCP connection at an entry point becomes one TLS connection to the producer side's data endpoint.
"""

from __future__ import annotations

import socket
import time

from appliance.dataplane.base import ConsumerPlan, Counters, Driver, ProducerPlan, Tunnel
from appliance.dataplane.quic import public
from appliance.dataplane.tlsrelay import messages
from appliance.dataplane.tlsrelay.pool import WorkerError, WorkerPool
from appliance.dataplane.tlsrelay.sessions import BACKLOG, ConsumerSpec, ProducerSpec
from appliance.dataplane.tlsrelay.wire import Kind
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator


def _bind(host: str, port: int, kind: socket.SocketKind, *, shared: bool = False) -> socket.socket:
    """A bound (and, for TCP, listening) socket; `shared` ones may be bound again to the same port, by
    this user only, and the kernel spreads new connections across them (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if kind == TCP:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _TlsTunnel(Tunnel):
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
        return Counters(bytes_in=values[0], bytes_out=values[1])

    def authorize(self, peer_cert_pem: bytes) -> None:
        self._pool.authorize(self._session_id, peer_cert_pem)
        self._expecting_since = time.monotonic()

    def peer_absent_for(self) -> float | None:
        """Since the peer side last made (consumer side: accepted) a tunnel connection or probe, or
        had one open; the consumer side probes every `probe_interval` while no connection is made."""
        if self._closed or self._expecting_since is None:
            return None
        seen = max(self._pool.peer_seen(self._session_id), self._expecting_since)
        return time.monotonic() - seen

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close_session(self._session_id)


class TlsDriver(Driver):
    mode = Mode.TLS

    def __init__(self, workers: int = 0, udp_idle: float = 60.0, probe_interval: float = 10.0) -> None:
        self.pool = WorkerPool(workers)
        self._udp_idle = udp_idle
        self._probe_interval = probe_interval

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        if plan.data_endpoints:
            port = ports.claim(plan.session_id, plan.data_endpoints[0].port, TCP)
        else:
            port = ports.allocate(plan.session_id, TCP)
        try:
            socks = self._listeners(ports.bind_host, port)
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
        await self._open(plan.session_id, ports, "producer", spec, {i: [s] for i, s in enumerate(socks)})
        endpoint = (public(ports.bind_host, port, advertise_host),)
        return _TlsTunnel(self.pool, plan.session_id, endpoint, consumer=False)

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        endpoint = plan.data_endpoints[-1]  # in auto mode the QUIC endpoint comes first
        kind = UDP if plan.protocol is Protocol.UDP else TCP
        host = plan.bind_host or ports.bind_host
        # A TCP entry point is one socket per relay process (the kernel spreads connections across
        # them); a UDP entry point is one socket, read by one relay process.
        workers = range(self.pool.size) if kind == TCP else [hash(plan.session_id) % self.pool.size]
        socks: dict[int, list[socket.socket]] = {i: [] for i in workers}
        entry_points: list[Address] = []
        try:
            for index in range(plan.num_conn):
                if index < len(plan.entry_ports):
                    port = ports.claim(plan.session_id, plan.entry_ports[index], kind)
                else:
                    port = ports.allocate(plan.session_id, kind)
                try:
                    if kind == TCP:
                        for i, sock in enumerate(self._listeners(host, port)):
                            socks[i].append(sock)
                    else:
                        socks[workers[0]].append(_bind(host, port, kind))
                except OSError as exc:
                    raise Unavailable(f"cannot bind entry point {host}:{port}: {exc.strerror}") from None
                entry_points.append(public(host, port, advertise_host))
        except BaseException:
            for sock in (s for group in socks.values() for s in group):
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
            probe_interval=self._probe_interval,
        )
        await self._open(plan.session_id, ports, "consumer", spec, socks)
        return _TlsTunnel(self.pool, plan.session_id, tuple(entry_points), consumer=True)

    async def _open(
        self,
        session_id: str,
        ports: PortAllocator,
        op: str,
        spec: ProducerSpec | ConsumerSpec,
        socks: dict[int, list[socket.socket]],
    ) -> None:
        try:
            await self.pool.open(session_id, op, messages.spec_to_json(spec), socks)
        except WorkerError as exc:
            ports.release(session_id)
            raise Unavailable(f"the TLS relay could not start: {exc}") from None

    def _listeners(self, host: str, port: int) -> list[socket.socket]:
        """One listening socket on `port` per relay process."""
        socks: list[socket.socket] = []
        try:
            for _ in range(self.pool.size):
                socks.append(_bind(host, port, TCP, shared=True))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return socks

    async def close(self) -> None:
        await self.pool.close()
