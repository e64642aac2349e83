"""One side of one WireGuard session: its device, addresses, peer, rules and (userspace) process."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import socket
import time
from dataclasses import asdict, dataclass, field

import structlog

from appliance.dataplane.base import Counters, PeerIdentity, Tunnel, WireGuardPeer
from appliance.dataplane.wireguard import keys, links, rules
from appliance.dataplane.wireguard.backend import Backend, BackendError, DeviceConfig, PeerConfig
from appliance.dataplane.wireguard.pool import (
    BLOCK_PREFIX,
    CONSUMER,
    PRODUCER,
    AddressPool,
    Network,
    host_address,
)
from appliance.errors import InvalidArgument, Unavailable
from appliance.sessions.model import Address

log = structlog.get_logger(__name__)

KEEPALIVE = 25  # seconds; keeps NAT state on the consumer side's path
RESTARTS = 3  # a device that dies this many times in a row is given up
STABLE = 60.0  # seconds up after which a device's failures are no longer "in a row"
# With keepalives, a live peer renews the handshake every 120 s (REKEY_AFTER_TIME); keys expire after
# 180 s (REJECT_AFTER_TIME). A handshake older than this means the peer appliance is gone.
HANDSHAKE_STALE = 180.0


@dataclass
class WireGuardState:
    """What a tunnel needs to come back after a restart; kept with the session's secrets."""

    ifname: str
    side: str  # "producer" | "consumer"
    private_key: str  # hex
    listen_port: int = 0
    addresses: list[str] = field(default_factory=list)  # ours, CIDR
    peer_public_key: str = ""  # hex
    peer_addresses: list[str] = field(default_factory=list)
    peer_endpoint: list[str | int] = field(default_factory=list)  # [ip, port], when known
    ruleset: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> WireGuardState:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise Unavailable(f"saved WireGuard state is unreadable: {exc}") from None


class WireGuardTunnel(Tunnel):
    """Brought up with `start()`; `admit()` (producer side) adds the peer and the rules."""

    def __init__(
        self,
        session_id: str,
        state: WireGuardState,
        backend: Backend,
        pool: AddressPool,
        preshared_key: bytes,
        addresses: tuple[Address, ...],
        producer_rules: rules.ProducerRules | None = None,
        reservations: list[socket.socket] | None = None,
    ) -> None:
        self.session_id = session_id
        self.state = state
        self._backend = backend
        self._pool = pool
        self._psk = preshared_key
        self._addresses = addresses
        self._producer_rules = producer_rules  # producer side: rendered once the peer is known
        self._reservations = reservations or []  # entry ports held, so nothing else binds them
        self._last = Counters()
        self._base = Counters()  # what earlier wireguard-go processes of this tunnel counted
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._given_up = False
        self._started_at = time.time()

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._addresses

    @property
    def wireguard(self) -> WireGuardPeer | None:
        if not self.state.addresses:
            return None
        public = keys.public_key(bytes.fromhex(self.state.private_key))
        return WireGuardPeer(public, tuple(self.state.addresses))

    def saved_state(self) -> bytes:
        return self.state.encode()

    def counters(self) -> Counters:
        if self._closed:
            return self._last
        with contextlib.suppress(BackendError):
            stats = self._backend.stats(self.state.ifname)
            base = self._base
            # Sent to the peer is what came in from the local apps; received from it went out to them.
            self._last = Counters(base.bytes_in + stats.tx_bytes, base.bytes_out + stats.rx_bytes)
        return self._last

    def peer_absent_for(self) -> float | None:
        if self._given_up:
            return math.inf  # the device is gone for good: the session must end, not look alive
        if self._closed or not self.state.peer_public_key:
            return None
        try:
            since = self._backend.stats(self.state.ifname).last_handshake or self._started_at
        except BackendError:
            return None  # being restarted by the supervisor
        stale = time.time() - since - HANDSHAKE_STALE
        return stale if stale > 0 else None

    async def start(self) -> None:
        """Makes and configures the device; on failure everything made so far is removed."""
        try:
            await self._bring_up()
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"wg-{self.state.ifname}")

    def admit(self, peer: PeerIdentity) -> None:
        offer = peer.wireguard
        if offer is None:
            if self.state.peer_public_key:
                return  # restored: the peer is already configured
            raise InvalidArgument("join refused: WireGuard mode needs the consumer side's public key")
        public = keys.check_public_key(offer.public_key)
        if self.state.peer_public_key:
            raise InvalidArgument("join refused: this session already has its consumer side")
        blocks = blocks_of(offer.tunnel_addresses, consumer=True)
        self._pool.claim(self.session_id, blocks)
        state = self.state
        state.addresses = [host_address(b, PRODUCER) for b in blocks]
        state.peer_addresses = list(offer.tunnel_addresses)
        state.peer_public_key = public.hex()
        if offer.endpoint:
            state.peer_endpoint = list(resolve_now(offer.endpoint))
        try:
            self._apply()
        except BaseException:
            state.addresses, state.peer_addresses, state.peer_public_key = [], [], ""
            state.peer_endpoint = []
            self._pool.release(self.session_id)
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self.counters()
        self._closed = True
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        try:
            rules.delete(self.state.ifname)
        except Unavailable as exc:
            log.warning("could not delete the session's nftables table", error=exc.message)
        await self._backend.destroy(self.state.ifname)
        for sock in self._reservations:
            sock.close()
        self._pool.release(self.session_id)

    # ---- internals ---------------------------------------------------------------------------

    async def _bring_up(self) -> None:
        ifname = self.state.ifname
        try:
            await self._backend.create(ifname)
            self._apply()
        except BackendError as exc:
            raise Unavailable(f"WireGuard device {ifname}: {exc}") from None

    def _apply(self) -> None:
        """Pushes the state to the device, the interface and nftables (idempotent)."""
        state = self.state
        peer = None
        if state.peer_public_key:
            endpoint = (
                (str(state.peer_endpoint[0]), int(state.peer_endpoint[1])) if state.peer_endpoint else None
            )
            peer = PeerConfig(
                public_key=bytes.fromhex(state.peer_public_key),
                preshared_key=self._psk,
                allowed_ips=tuple(_host_route(a) for a in state.peer_addresses),
                endpoint=endpoint,
                keepalive=KEEPALIVE if endpoint else 0,
            )
        config = DeviceConfig(bytes.fromhex(state.private_key), state.listen_port, peer)
        try:
            self._backend.configure(state.ifname, config)
            links.bring_up(state.ifname, state.addresses)
        except (BackendError, OSError) as exc:
            raise Unavailable(f"cannot configure WireGuard device {state.ifname}: {exc}") from None
        if self._producer_rules is not None and peer is not None:
            ours = tuple(a.split("/")[0] for a in state.addresses)
            state.ruleset = rules.ProducerRules(
                state.ifname, self._producer_rules.protocol, ours, self._producer_rules.destinations
            ).render()
        if state.ruleset:
            rules.apply(state.ifname, state.ruleset)

    async def _supervise(self) -> None:
        failures = 0
        up_since = time.monotonic()
        while not self._closed:
            reason = await self._backend.wait_failed(self.state.ifname)
            if self._closed:
                return
            if time.monotonic() - up_since > STABLE:
                failures = 0  # it ran well for a while: count this failure afresh
            failures += 1
            log.warning(
                "WireGuard device failed", session_id=self.session_id, reason=reason, attempt=failures
            )
            if failures > RESTARTS:
                log.error("WireGuard device given up", session_id=self.session_id, reason=reason)
                self._given_up = True
                await self.close()
                return
            self._base = self._last  # the new process counts from zero
            try:
                await self._backend.destroy(self.state.ifname)
                await self._bring_up()
                up_since = time.monotonic()
                log.info("WireGuard device restored", session_id=self.session_id)
            except Unavailable as exc:
                log.warning("WireGuard device restart failed", session_id=self.session_id, error=exc.message)
                await asyncio.sleep(0.5)


def resolve_now(endpoint: str) -> tuple[str, int]:
    """(IP, port) of "HOST:PORT"; InvalidArgument if it is malformed or does not resolve."""
    address = Address.parse(endpoint, what="WireGuard endpoint")
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise InvalidArgument(f"cannot resolve WireGuard endpoint {endpoint}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), address.port


def _host_route(cidr: str) -> str:
    ip = cidr.split("/")[0]
    return f"{ip}/{128 if ':' in ip else 32}"


def blocks_of(addresses: tuple[str, ...], *, consumer: bool) -> list[Network]:
    """The session's blocks from one side's tunnel addresses (consumer: second host of each block)."""
    blocks = []
    for cidr in addresses:
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError:
            raise InvalidArgument(f"join refused: malformed tunnel address {cidr!r}") from None
        block = iface.network
        offset = CONSUMER if consumer else PRODUCER
        if block.prefixlen != BLOCK_PREFIX[block.version] or iface.ip != block.network_address + offset:
            raise InvalidArgument(f"join refused: tunnel address {cidr} is not a session block's host")
        blocks.append(block)
    if not blocks or len({b.version for b in blocks}) != len(blocks) or 4 not in {b.version for b in blocks}:
        raise InvalidArgument("join refused: need one IPv4 tunnel address and at most one per family")
    return blocks
