"""The Peer service of another appliance, as the session manager's PeerLink."""

from __future__ import annotations

from typing import Any

from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec

from appliance.api.scistream import v1 as api
from appliance.control.channel import Trust, call, open_channel
from appliance.control.edge import decode
from appliance.errors import FailedPrecondition, InvalidArgument


class CheckedAnswers(ProtoCodec):
    """Decodes another appliance's answers with the edge's wire-type checks: a hostile producer (a
    ticket can name any address) must not hand our session manager an int where it expects a str."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return decode(data, message_type, bounded=False)
        except InvalidArgument as exc:
            raise FailedPrecondition(f"the peer appliance sent a malformed answer ({exc.message})") from None


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
                open_channel(self._address, self._trust, self._timeout, CheckedAnswers()),
                f"appliance {self._address}",
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
