"""TcpPump and TlsChannel in one event loop, with tiny socket buffers between the two relay sides so
that OpenSSL's writes stop half-way all the time: the paths where buffers are lent and held."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from appliance.dataplane.tlsrelay import channel as channels
from appliance.dataplane.tlsrelay import contexts
from appliance.dataplane.tlsrelay.relay import Counters, TcpPump
from quic_relay import generate_identity

TINY = 16 * 1024  # socket buffers between the relay sides: far smaller than one 256 KiB read
MSS = 1400  # as on a WAN path; on loopback's 64 KiB MSS so small a window would never reopen


@dataclass
class Pair:
    consumer_app: socket.socket  # what the consumer app holds
    producer_app: socket.socket  # what the producer app (the destination) holds
    consumer: TcpPump
    producer: TcpPump
    counters: Counters


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    server_id = generate_identity("producer.session.scistream")
    client_id = generate_identity("consumer.session.scistream")
    server_ctx = contexts.server_context(server_id.cert_pem, server_id.key_pem)
    contexts.trust(server_ctx, client_id.cert_pem)
    client_ctx = contexts.client_context(client_id.cert_pem, client_id.key_pem, server_id.cert_pem)

    listener = socket.socket()
    client_raw = socket.socket()
    for s in (listener, client_raw):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TINY)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    channels.tune(client_raw)
    connecting = loop.create_task(loop.sock_connect(client_raw, listener.getsockname()))
    server_raw, _ = await loop.sock_accept(listener)
    await connecting
    listener.close()
    channels.tune(server_raw)
    server_tls = server_ctx.wrap_socket(server_raw, server_side=True, do_handshake_on_connect=False)
    client_tls = client_ctx.wrap_socket(
        client_raw, server_hostname="producer.session.scistream", do_handshake_on_connect=False
    )
    server_channel, client_channel = await asyncio.gather(
        channels.handshake(server_tls, 10), channels.handshake(client_tls, 10)
    )
    assert client_channel.peer_fingerprint == contexts.fingerprint_of_pem(server_id.cert_pem)

    consumer_app, consumer_plain = _tcp_pair()
    producer_app, producer_plain = _tcp_pair()
    for s in (consumer_app, producer_app):
        s.setblocking(False)
    counters = Counters()
    tracked: set[TcpPump] = set()
    consumer = TcpPump(consumer_plain, counters, tracked)
    producer = TcpPump(producer_plain, counters, tracked)
    consumer.attach(client_channel)
    producer.attach(server_channel)
    yield Pair(consumer_app, producer_app, consumer, producer, counters)
    for pump in list(tracked):
        pump.abort()
    consumer_app.close()
    producer_app.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets (an app and the relay's plain socket): a reset is visible over TCP."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.create_connection(listener.getsockname())
        plain, _ = listener.accept()
    return app, plain


async def _send(sock: socket.socket, data: bytes, step: int) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for start in range(0, len(data), step):
        await loop.sock_sendall(sock, view[start : start + step])
    sock.shutdown(socket.SHUT_WR)


async def _digest(sock: socket.socket) -> tuple[bytes, int]:
    loop = asyncio.get_running_loop()
    digest, size = hashlib.sha256(), 0
    while chunk := await loop.sock_recv(sock, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.digest(), size


async def test_both_directions_stay_intact_while_writes_keep_stopping_half_way(pair: Pair) -> None:
    up, down = os.urandom(6 * 1024 * 1024), os.urandom(6 * 1024 * 1024)

    results = await asyncio.wait_for(
        asyncio.gather(
            _send(pair.consumer_app, up, 100_003),
            _send(pair.producer_app, down, 70_001),
            _digest(pair.producer_app),
            _digest(pair.consumer_app),
        ),
        60,
    )
    assert results[2] == (hashlib.sha256(up).digest(), len(up))
    assert results[3] == (hashlib.sha256(down).digest(), len(down))
    await asyncio.sleep(0.1)
    assert pair.counters.active == 0  # both directions ended: both sides closed


async def test_half_close_keeps_the_other_direction_open(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    pair.consumer_app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(loop.sock_recv(pair.producer_app, 10), 5) == b""  # FIN passed on
    await loop.sock_sendall(pair.producer_app, b"still flowing")
    assert await asyncio.wait_for(loop.sock_recv(pair.consumer_app, 100), 5) == b"still flowing"
    assert pair.counters.active == 2


async def test_a_side_that_fails_resets_the_app_on_the_other_side(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(pair.consumer_app, b"hello")
    assert await asyncio.wait_for(loop.sock_recv(pair.producer_app, 10), 5) == b"hello"
    pair.producer.abort()  # e.g. the destination reset its connection
    with pytest.raises(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(pair.consumer_app, 10), 5):
            pass
