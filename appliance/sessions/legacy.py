"""SciStream 1.2.1's req / hello / update / release, mapped onto our sessions.

1.2.1 has no ticket: the client-chosen `uid` is the only thing both sides share. So the uid is the
session secret here. Both appliances derive from it the producer side's session id and a 256-bit
secret (HKDF), and the consumer appliance joins with a ticket it synthesizes from the producer
appliance's listeners: Peer.Join then proves, both ways, that each side knows the uid.

- Producer side (`req` role PROD): once its hello arrives, a producer session is created with the
  hello's `prod_listeners` as destinations; its data endpoints are the `listeners` the req returns.
- Consumer side (any other role): once its hello arrives, entry ports are reserved (the hello's ports,
  i.e. s2uc's `--receiver_ports`, first; then the port range) and returned as `listeners`; `update`
  with the producer appliance's listeners joins the producer session and binds exactly those ports.

Nothing here blocks a thread: a `req` waits for its hello as an asyncio future, bounded by
`hello_timeout`, and everything a waiting uid holds is freed when it times out, is released or
cancelled, or the appliance stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.auth import Principal
from appliance.dataplane.quic import public
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from appliance.sessions import ticket as tk
from appliance.sessions.manager import SYSTEM, SessionManager
from appliance.sessions.model import Address, Mode, Protocol, Session, Side
from appliance.sessions.ports import TCP, PortAllocator

log = structlog.get_logger(__name__)

PRODUCER_ROLE = "PROD"
_ID_NAMESPACE = uuid.UUID("6f1d0c7e-5b0e-4b8e-9a57-5c15c0a11e9a")
_SECRET_SALT = b"scistream-legacy-1.2.1"

# Verifies (or, without a CA, fetches) a producer appliance's control certificate; returns its pin.
PeerPinner = Callable[[Address], Awaitable[str]]


def session_id_for(uid: str, side: Side) -> str:
    """The session id each side's appliance gives the session of `uid` (the consumer computes both)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{side.value}:{uid}"))


def secret_for(uid: str) -> bytes:
    """The 256-bit session secret both appliances derive from `uid`."""
    hkdf = HKDF(hashes.SHA256(), tk.SECRET_BYTES, salt=_SECRET_SALT, info=b"session secret")
    return hkdf.derive(uid.encode())


def parse_listeners(values: list[str], what: str) -> list[Address]:
    return [Address.parse(v, what=what) for v in values if v.strip()]


@dataclass
class _Pending:
    """A uid between its first call and the session that replaces it (or its end)."""

    uid: str
    owner: str
    client: str  # the caller's IP address, for the per-client bound
    hello: asyncio.Future[tuple[str, ...]]
    side: Side | None = None  # known once req arrives
    num_conn: int = 1
    entry_points: tuple[Address, ...] = ()  # consumer side: reserved, awaiting update
    busy: bool = False  # a req is being answered, or an update is joining
    expiry: asyncio.TimerHandle | None = None


class LegacyCoordinator:
    """The state of SciStream 1.2.1 calls that have no session yet; sessions themselves are the manager's."""

    def __init__(
        self,
        manager: SessionManager,
        ports: PortAllocator,
        *,
        advertise_host: str,
        mode: Mode = Mode.TLS,
        hello_timeout: float = 180.0,
        peer_port: int = 5000,
        pin_peer: PeerPinner,
        max_pending: int = 256,
        max_pending_per_client: int = 32,
    ) -> None:
        self._manager = manager
        self._ports = ports
        self._advertise_host = advertise_host
        self._mode = mode
        self._hello_timeout = hello_timeout
        self._peer_port = peer_port
        self._pin_peer = pin_peer
        self._pending: dict[str, _Pending] = {}
        self._max_pending = max_pending
        self._max_pending_per_client = max_pending_per_client
        self._warned = False

    @property
    def pending_uids(self) -> list[str]:
        """Uids that have no session yet: waiting for a hello, a req, or (consumer side) an update."""
        return sorted(self._pending)

    # ---- the four calls ------------------------------------------------------------------------

    async def request(
        self, principal: Principal, uid: str, role: str, num_conn: int, client: str = ""
    ) -> tuple[list[str], list[str]]:
        """`req`: registers `uid` for a side, waits for its hello; returns (listeners, prod_listeners)."""
        self._warn_once()
        _check_uid(uid)
        if not 0 <= num_conn <= 1024:
            raise InvalidArgument("num_conn must be between 1 and 1024")
        side = Side.PRODUCER if role == PRODUCER_ROLE else Side.CONSUMER
        entry = self._pending.get(uid)
        if entry is None:
            self._refuse_live(uid)
            entry = self._new_entry(uid, principal, client, self._new_future())
        elif entry.side is not None or not principal.may_access(entry.owner):
            raise AlreadyExists(f"uid {uid} is already in use")
        self._cancel_expiry(entry)
        entry.side, entry.num_conn = side, num_conn or 1
        log.info("legacy request", uid=uid, side=side.value, hello_received=entry.hello.done())
        try:
            hello = await self._wait_hello(entry)
            entry.busy = True
            if side is Side.PRODUCER:
                listeners = await self._open_producer(principal, entry, hello)
                await self._unless_released(principal, entry, session_id_for(uid, Side.PRODUCER))
                self._drop(entry)
            else:
                listeners = self._reserve_entry_points(entry, hello)
                entry.busy = False
                self._expire_later(entry)  # the update must come within the same bound
        except BaseException:  # a timeout, an error, or the client went away: nothing stays behind
            self._drop(entry)
            raise
        return [str(a) for a in listeners], list(hello)

    def hello(self, principal: Principal, uid: str, prod_listeners: list[str], client: str = "") -> str:
        """`hello`: hands the app's listeners to the waiting req, or keeps them until it comes."""
        _check_uid(uid)
        parse_listeners(prod_listeners, "prod_listener")  # bad input fails here, not in the req
        listeners = tuple(v.strip() for v in prod_listeners if v.strip())
        entry = self._pending.get(uid)
        if entry is None:
            self._refuse_live(uid)
            future = self._new_future()
            entry = self._new_entry(uid, principal, client, future)
            future.set_result(listeners)
            self._expire_later(entry)
            log.info("legacy hello before its request", uid=uid)
            return f"hello for {uid} registered; waiting for its request"
        if not principal.may_access(entry.owner):
            raise NotFound(f"uid {uid} not found")
        if entry.hello.done():
            raise AlreadyExists(f"hello for uid {uid} was already received")
        entry.hello.set_result(listeners)
        return f"hello for {uid} received"

    async def update(
        self, principal: Principal, uid: str, remote_listeners: list[str]
    ) -> tuple[list[str], list[str]]:
        """`update`: producer side checks its destinations; consumer side joins the producer session."""
        _check_uid(uid)
        entry = self._pending.get(uid)
        if entry is None:
            producer = self._live(principal, session_id_for(uid, Side.PRODUCER))
            if producer is not None:
                return self._confirm_producer(producer, remote_listeners)
            if self._live(principal, session_id_for(uid, Side.CONSUMER)) is not None:
                raise AlreadyExists(f"uid {uid} was already updated")
            raise NotFound(f"uid {uid} not found")
        if not principal.may_access(entry.owner):
            raise NotFound(f"uid {uid} not found")
        if entry.side is not Side.CONSUMER or entry.busy or not entry.entry_points:
            raise FailedPrecondition(f"uid {uid} has no completed request yet (req, then hello, then update)")
        targets = parse_listeners(remote_listeners, "remote_listener")
        if not targets:
            raise InvalidArgument("update needs the producer appliance's listeners (remote_listeners)")
        entry.busy = True
        self._cancel_expiry(entry)
        try:
            session = await self._join(principal, entry, targets[0].host)
            await self._unless_released(principal, entry, session.session_id)
        finally:
            self._drop(entry)
        return [str(a) for a in session.entry_points], [str(a) for a in targets]

    async def release(self, principal: Principal, uid: str) -> None:
        """`release`: frees whatever `uid` holds here; a live session is released and its peer told."""
        _check_uid(uid)
        entry = self._pending.get(uid)
        if entry is not None:
            if not principal.may_access(entry.owner):
                raise NotFound(f"uid {uid} not found")
            self._fail_waiting(entry, FailedPrecondition(f"uid {uid} was released before its hello arrived"))
            self._drop(entry)
            return
        found = False
        for side in Side:
            with contextlib.suppress(NotFound):
                session = self._manager.get(principal, session_id_for(uid, side))
                found = True
                if not session.ended:
                    await self._manager.release(principal, session.session_id)
        if not found:
            raise NotFound(f"uid {uid} not found")

    async def stop(self) -> None:
        """Fails every waiting req and frees every reservation (SIGTERM)."""
        for entry in list(self._pending.values()):
            self._fail_waiting(entry, Unavailable("the appliance is stopping"))
            self._drop(entry)

    # ---- internals ---------------------------------------------------------------------------

    async def _wait_hello(self, entry: _Pending) -> tuple[str, ...]:
        try:
            return await asyncio.wait_for(asyncio.shield(entry.hello), self._hello_timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no hello for uid {entry.uid} within {self._hello_timeout:g} s; the request was dropped"
            ) from None

    async def _open_producer(
        self, principal: Principal, entry: _Pending, hello: tuple[str, ...]
    ) -> tuple[Address, ...]:
        destinations = parse_listeners(list(hello), "prod_listener")
        if not destinations:
            raise InvalidArgument(f"the hello for uid {entry.uid} carried no prod_listeners")
        session, _ = await self._manager.create(
            principal,
            destinations=destinations,
            mode=self._mode,
            protocol=Protocol.TCP,
            num_conn=entry.num_conn,
            session_id=session_id_for(entry.uid, Side.PRODUCER),
            secret=secret_for(entry.uid),
        )
        log.info("legacy producer session", uid=entry.uid, session_id=session.session_id)
        return session.data_endpoints

    def _reserve_entry_points(self, entry: _Pending, hello: tuple[str, ...]) -> tuple[Address, ...]:
        """Consumer side: the hello's ports first (s2uc's --receiver_ports), then ports from the range."""
        owner = session_id_for(entry.uid, Side.CONSUMER)
        wanted = [a.port for a in parse_listeners(list(hello), "receiver port")][: entry.num_conn]
        try:
            ports = [self._ports.claim(owner, port, TCP) for port in wanted]
            ports += [self._ports.allocate(owner, TCP) for _ in range(entry.num_conn - len(ports))]
        except ApplianceError:
            self._ports.release(owner)
            raise
        entry.entry_points = tuple(public(self._ports.bind_host, p, self._advertise_host) for p in ports)
        return entry.entry_points

    async def _join(self, principal: Principal, entry: _Pending, producer_host: str) -> Session:
        address = Address(producer_host, self._peer_port)
        fingerprint = await self._pin_peer(address)
        ticket = tk.Ticket(
            producer_address=str(address),
            producer_fingerprint=fingerprint,
            session_id=session_id_for(entry.uid, Side.PRODUCER),
            secret=secret_for(entry.uid),
            mode=self._mode.value,
            protocol=Protocol.TCP.value,
        )
        session = await self._manager.join(
            principal,
            ticket.encode(),
            entry_ports=[a.port for a in entry.entry_points],
            session_id=session_id_for(entry.uid, Side.CONSUMER),
            num_conn=len(entry.entry_points),
        )
        log.info("legacy consumer session", uid=entry.uid, session_id=session.session_id, peer=str(address))
        return session

    def _confirm_producer(self, session: Session, remote_listeners: list[str]) -> tuple[list[str], list[str]]:
        targets = parse_listeners(remote_listeners, "remote_listener")
        if targets and set(targets) != set(session.destinations):
            raise InvalidArgument(
                "on the producer side update's remote_listeners must be the hello's prod_listeners "
                f"({', '.join(map(str, session.destinations))})"
            )
        return [str(a) for a in session.data_endpoints], [str(a) for a in session.destinations]

    def _live(self, principal: Principal, session_id: str) -> Session | None:
        with contextlib.suppress(NotFound):
            session = self._manager.get(principal, session_id)
            return None if session.ended else session
        return None

    def _refuse_live(self, uid: str) -> None:
        for side in Side:
            if self._live(SYSTEM, session_id_for(uid, side)) is not None:
                raise AlreadyExists(f"uid {uid} already has a session on this appliance")

    def _new_entry(
        self, uid: str, principal: Principal, client: str, hello: asyncio.Future[tuple[str, ...]]
    ) -> _Pending:
        self._admit(client)
        entry = _Pending(uid=uid, owner=principal.subject, client=client, hello=hello)
        self._pending[uid] = entry
        return entry

    def _admit(self, client: str) -> None:
        """Bounds the uids waiting for their next call: each may hold a call (a req waiting for its
        hello) or ports for up to `hello_timeout`, so one client, or all, cannot pile them up."""
        if len(self._pending) >= self._max_pending:
            raise ResourceExhausted(
                f"{len(self._pending)} SciStream 1.2.1 uids are already waiting for their next call "
                "on this appliance; try again later"
            )
        waiting = sum(1 for entry in self._pending.values() if entry.client == client)
        if waiting >= self._max_pending_per_client:
            raise ResourceExhausted(
                f"{waiting} SciStream 1.2.1 uids from {client or 'this client'} are already waiting for "
                "their next call (a req for its hello, a hello for its req, listeners for their update); "
                "complete or release them first"
            )

    @staticmethod
    def _new_future() -> asyncio.Future[tuple[str, ...]]:
        return asyncio.get_running_loop().create_future()

    def _expire_later(self, entry: _Pending) -> None:
        """Drops `entry` (and frees what it reserved) unless the next call comes within the timeout."""
        self._cancel_expiry(entry)

        def expire() -> None:
            if self._pending.get(entry.uid) is entry and not entry.busy:
                log.info("legacy uid expired", uid=entry.uid)
                self._drop(entry)

        entry.expiry = asyncio.get_running_loop().call_later(self._hello_timeout, expire)

    @staticmethod
    def _cancel_expiry(entry: _Pending) -> None:
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None

    async def _unless_released(self, principal: Principal, entry: _Pending, session_id: str) -> None:
        """A release that came while `entry` was being set up wins: the new session is released."""
        if self._pending.get(entry.uid) is not entry:
            await self._manager.release(principal, session_id, "released during setup")
            raise FailedPrecondition(f"uid {entry.uid} was released while being set up")

    @staticmethod
    def _fail_waiting(entry: _Pending, error: ApplianceError) -> None:
        """Ends the req waiting for `entry`'s hello, if one is, with `error`."""
        if entry.side is not None and not entry.hello.done():
            entry.hello.set_exception(error)

    def _drop(self, entry: _Pending) -> None:
        """Forgets `entry` (if still current) and frees the ports it reserved."""
        if self._pending.get(entry.uid) is entry:
            del self._pending[entry.uid]
        self._cancel_expiry(entry)
        if entry.entry_points:
            owner = session_id_for(entry.uid, Side.CONSUMER)
            # Only a reservation: once joined, the ports belong to the live session under the same owner.
            if self._live(SYSTEM, owner) is None:
                self._ports.release(owner)

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "SciStream 1.2.1 protocol in use: its uid is the only session secret and 1.2.1 clients "
                "make guessable ones (uuid1); prefer `scistream inbound/outbound`, whose tickets carry "
                "256-bit secrets"
            )


def _check_uid(uid: str) -> None:
    if not uid.strip():
        raise InvalidArgument("uid is required")
