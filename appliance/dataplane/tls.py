"""TLS mode: TCP connections and UDP flows over TLS 1.3 with pinned per-session certificates.

For hosts where UDP is blocked or slow. The control process binds every socket (so errors surface
here, synchronously) and hands it to the relay processes of a WorkerPool, which carry the payload:
each TCP connection at an entry point becomes one TLS connection to the producer side's data endpoint.
"""

from __future__ import annotations

import socket

from appliance.dataplane.base import ConsumerPlan, Driver, ProducerPlan, Tunnel
from appliance.dataplane.pooled import PooledTunnel
from appliance.dataplane.quic import public
from appliance.dataplane.sockets import bind_group, bind_socket
from appliance.dataplane.tlsrelay import messages
from appliance.dataplane.tlsrelay.pool import WorkerError, WorkerPool
from appliance.dataplane.tlsrelay.sessions import ConsumerSpec, ProducerSpec
from appliance.dataplane.tlsrelay.wire import Kind
from appliance.errors import Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator


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
        return PooledTunnel(self.pool, plan.session_id, endpoint, consumer=False)

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
                        socks[workers[0]].append(bind_socket(host, port, kind))
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
        return PooledTunnel(self.pool, plan.session_id, tuple(entry_points), consumer=True)

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
        return bind_group(host, port, TCP, self.pool.size)

    async def close(self) -> None:
        await self.pool.close()
