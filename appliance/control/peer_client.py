"""The Peer service of another appliance, as the session manager's PeerLink."""

from __future__ import annotations

from grpclib.client import Channel

from appliance.api.scistream import v1 as api
from appliance.control.channel import Trust, call, open_channel


class GrpcPeerLink:
    """Opens its channel on first use, pinning the peer's control certificate ("" = plaintext)."""

    def __init__(self, address: str, fingerprint: str, timeout: float = 10.0) -> None:
        self._address = address
        self._trust = Trust(fingerprint=fingerprint, insecure=not fingerprint)
        self._timeout = timeout
        self._channel: Channel | None = None

    async def _stub(self) -> api.PeerStub:
        if self._channel is None:
            self._channel = await call(
                open_channel(self._address, self._trust, self._timeout), f"appliance {self._address}"
            )
        return api.PeerStub(self._channel, timeout=self._timeout)

    async def challenge(self, request: api.ChallengeRequest) -> api.ChallengeResponse:
        stub = await self._stub()
        return await call(stub.challenge(request), f"appliance {self._address}")

    async def join(self, request: api.JoinRequest) -> api.JoinResponse:
        stub = await self._stub()
        return await call(stub.join(request), f"appliance {self._address}")

    async def leave(self, request: api.LeaveRequest) -> api.LeaveResponse:
        stub = await self._stub()
        return await call(stub.leave(request), f"appliance {self._address}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
