"""The Control and Peer services: authenticate, convert, call the session manager. Nothing else."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import ParamSpec, TypeVar

import structlog
from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError

from appliance.api.scistream import v1 as api
from appliance.auth import Authenticator, Principal
from appliance.errors import ApplianceError, InvalidArgument, to_grpc
from appliance.sessions.convert import mode_from_api, protocol_from_api, session_to_api
from appliance.sessions.manager import SessionManager
from appliance.sessions.model import parse_destinations

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

# Methods that act for a user and so need a bearer token. Peer calls prove the session secret instead.
USER_SERVICES = ("/scistream.v1.Control/", "/scistream.Control/")


def current_principal() -> Principal:
    return _principal.get()


def authenticate_calls(authenticator: Authenticator) -> Callable[[RecvRequest], Coroutine[None, None, None]]:
    """A RecvRequest listener that authenticates user calls before their handler runs."""

    async def on_request(event: RecvRequest) -> None:
        if not event.method_name.startswith(USER_SERVICES):
            return
        value = event.metadata.get("authorization")
        try:
            principal = await authenticator.authenticate(value if isinstance(value, str) else None)
        except ApplianceError as exc:
            raise to_grpc(exc) from None
        # Same task as the handler, so the handler sees this value.
        _principal.set(principal)

    return on_request


def grpc_errors(handler: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[None, None, R]]:
    """Maps our exceptions to their status; anything unexpected is INTERNAL, never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except ApplianceError as exc:
            raise to_grpc(exc) from None
        except GRPCError:
            raise
        except Exception:
            log.exception("unexpected error", method=handler.__name__)
            raise GRPCError(Status.INTERNAL, "internal error (see the appliance log)") from None

    return wrapper


def _ttl(seconds: int) -> float:
    return float(seconds)


class ControlService(api.ControlBase):
    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    @grpc_errors
    async def create_session(self, request: api.CreateSessionRequest) -> api.CreateSessionResponse:
        session, ticket = await self._manager.create(
            current_principal(),
            destinations=parse_destinations(list(request.destinations)),
            mode=mode_from_api(request.mode),
            protocol=protocol_from_api(request.protocol),
            num_conn=request.num_conn,
            rate_bps=request.rate_bps,
            ttl=_ttl(request.ttl_seconds),
        )
        return api.CreateSessionResponse(session=session_to_api(session), ticket=ticket)

    @grpc_errors
    async def join_session(self, request: api.JoinSessionRequest) -> api.JoinSessionResponse:
        if not request.ticket.strip():
            raise InvalidArgument("a ticket is required")
        session = await self._manager.join(
            current_principal(),
            request.ticket,
            entry_ports=list(request.entry_ports),
            bind_host=request.bind_host,
            ttl=_ttl(request.ttl_seconds),
        )
        return api.JoinSessionResponse(session=session_to_api(session))

    @grpc_errors
    async def release_session(self, request: api.ReleaseSessionRequest) -> api.ReleaseSessionResponse:
        session = await self._manager.release(current_principal(), request.session_id)
        return api.ReleaseSessionResponse(session=session_to_api(session))

    @grpc_errors
    async def get_session(self, request: api.GetSessionRequest) -> api.GetSessionResponse:
        return api.GetSessionResponse(
            session=session_to_api(self._manager.get(current_principal(), request.session_id))
        )

    @grpc_errors
    async def list_sessions(self, request: api.ListSessionsRequest) -> api.ListSessionsResponse:
        sessions = self._manager.list(current_principal())
        return api.ListSessionsResponse(sessions=[session_to_api(s) for s in sessions])

    async def watch_session(self, request: api.WatchSessionRequest) -> AsyncIterator[api.Session]:
        interval = (request.interval_ms or 1000) / 1000
        try:
            async for session in self._manager.watch(current_principal(), request.session_id, interval):
                yield session_to_api(session)
        except ApplianceError as exc:
            raise to_grpc(exc) from None


class PeerService(api.PeerBase):
    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    @grpc_errors
    async def challenge(self, request: api.ChallengeRequest) -> api.ChallengeResponse:
        return api.ChallengeResponse(server_nonce=self._manager.challenge(request.session_id))

    @grpc_errors
    async def join(self, request: api.JoinRequest) -> api.JoinResponse:
        return await self._manager.peer_join(request)

    @grpc_errors
    async def leave(self, request: api.LeaveRequest) -> api.LeaveResponse:
        await self._manager.peer_leave(request)
        return api.LeaveResponse()
