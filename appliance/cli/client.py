"""A small async client of one appliance's Control and Health services, used by the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from appliance.api.scistream import v1 as api
from appliance.control.channel import Trust, call, open_channel


@dataclass(frozen=True)
class Target:
    """An appliance to talk to, how to trust it, and who we are there."""

    address: str
    trust: Trust
    token: str | None = None
    timeout: float = 30.0


class ApplianceClient:
    def __init__(self, channel: Channel, target: Target) -> None:
        metadata = {"authorization": f"Bearer {target.token}"} if target.token else None
        self._control = api.ControlStub(channel, timeout=target.timeout, metadata=metadata)
        self._health = HealthStub(channel)
        self._what = f"appliance {target.address}"
        self._timeout = target.timeout

    async def create(self, request: api.CreateSessionRequest) -> api.CreateSessionResponse:
        return await call(self._control.create_session(request), self._what)

    async def join(self, request: api.JoinSessionRequest) -> api.JoinSessionResponse:
        return await call(self._control.join_session(request), self._what)

    async def release(self, session_id: str) -> api.Session:
        reply = await call(self._control.release_session(api.ReleaseSessionRequest(session_id)), self._what)
        return reply.session

    async def get(self, session_id: str) -> api.Session:
        reply = await call(self._control.get_session(api.GetSessionRequest(session_id)), self._what)
        return reply.session

    async def list(self) -> list[api.Session]:
        reply = await call(self._control.list_sessions(api.ListSessionsRequest()), self._what)
        return list(reply.sessions)

    async def watch(self, session_id: str, interval_ms: int = 1000) -> AsyncIterator[api.Session]:
        request = api.WatchSessionRequest(session_id=session_id, interval_ms=interval_ms)
        stream = self._control.watch_session(request, timeout=None)
        while True:
            session = await call(anext(stream, None), self._what)
            if session is None:
                return
            yield session

    async def serving(self) -> bool:
        reply = await call(self._health.Check(HealthCheckRequest(), timeout=self._timeout), self._what)
        return bool(reply.status == HealthCheckResponse.SERVING)


@asynccontextmanager
async def connect(target: Target) -> AsyncIterator[ApplianceClient]:
    channel = await call(
        open_channel(target.address, target.trust, target.timeout), f"appliance {target.address}"
    )
    try:
        yield ApplianceClient(channel, target)
    finally:
        channel.close()
