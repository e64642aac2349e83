"""A hostile producer appliance: a ticket can name any address, so what the "producer" answers is input
too. A malformed answer fails the join with a clear status (never INTERNAL) and leaves nothing behind."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from appliance.api.scistream import v1 as api
from appliance.errors import ApplianceError, Internal
from appliance.sessions import ticket as tk

from .conftest import Facility, start_facility
from .rawgrpc import RawCodec
from .test_hostile_input import field, varint

Reply = Callable[[Stream[Any, Any]], Coroutine[Any, Any, None]]


def answering(body: bytes) -> Reply:
    async def handler(stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(body)

    return handler


class HostilePeer:
    """A plaintext "Peer service" that answers Challenge properly and Join with `join_answer`."""

    def __init__(self, join_answer: bytes) -> None:
        challenge = bytes(api.ChallengeResponse(server_nonce=os.urandom(16)))
        self._handlers = {"Challenge": answering(challenge), "Join": answering(join_answer)}

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/scistream.v1.Peer/{name}": Handler(func, Cardinality.UNARY_UNARY, bytes, bytes)
            for name, func in self._handlers.items()
        }


@pytest.fixture
async def consumer(tmp_path: Path) -> AsyncIterator[Facility]:
    b = await start_facility(tmp_path, "b")
    try:
        yield b
    finally:
        await b.appliance.stop()


@pytest.mark.parametrize(
    "join_answer",
    [
        field(4, 0, varint(5)),  # data_endpoints as a varint: ",".join() of an int
        field(3, 3),  # data_certificate as a group start: None
        field(6, 2, b"\x02\x01\x02"),  # num_conn as a packed list
        b"\x0a\x05ab",  # truncated
    ],
    ids=["endpoints-varint", "certificate-group", "num-conn-packed", "truncated"],
)
async def test_a_malformed_answer_from_the_producer_is_a_clear_error(
    consumer: Facility, join_answer: bytes
) -> None:
    server = Server([HostilePeer(join_answer)], codec=RawCodec())
    await server.start("127.0.0.1", 0)
    try:
        port = server._server.sockets[0].getsockname()[1]
        ticket = tk.Ticket(f"127.0.0.1:{port}", "", "producer-side", os.urandom(32), "quic", "tcp")
        async with consumer.client() as client:
            with pytest.raises(ApplianceError) as refused:
                await client.join(api.JoinSessionRequest(ticket=ticket.encode()))
            assert not isinstance(refused.value, Internal), refused.value
            async with consumer.client("root") as admin:
                assert await admin.list() == []
    finally:
        server.close()
        await server.wait_closed()
