"""`scistream server`: wires settings, store, drivers, manager and services, then serves until signalled."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from dataclasses import replace
from importlib import resources

import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.events import RecvRequest, listen
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from appliance.auth import Authenticator, authenticator_from_settings
from appliance.config import WILDCARDS, Settings
from appliance.control.edge import guard
from appliance.control.legacy import LegacyControlService, pin_peer_certificate, remember_client
from appliance.control.peer_client import GrpcPeerLink
from appliance.control.services import ControlService, PeerService, authenticate_calls
from appliance.control.tls import ControlCertificate, ensure_certificate, server_context
from appliance.dataplane.auto import QUIC_HANDSHAKE_TIMEOUT, AutoDriver
from appliance.dataplane.base import Driver
from appliance.dataplane.quic import QuicDriver
from appliance.dataplane.tls import TlsDriver
from appliance.dataplane.wireguard import build_driver as build_wireguard_driver
from appliance.errors import Unavailable
from appliance.looplag import LoopLagMonitor
from appliance.metrics import serve_metrics
from appliance.sessions.legacy import LegacyCoordinator
from appliance.sessions.manager import Identity, PeerLink, SessionManager
from appliance.sessions.model import Address, Mode
from appliance.sessions.ports import PortAllocator
from appliance.sessions.store import SessionStore
from appliance.state_dir import StateDirLock, claim_state_dir
from appliance.statuspage import StatusPage, http_context
from quic_relay import RelayConfig

log = structlog.get_logger(__name__)


def _descriptor_pool() -> descriptor_pool.DescriptorPool:
    """Our proto files, for server reflection (betterproto does not register them)."""
    pool = descriptor_pool.DescriptorPool()
    data = resources.files("appliance.api").joinpath("descriptors.binpb").read_bytes()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(proto)
    return pool


def tls_probe_interval(peer_grace: float) -> float:
    """How often an idle TLS-mode consumer side shows itself to its producer side: often enough that
    a peer with the same `--peer-grace` sees it several times per grace period."""
    return min(10.0, max(0.2, peer_grace / 4))


def build_drivers(
    workers: int = 0,
    peer_grace: float = 60.0,
    quic_max_packet_size: int = RelayConfig.max_datagram_size,
) -> dict[Mode, Driver]:
    quic_config = RelayConfig(max_datagram_size=quic_max_packet_size)
    quic = QuicDriver(quic_config, workers)
    tls = TlsDriver(workers, probe_interval=tls_probe_interval(peer_grace))
    fallback = AutoDriver(
        quic.with_config(replace(quic_config, handshake_timeout=QUIC_HANDSHAKE_TIMEOUT)), tls
    )
    return {Mode.QUIC: quic, Mode.TLS: tls, Mode.AUTO: fallback}


class Appliance:
    """One running appliance. `start()` then `stop()`; usable in-process by tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: Server | None = None
        self.health_server: Server | None = None  # plaintext grpc.health.v1 alone (--health-port)
        self.manager: SessionManager | None = None
        self.legacy: LegacyCoordinator | None = None
        self.status_page: StatusPage | None = None
        self._store: SessionStore | None = None
        self._drivers = build_drivers(settings.workers, settings.peer_grace, settings.quic_max_packet_size)
        self._state_lock: StateDirLock | None = None
        self._authenticator: Authenticator | None = None
        self._manager_started = self._serving = False
        self.fingerprint = ""
        self.loop_lag = LoopLagMonitor()

    async def start(self) -> None:
        # First of all: an appliance that cannot have its state directory to itself must touch nothing
        # in it (no restore, no sweep of another appliance's sessions).
        self._state_lock = claim_state_dir(self.settings.state_dir)
        try:
            await self._start()
        except BaseException:
            await self._teardown()  # quietly: the caller reports why it could not start, on one line
            raise

    async def _start(self) -> None:
        s = self.settings
        wireguard = build_wireguard_driver(s.wireguard_backend, s.wireguard_pool, s.state_dir, s.wireguard_go)
        if wireguard is not None:
            self._drivers[Mode.WIREGUARD] = wireguard
        self._authenticator = authenticator = authenticator_from_settings(s)
        if s.auth == "none":
            structlog.contextvars.bind_contextvars(auth="NO_AUTH")
            log.warning("NO_AUTH: authentication is disabled; anyone who reaches this port controls sessions")
        ssl_context, cert = None, None
        if s.insecure:
            log.warning("INSECURE: the control channel is plaintext; use only for development")
        else:
            # The names clients may reach it by (a wildcard listen address is not one).
            hosts = [h for h in (s.advertise_host, s.listen_address.host) if h not in WILDCARDS]
            cert = ensure_certificate(s.state_dir, hosts, s.tls_cert, s.tls_key)
            self.fingerprint = cert.fingerprint
            ssl_context = server_context(cert)
        self._store = SessionStore(s.state_dir / "sessions.db")
        timeout = s.peer_timeout

        def connect_peer(address: str, fingerprint: str) -> PeerLink:
            return GrpcPeerLink(address, fingerprint, timeout)

        ports = PortAllocator(s.ports, s.data_bind)
        self.manager = SessionManager(
            store=self._store,
            ports=ports,
            drivers=self._drivers,
            connect_peer=connect_peer,
            identity=Identity(s.advertise_address, self.fingerprint),
            advertise_host=s.advertise_host,
            default_ttl=s.default_ttl,
            retention=s.retention,
            peer_timeout=timeout,
            peer_grace=s.peer_grace,
        )
        self.legacy = _legacy_coordinator(s, self.manager, ports)
        control, peer = ControlService(self.manager), PeerService(self.manager)
        legacy = LegacyControlService(self.legacy)
        health = Health({control: [], peer: []})
        services = ServerReflection.extend([control, peer, legacy, health], pool=_descriptor_pool())
        self.server = Server(guard(services))
        listen(self.server, RecvRequest, authenticate_calls(authenticator))
        listen(self.server, RecvRequest, remember_client)
        self.loop_lag.start()
        for driver in dict.fromkeys(self._drivers.values()):
            await driver.start()
        await self.manager.start()
        self._manager_started = True
        address = s.listen_address
        try:
            if address.host == "::":
                await self.server.start(sock=_every_address_socket(address.port), ssl=ssl_context)
            else:
                await self.server.start(address.host, address.port, ssl=ssl_context, reuse_address=True)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {address}: {exc.strerror}") from None
        self._serving = True
        if s.health_port:
            # Kubernetes' native gRPC probes speak no TLS: health alone, in plaintext, on its own port.
            self.health_server = Server(guard([health]))
            try:
                if address.host == "::":
                    await self.health_server.start(sock=_every_address_socket(s.health_port))
                else:
                    await self.health_server.start(address.host, s.health_port, reuse_address=True)
            except OSError as exc:
                self.health_server = None
                raise Unavailable(f"cannot listen on health port {s.health_port}: {exc.strerror}") from None
        if s.metrics_port:
            serve_metrics(self.manager, address.host, s.metrics_port, self.loop_lag)
        if s.status_port:
            await self._start_status_page(authenticator, cert)
        log.info(
            "appliance serving",
            listen=str(address),
            advertise=s.advertise_address,
            fingerprint=self.fingerprint or "none (insecure)",
            auth=s.auth,
            port_range=str(s.ports),
        )

    async def _start_status_page(self, authenticator: Authenticator, cert: ControlCertificate | None) -> None:
        """The status page on the listen host's `status_port`, with TLS like the control port."""
        assert self.manager is not None
        s = self.settings
        host, port = s.listen_address.host, s.status_port
        page = StatusPage(self.manager, authenticator)
        try:
            sock = _every_address_socket(port) if host == "::" else None
        except OSError as exc:
            raise Unavailable(f"cannot serve the status page on port {port}: {exc.strerror}") from None
        await page.start(host, port, ssl_context=http_context(cert) if cert else None, sock=sock)
        self.status_page = page
        log.info("status page serving", port=port, tls=cert is not None)

    async def stop(self) -> None:
        await self._teardown()
        log.info("appliance stopped", loop_lag_max_ms=round(self.loop_lag.stats.max * 1000))

    async def _teardown(self) -> None:
        """Stops what `start` got to (also after a failed start), then releases the state directory."""
        if self.legacy is not None:
            await self.legacy.stop()  # first: it ends requests still waiting for their hello
        if self.health_server is not None:
            self.health_server.close()  # probes fail from here on: the appliance is going away
            await self.health_server.wait_closed()
            self.health_server = None
        if self.server is not None and self._serving:
            self._serving = False
            self.server.close()
            await self.server.wait_closed()
        if self.status_page is not None:
            await self.status_page.stop()
            self.status_page = None
        if self.manager is not None and self._manager_started:
            self._manager_started = False
            await self.manager.stop()
        for driver in self._drivers.values():
            await driver.close()
        if self._authenticator is not None:
            await self._authenticator.close()
            self._authenticator = None
        if self._store is not None:
            self._store.close()
        await self.loop_lag.stop()
        if self._state_lock is not None:
            self._state_lock.release()  # last: everything that used the directory is done
            self._state_lock = None


def _every_address_socket(port: int) -> socket.socket:
    """A TCP socket bound to every address, IPv4 included (one dual-stack IPv6 socket, as SciStream
    1.2.1 listens on `[::]`); on a host without IPv6, to every IPv4 address."""
    try:
        return _bound(socket.AF_INET6, "::", port)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
            raise
    return _bound(socket.AF_INET, "0.0.0.0", port)


def _bound(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # asyncio would make an IPv6 listener IPv6-only; this one must take IPv4 clients too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _legacy_coordinator(s: Settings, manager: SessionManager, ports: PortAllocator) -> LegacyCoordinator:
    """The SciStream 1.2.1 service's state, configured by the `legacy_*` settings."""

    async def pin_peer(address: Address) -> str:
        return await pin_peer_certificate(
            address, ca_file=s.legacy_peer_ca, insecure=s.insecure, timeout=s.peer_timeout
        )

    return LegacyCoordinator(
        manager,
        ports,
        advertise_host=s.advertise_host,
        mode=Mode(s.legacy_mode),
        hello_timeout=s.legacy_hello_timeout,
        peer_port=s.legacy_peer_port,
        pin_peer=pin_peer,
        max_pending=s.legacy_max_pending,
        max_pending_per_client=s.legacy_max_pending_per_client,
    )


async def serve(settings: Settings) -> None:
    """Runs an appliance until SIGINT or SIGTERM, then stops it cleanly."""
    appliance = Appliance(settings)
    await appliance.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await appliance.stop()
