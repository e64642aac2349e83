"""The session manager: every session operation, for users (Control) and for other appliances (Peer).

Service handlers stay thin and call this; this calls the data-plane drivers. Each session's
operations are serialized by a per-session lock, so a release racing a join sees a consistent record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

import structlog

from appliance.api.scistream import v1 as api
from appliance.auth import ADMIN_ROLE, Principal
from appliance.dataplane.base import (
    ConsumerPlan,
    Credentials,
    Driver,
    PeerIdentity,
    ProducerPlan,
    Tunnel,
    WireGuardPeer,
)
from appliance.dataplane.wireguard.keys import derive_preshared_key
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from appliance.sessions import ticket as tk
from appliance.sessions.convert import mode_to_api, protocol_from_api, protocol_to_api
from appliance.sessions.model import Address, Mode, Protocol, Session, Side, State
from appliance.sessions.ports import PortAllocator
from appliance.sessions.store import PendingLeave, SessionSecrets, SessionStore
from quic_relay import generate_identity

log = structlog.get_logger(__name__)

SYSTEM = Principal("system", frozenset({ADMIN_ROLE}))
LEAVE_WINDOW = 300.0  # seconds a Leave's timestamp may differ from our clock
MAX_NUM_CONN = 1024
LEAVE_RETRY_FIRST = 1.0  # seconds before an undelivered Leave is sent again; doubles up to the max
LEAVE_RETRY_MAX = 30.0


class PeerLink(TypingProtocol):
    """The Peer service of another appliance (implemented over gRPC in appliance.control)."""

    async def challenge(self, request: api.ChallengeRequest) -> api.ChallengeResponse: ...
    async def join(self, request: api.JoinRequest) -> api.JoinResponse: ...
    async def leave(self, request: api.LeaveRequest) -> api.LeaveResponse: ...
    def close(self) -> None: ...


PeerConnector = Callable[[str, str], PeerLink]
"""Opens a PeerLink to a control address, pinning the given certificate fingerprint ("" = plaintext)."""


@dataclass(frozen=True)
class Identity:
    """How this appliance presents itself to peers."""

    address: str
    fingerprint: str


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def join_transcript(request: api.JoinRequest) -> tuple[bytes | str, ...]:
    return (
        request.session_id,
        request.client_nonce,
        request.server_nonce,
        request.consumer_session_id,
        request.consumer_address,
        request.consumer_fingerprint,
        _digest(request.data_certificate),
        request.wireguard.public_key,
        ",".join(request.wireguard.tunnel_addresses),
        request.wireguard.endpoint,
    )


class SessionManager:
    def __init__(
        self,
        *,
        store: SessionStore,
        ports: PortAllocator,
        drivers: dict[Mode, Driver],
        connect_peer: PeerConnector,
        identity: Identity,
        advertise_host: str,
        default_ttl: float = 24 * 3600,
        retention: float = 24 * 3600,
        peer_timeout: float = 10.0,
        peer_grace: float = 60.0,
    ) -> None:
        self._store = store
        self._ports = ports
        self._drivers = drivers
        self._connect_peer = connect_peer
        self._identity = identity
        self._advertise_host = advertise_host
        self._default_ttl = default_ttl
        self._retention = retention
        self._peer_timeout = peer_timeout
        self._peer_grace = peer_grace
        self._tunnels: dict[str, Tunnel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._nonces = tk.NonceBook()
        self._changed = asyncio.Condition()
        self._lease_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Undelivered Leaves (kept in the store): when each is due again, and its current back-off.
        self._leave_retry: dict[str, tuple[float, float]] = {}
        self._leaving: set[str] = set()  # Leaves being sent right now

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Restores live sessions from the store and starts the lease loop.

        First removes everything an earlier process of this appliance left on the host (after a
        SIGKILL its wireguard-go processes still hold the sessions' data ports), so each session is
        restored on the same ports. Restores do only local work (bind sockets, start devices): a tunnel
        whose peer appliance is not reachable yet comes up disconnected and keeps trying in the
        background, and the lease loop ends it after `peer_grace`. So start-up, and with it the control
        port, never waits on another appliance.
        """
        for driver in self._drivers.values():
            await driver.sweep(set())
        for session in self._store.all():
            if not session.ended:
                await self._restore(session)
        self._lease_task = asyncio.create_task(self._lease_loop(), name="leases")

    async def stop(self) -> None:
        """Closes every tunnel; live records stay live so the next start restores them."""
        for task in [self._lease_task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session_id in list(self._tunnels):
            await self._close_tunnel(session_id)

    @property
    def available_modes(self) -> list[Mode]:
        return sorted(self._drivers)

    # ---- user operations -------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        destinations: list[Address],
        mode: Mode,
        protocol: Protocol,
        num_conn: int = 1,
        rate_bps: int = 0,
        ttl: float = 0,
        session_id: str = "",
        secret: bytes = b"",
    ) -> tuple[Session, str]:
        """Session init on the producer side; returns the PENDING session and its ticket.

        `session_id` and `secret` are fresh unless given (the SciStream 1.2.1 service derives them).
        """
        if not destinations:
            raise InvalidArgument("at least one destination HOST:PORT is required")
        num_conn = self._check_num_conn(num_conn)
        driver = self._driver(mode, pick=True)
        session_id = session_id or str(uuid.uuid4())
        secret = secret or tk.new_secret()
        credentials = self._credentials(session_id, secret)
        session = Session(
            session_id=session_id,
            side=Side.PRODUCER,
            mode=driver.mode,
            protocol=protocol,
            owner=principal.subject,
            destinations=tuple(destinations),
            num_conn=num_conn,
            rate_bps=max(0, rate_bps),
            expires_at=time.time() + self._ttl(ttl),
        )
        plan = ProducerPlan(session_id, protocol, session.destinations, credentials)
        tunnel = await driver.open_producer(plan, self._ports, self._advertise_host)
        session = _with_mode_choice(replace(session, data_endpoints=tunnel.addresses), tunnel)
        self._tunnels[session_id] = tunnel
        self._store.put(session, self._secrets(secret, credentials, data_plane=tunnel.saved_state()))
        ticket = tk.Ticket(
            producer_address=self._identity.address,
            producer_fingerprint=self._identity.fingerprint,
            session_id=session_id,
            secret=secret,
            mode=session.mode.value,
            protocol=protocol.value,
        )
        log.info("session created", session_id=session_id, side="producer", mode=session.mode.value)
        await self._notify()
        return session, ticket.encode()

    async def join(
        self,
        principal: Principal,
        ticket_text: str,
        *,
        entry_ports: list[int] | None = None,
        bind_host: str = "",
        ttl: float = 0,
        session_id: str = "",
        num_conn: int = 0,
    ) -> Session:
        """Join on the consumer side: redeems the ticket with the producer appliance, binds entry points.

        `session_id` is fresh unless given (the SciStream 1.2.1 service reserves entry ports under it);
        `num_conn` entry points are bound, the producer side's number unless given (1.2.1 sets it per side).
        """
        ticket = tk.Ticket.decode(ticket_text)
        driver = self._driver(_parse(Mode, ticket.mode))
        _parse(Protocol, ticket.protocol)  # a damaged ticket fails here, before the peer is contacted
        for port in entry_ports or []:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"entry port {port} is outside 1-65535")
        session_id = session_id or str(uuid.uuid4())
        credentials = self._credentials(session_id, ticket.secret)
        peer = self._connect_peer(ticket.producer_address, ticket.producer_fingerprint)
        try:
            offer = driver.prepare_consumer(session_id, self._ports, self._advertise_host)
            response = await self._redeem(peer, ticket, session_id, credentials, offer)
            session = Session(
                session_id=session_id,
                side=Side.CONSUMER,
                mode=driver.mode,
                protocol=protocol_from_api(response.protocol),
                owner=principal.subject,
                state=State.ACTIVE,
                num_conn=max(1, num_conn or response.num_conn),
                rate_bps=response.rate_bps,
                destinations=tuple(Address.parse(a) for a in response.destinations),
                data_endpoints=tuple(Address.parse(a) for a in response.data_endpoints),
                expires_at=time.time() + self._ttl(ttl),
                peer_address=ticket.producer_address,
                peer_fingerprint=ticket.producer_fingerprint,
                peer_session_id=ticket.session_id,
            )
            plan = ConsumerPlan(
                session_id=session_id,
                protocol=session.protocol,
                credentials=credentials,
                peer_cert_pem=response.data_certificate,
                peer_server_name=response.server_name,
                data_endpoints=session.data_endpoints,
                destination_count=max(1, len(response.destinations)),
                num_conn=session.num_conn,
                entry_ports=tuple(entry_ports or ()),
                bind_host=bind_host,
                peer_wireguard=_wireguard_from_api(response.wireguard),
            )
            try:
                tunnel = await driver.open_consumer(plan, self._ports, self._advertise_host)
            except BaseException as exc:
                # The producer side already went ACTIVE for us: tell it, so nothing stays half-alive.
                reason = exc.message if isinstance(exc, ApplianceError) else "consumer side failed to start"
                await self._send_leave(peer, ticket.secret, ticket.session_id, f"join failed: {reason}")
                raise
        except BaseException:
            driver.abandon(session_id)
            raise
        finally:
            peer.close()
        session = _with_mode_choice(replace(session, entry_points=tunnel.addresses), tunnel)
        self._tunnels[session_id] = tunnel
        secrets = self._secrets(
            ticket.secret, credentials, peer_cert=response.data_certificate, data_plane=tunnel.saved_state()
        )
        self._store.put(session, secrets)
        log.info("session joined", session_id=session_id, side="consumer", peer_session=ticket.session_id)
        await self._notify()
        return session

    async def release(self, principal: Principal, session_id: str, reason: str = "released") -> Session:
        """Tears this side down, then tells the peer appliance (best effort, bounded by peer_timeout)."""
        async with self._lock(session_id):
            session = self._owned(principal, session_id)
            if session.ended:
                raise FailedPrecondition(f"session {session_id} is already {session.state}")
            secrets = self._store.secrets(session_id)
            session = await self._end(session, State.RELEASED, reason)
        if secrets:
            await self._tell_peer(session, secrets.secret, reason)
        return session

    def get(self, principal: Principal, session_id: str) -> Session:
        return self._with_counters(self._owned(principal, session_id))

    def list(self, principal: Principal) -> list[Session]:
        return [self._with_counters(s) for s in self._store.all() if principal.may_access(s.owner)]

    async def watch(
        self, principal: Principal, session_id: str, interval: float = 1.0
    ) -> AsyncIterator[Session]:
        """The session now, then on every change of state or counters, until it ends."""
        last: Session | None = None
        while True:
            session = self.get(principal, session_id)
            if session != last:
                yield session
                last = session
            if session.ended:
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), interval)

    # ---- peer operations -------------------------------------------------------------------

    def challenge(self, session_id: str) -> bytes:
        self._joinable(session_id)
        return self._nonces.issue(session_id)

    async def peer_join(self, request: api.JoinRequest) -> api.JoinResponse:
        """Producer side: verifies the consumer side's proof, admits its data-plane certificate."""
        async with self._lock(request.session_id):
            session = self._joinable(request.session_id)
            secrets = self._store.secrets(session.session_id)
            if secrets is None:
                raise NotFound(f"session {request.session_id} not found")
            if not self._nonces.consume(session.session_id, request.server_nonce):
                raise PermissionDenied("join refused: stale or unknown challenge")
            if not tk.verify(secrets.secret, request.proof, tk.JOIN_LABEL, *join_transcript(request)):
                raise PermissionDenied("join refused: the proof does not match the session secret")
            if not request.data_certificate:
                raise InvalidArgument("join refused: no data-plane certificate")
            tunnel = self._tunnels[session.session_id]
            tunnel.admit(PeerIdentity(request.data_certificate, _wireguard_from_api(request.wireguard)))
            session = replace(
                session.transition(State.ACTIVE),
                peer_address=request.consumer_address,
                peer_fingerprint=request.consumer_fingerprint,
                peer_session_id=request.consumer_session_id,
            )
            secrets = replace(
                secrets, peer_cert_pem=request.data_certificate, data_plane=tunnel.saved_state()
            )
            self._store.put(session, secrets)
            self._nonces.forget(session.session_id)
        log.info("session active", session_id=session.session_id, peer=request.consumer_address)
        await self._notify()
        response = api.JoinResponse(
            mode=mode_to_api(session.mode),
            protocol=protocol_to_api(session.protocol),
            data_certificate=secrets.cert_pem,
            data_endpoints=[str(a) for a in session.data_endpoints],
            destinations=[str(a) for a in session.destinations],
            num_conn=session.num_conn,
            server_name=secrets.server_name,
            rate_bps=session.rate_bps,
        )
        if tunnel.wireguard is not None:
            response.wireguard = _wireguard_to_api(tunnel.wireguard)
        response.proof = tk.mac(secrets.secret, tk.ACCEPT_LABEL, *_accept_items(request, response))
        return response

    async def peer_leave(self, request: api.LeaveRequest) -> None:
        """The peer appliance released its side; release ours. Idempotent."""
        secrets = self._store.secrets(request.session_id)
        session = self._store.get(request.session_id)
        if session is None:
            raise NotFound(f"session {request.session_id} not found")
        if secrets is None or session.ended:
            return  # already ended here: nothing to free
        if abs(time.time() - request.timestamp) > LEAVE_WINDOW:
            raise PermissionDenied("leave refused: timestamp outside the freshness window")
        items = (request.session_id, request.nonce, request.timestamp)
        if not tk.verify(secrets.secret, request.proof, tk.LEAVE_LABEL, *items):
            raise PermissionDenied("leave refused: the proof does not match the session secret")
        async with self._lock(request.session_id):
            current = self._store.get(request.session_id)
            if current is not None and not current.ended:
                reason = f"released by peer: {request.reason}" if request.reason else "released by peer"
                await self._end(current, State.RELEASED, reason)

    # ---- internals ---------------------------------------------------------------------------

    async def _redeem(
        self,
        peer: PeerLink,
        ticket: tk.Ticket,
        session_id: str,
        credentials: Credentials,
        offer: WireGuardPeer | None = None,
    ) -> api.JoinResponse:
        timeout = self._peer_timeout
        challenge = await asyncio.wait_for(
            peer.challenge(api.ChallengeRequest(session_id=ticket.session_id)), timeout
        )
        request = api.JoinRequest(
            session_id=ticket.session_id,
            client_nonce=tk.new_nonce(),
            server_nonce=challenge.server_nonce,
            consumer_session_id=session_id,
            consumer_address=self._identity.address,
            consumer_fingerprint=self._identity.fingerprint,
            data_certificate=credentials.cert_pem,
        )
        if offer is not None:
            request.wireguard = _wireguard_to_api(offer)
        request.proof = tk.mac(ticket.secret, tk.JOIN_LABEL, *join_transcript(request))
        response = await asyncio.wait_for(peer.join(request), timeout)
        if not tk.verify(ticket.secret, response.proof, tk.ACCEPT_LABEL, *_accept_items(request, response)):
            await self._send_leave(peer, ticket.secret, ticket.session_id, "producer proof invalid")
            raise PermissionDenied("the producer appliance could not prove it knows the session secret")
        if not response.data_endpoints:
            raise FailedPrecondition("the producer appliance sent no data endpoint")
        return response

    async def _tell_peer(self, session: Session, secret: bytes, reason: str) -> None:
        """Sends Leave for `session` to its peer appliance, if it has one. A Leave the peer does not
        answer stays in the store and is sent again (see `_retry_leaves`), across restarts, until the
        peer answers or the session's lease would have ended."""
        if not (session.peer_address and session.peer_session_id):
            return
        leave = PendingLeave(
            session_id=session.session_id,
            peer_address=session.peer_address,
            peer_fingerprint=session.peer_fingerprint,
            peer_session_id=session.peer_session_id,
            secret=secret,
            reason=reason,
            until=session.expires_at or time.time() + self._default_ttl,
        )
        self._store.put_leave(leave)
        await self._deliver(leave)

    async def _deliver(self, leave: PendingLeave) -> None:
        """One attempt at a pending Leave: forgotten once the peer answered, else due again later."""
        if leave.session_id in self._leaving:
            return
        self._leaving.add(leave.session_id)
        try:
            peer = self._connect_peer(leave.peer_address, leave.peer_fingerprint)
            try:
                answered = await self._send_leave(peer, leave.secret, leave.peer_session_id, leave.reason)
            finally:
                peer.close()
        finally:
            self._leaving.discard(leave.session_id)
        if answered:
            self._store.drop_leave(leave.session_id)
            self._leave_retry.pop(leave.session_id, None)
            return
        _, delay = self._leave_retry.get(leave.session_id, (0.0, LEAVE_RETRY_FIRST / 2))
        delay = min(2 * delay, LEAVE_RETRY_MAX)
        self._leave_retry[leave.session_id] = (time.monotonic() + delay, delay)

    def _retry_leaves(self) -> None:
        """Sends the pending Leaves that are due, in the background; drops those past their lease."""
        now = time.monotonic()
        for leave in self._store.leaves():
            if leave.until <= time.time():
                self._store.drop_leave(leave.session_id)
                self._leave_retry.pop(leave.session_id, None)
                log.warning("gave up telling the peer appliance", peer_session=leave.peer_session_id)
            elif self._leave_retry.get(leave.session_id, (0.0, 0.0))[0] <= now:
                self._in_background(self._deliver(leave))

    async def _send_leave(self, peer: PeerLink, secret: bytes, peer_session_id: str, reason: str) -> bool:
        """True once the peer appliance answered (whatever it said: a refusal will not change when
        asked again); False when it could not be reached."""
        nonce, timestamp = tk.new_nonce(), int(time.time())
        request = api.LeaveRequest(
            session_id=peer_session_id,
            nonce=nonce,
            timestamp=timestamp,
            proof=tk.mac(secret, tk.LEAVE_LABEL, peer_session_id, nonce, timestamp),
            reason=reason,
        )
        try:
            await asyncio.wait_for(peer.leave(request), self._peer_timeout)
        except (Unavailable, DeadlineExceeded, OSError, TimeoutError) as exc:
            log.warning("could not tell the peer appliance", peer_session=peer_session_id, error=str(exc))
            return False
        except ApplianceError as exc:
            log.info("the peer appliance refused the leave", peer_session=peer_session_id, error=exc.message)
        return True

    async def _end(self, session: Session, state: State, reason: str) -> Session:
        """Frees the session's resources and records its final state and counters."""
        counters = self._with_counters(session)
        await self._close_tunnel(session.session_id)
        session = replace(counters.transition(state, reason))
        self._store.put(session)
        self._nonces.forget(session.session_id)
        log.info("session ended", session_id=session.session_id, state=state.value, reason=reason)
        await self._notify()
        return session

    async def _close_tunnel(self, session_id: str) -> None:
        tunnel = self._tunnels.pop(session_id, None)
        try:
            if tunnel is not None:
                await tunnel.close()
        finally:
            self._ports.release(session_id)

    async def _restore(self, session: Session) -> None:
        secrets = self._store.secrets(session.session_id)
        try:
            if secrets is None:
                raise FailedPrecondition("secrets missing")
            tunnel = await self._reopen(session, secrets)
        except (ApplianceError, OSError) as exc:
            reason = exc.message if isinstance(exc, ApplianceError) else str(exc)
            self._ports.release(session.session_id)
            session = session.transition(State.FAILED, f"not restored after restart: {reason}")
            self._store.put(session)
            log.warning("session not restored", session_id=session.session_id, reason=reason)
            if secrets is not None:
                # In the background: the peer may be restarting too, and start-up must not wait for it.
                self._in_background(self._tell_peer(session, secrets.secret, session.reason))
            return
        self._tunnels[session.session_id] = tunnel
        log.info("session restored", session_id=session.session_id, state=session.state.value)

    async def _reopen(self, session: Session, secrets: SessionSecrets) -> Tunnel:
        driver = self._driver(session.mode)
        psk = derive_preshared_key(secrets.secret)
        credentials = Credentials(secrets.cert_pem, secrets.key_pem, secrets.server_name, psk)
        if session.side is Side.PRODUCER:
            plan = ProducerPlan(
                session.session_id,
                session.protocol,
                session.destinations,
                credentials,
                session.data_endpoints,
                secrets.data_plane,
            )
            tunnel = await driver.open_producer(plan, self._ports, self._advertise_host)
            if secrets.peer_cert_pem:
                tunnel.authorize(secrets.peer_cert_pem)
            return tunnel
        consumer = ConsumerPlan(
            session_id=session.session_id,
            protocol=session.protocol,
            credentials=credentials,
            peer_cert_pem=secrets.peer_cert_pem,
            peer_server_name=_peer_server_name(session),
            data_endpoints=session.data_endpoints,
            destination_count=max(1, len(session.destinations)),
            num_conn=session.num_conn,
            entry_ports=tuple(a.port for a in session.entry_points),
            saved_state=secrets.data_plane,
            restoring=True,
        )
        return await driver.open_consumer(consumer, self._ports, self._advertise_host)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail_absent_peers(self) -> None:
        """Fails ACTIVE sessions whose data plane has lacked the peer appliance for over `peer_grace`,
        freeing their resources, and tells the peer (best effort), so neither side stays half-alive."""
        for session_id, tunnel in list(self._tunnels.items()):
            absent = tunnel.peer_absent_for()
            if absent is None or absent <= self._peer_grace:
                continue
            async with self._lock(session_id):
                session = self._store.get(session_id)
                if session is None or session.state is not State.ACTIVE:
                    continue
                secrets = self._store.secrets(session_id)
                peer = "consumer" if session.side is Side.PRODUCER else "producer"
                session = await self._end(session, State.FAILED, f"{peer} appliance unreachable")
            if secrets is not None:
                self._in_background(self._tell_peer(session, secrets.secret, session.reason))

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._fail_absent_peers()
            self._retry_leaves()
            now = time.time()
            for session in self._store.all():
                if not session.ended and session.expires_at and session.expires_at <= now:
                    with contextlib.suppress(ApplianceError):
                        await self.release(SYSTEM, session.session_id, "lease expired")
            self._store.purge_ended(now - self._retention)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _owned(self, principal: Principal, session_id: str) -> Session:
        session = self._store.get(session_id)
        # Someone else's session is reported as missing, so ids cannot be probed.
        if session is None or not principal.may_access(session.owner):
            raise NotFound(f"session {session_id} not found")
        return session

    def _joinable(self, session_id: str) -> Session:
        session = self._store.get(session_id)
        if session is None or session.side is not Side.PRODUCER:
            raise NotFound(f"session {session_id} not found")
        if session.state is not State.PENDING:
            raise AlreadyExists(f"session {session_id} was already joined (it is {session.state})")
        return session

    def _with_counters(self, session: Session) -> Session:
        tunnel = self._tunnels.get(session.session_id)
        if tunnel is None:
            return session
        counters = tunnel.counters()
        # Auto mode's producer side learns the mode from where the traffic arrives: shown, not stored
        # (a restore still opens both endpoints).
        return _with_mode_choice(
            replace(
                session,
                bytes_in=counters.bytes_in,
                bytes_out=counters.bytes_out,
                packet_size=counters.packet_size,
            ),
            tunnel,
        )

    def _driver(self, mode: Mode, *, pick: bool = False) -> Driver:
        """The driver of `mode`. With `pick` (session init), auto means the best available; elsewhere
        (a ticket, a restore) it means the auto driver: QUIC with a TLS fallback."""
        if mode is Mode.AUTO and pick:
            for preferred in (Mode.WIREGUARD, Mode.AUTO, Mode.QUIC, Mode.TLS):
                if preferred in self._drivers and self._drivers[preferred].auto_eligible:
                    return self._drivers[preferred]
        driver = self._drivers.get(mode)
        if driver is None:
            available = ", ".join(m.value for m in self.available_modes)
            raise InvalidArgument(
                f"mode {mode.value} is not available on this appliance (available: {available})"
            )
        return driver

    def _ttl(self, ttl: float) -> float:
        if ttl < 0:
            raise InvalidArgument("ttl must not be negative")
        return ttl or self._default_ttl

    @staticmethod
    def _check_num_conn(num_conn: int) -> int:
        if not 0 <= num_conn <= MAX_NUM_CONN:
            raise InvalidArgument(f"num-conn must be between 1 and {MAX_NUM_CONN}")
        return num_conn or 1

    @staticmethod
    def _credentials(session_id: str, secret: bytes) -> Credentials:
        server_name = f"{session_id}.session.scistream"
        identity = generate_identity(server_name)
        return Credentials(identity.cert_pem, identity.key_pem, server_name, derive_preshared_key(secret))

    @staticmethod
    def _secrets(
        secret: bytes, credentials: Credentials, peer_cert: bytes = b"", data_plane: bytes = b""
    ) -> SessionSecrets:
        return SessionSecrets(
            secret=secret,
            cert_pem=credentials.cert_pem,
            key_pem=credentials.key_pem,
            server_name=credentials.server_name,
            peer_cert_pem=peer_cert,
            data_plane=data_plane,
        )


def _accept_items(request: api.JoinRequest, response: api.JoinResponse) -> tuple[bytes | str | int, ...]:
    return (
        request.proof,
        _digest(response.data_certificate),
        response.server_name,
        ",".join(response.data_endpoints),
        ",".join(response.destinations),
        response.num_conn,
        int(response.mode),
        int(response.protocol),
        response.wireguard.public_key,
        ",".join(response.wireguard.tunnel_addresses),
    )


def _wireguard_from_api(message: api.WireGuardPeer) -> WireGuardPeer | None:
    """None when the message is empty (modes other than WireGuard)."""
    if not (message.public_key or message.tunnel_addresses):
        return None
    return WireGuardPeer(message.public_key, tuple(message.tunnel_addresses), message.endpoint)


def _wireguard_to_api(peer: WireGuardPeer) -> api.WireGuardPeer:
    return api.WireGuardPeer(
        public_key=peer.public_key, tunnel_addresses=list(peer.tunnel_addresses), endpoint=peer.endpoint
    )


_E = TypeVar("_E", Mode, Protocol)


def _parse(kind: type[_E], value: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(f"ticket names an unknown {kind.__name__.lower()} {value!r}") from None


def _with_mode_choice(session: Session, tunnel: Tunnel) -> Session:
    """The session with the mode its tunnel chose, and why, where it chose one (auto mode)."""
    choice = tunnel.mode_choice()
    return session if choice is None else replace(session, mode=choice[0], reason=choice[1])


def _peer_server_name(session: Session) -> str:
    return f"{session.peer_session_id}.session.scistream"
