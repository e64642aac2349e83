"""`scistream server`: wires settings, store, drivers, manager and services, then serves until signalled."""

from __future__ import annotations

import asyncio
import signal
from importlib import resources

import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.events import RecvRequest, listen
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from appliance.auth import build_authenticator
from appliance.config import Settings
from appliance.control.legacy import LegacyControlService, pin_peer_certificate
from appliance.control.peer_client import GrpcPeerLink
from appliance.control.services import ControlService, PeerService, authenticate_calls
from appliance.control.tls import ensure_certificate, server_context
from appliance.dataplane.auto import QUIC_HANDSHAKE_TIMEOUT, AutoDriver
from appliance.dataplane.base import Driver
from appliance.dataplane.quic import QuicDriver
from appliance.dataplane.tls import TlsDriver
from appliance.dataplane.wireguard import build_driver as build_wireguard_driver
from appliance.errors import Unavailable
from appliance.metrics import serve_metrics
from appliance.sessions.legacy import LegacyCoordinator
from appliance.sessions.manager import Identity, PeerLink, SessionManager
from appliance.sessions.model import Address, Mode
from appliance.sessions.ports import PortAllocator
from appliance.sessions.store import SessionStore
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


def build_drivers(workers: int = 0, peer_grace: float = 60.0) -> dict[Mode, Driver]:
    quic, tls = QuicDriver(), TlsDriver(workers, probe_interval=tls_probe_interval(peer_grace))
    fallback = AutoDriver(QuicDriver(RelayConfig(handshake_timeout=QUIC_HANDSHAKE_TIMEOUT)), tls)
    return {Mode.QUIC: quic, Mode.TLS: tls, Mode.AUTO: fallback}


class Appliance:
    """One running appliance. `start()` then `stop()`; usable in-process by tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: Server | None = None
        self.manager: SessionManager | None = None
        self.legacy: LegacyCoordinator | None = None
        self._store: SessionStore | None = None
        self._drivers = build_drivers(settings.workers, settings.peer_grace)
        self.fingerprint = ""

    async def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        wireguard = build_wireguard_driver(s.wireguard_backend, s.wireguard_pool, s.state_dir, s.wireguard_go)
        if wireguard is not None:
            self._drivers[Mode.WIREGUARD] = wireguard
        authenticator = build_authenticator(
            s.auth,
            tokens_file=s.tokens_file,
            jwks_file=s.jwks_file,
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
        )
        if s.auth == "none":
            structlog.contextvars.bind_contextvars(auth="NO_AUTH")
            log.warning("NO_AUTH: authentication is disabled; anyone who reaches this port controls sessions")
        ssl_context = None
        if s.insecure:
            log.warning("INSECURE: the control channel is plaintext; use only for development")
        else:
            hosts = [s.advertise_host, s.listen_address.host]
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
        self.server = Server(services)
        listen(self.server, RecvRequest, authenticate_calls(authenticator))
        await self.manager.start()
        address = s.listen_address
        try:
            await self.server.start(address.host, address.port, ssl=ssl_context, reuse_address=True)
        except OSError as exc:
            await self.manager.stop()
            raise Unavailable(f"cannot listen on {address}: {exc.strerror}") from None
        if s.metrics_port:
            serve_metrics(self.manager, address.host, s.metrics_port)
        log.info(
            "appliance serving",
            listen=str(address),
            advertise=s.advertise_address,
            fingerprint=self.fingerprint or "none (insecure)",
            auth=s.auth,
            port_range=str(s.ports),
        )

    async def stop(self) -> None:
        if self.legacy is not None:
            await self.legacy.stop()  # first: it ends requests still waiting for their hello
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.manager is not None:
            await self.manager.stop()
        for driver in self._drivers.values():
            await driver.close()
        if self._store is not None:
            self._store.close()
        log.info("appliance stopped")


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
