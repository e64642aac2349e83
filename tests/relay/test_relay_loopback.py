"""RelayServer and RelayClient on 127.0.0.1 with real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quic_relay import Identity, RelayClient, RelayConfig, RelayError, RelayServer, generate_identity
from quic_relay.connection import (
    RelayQuicConnection,
    make_configuration,
    reset_key_of,
    reset_token,
    stateless_reset,
)
from quic_relay.framing import encode_datagram, encode_datagram_frames
from quic_relay.reassembly import REASSEMBLY_TIMEOUT

HOST = "127.0.0.1"
SERVER_NAME = "relay.test"
CONFIG = RelayConfig(idle_timeout=5.0, handshake_timeout=3.0, connect_timeout=2.0)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Destination:
    """A local TCP server standing in for the producer app; counts connections."""

    server: asyncio.Server
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return HOST, int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.server.close()
        await self.server.wait_closed()


async def start_destination(handler: Handler) -> Destination:
    holder: list[Destination] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        holder[0].writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    destination = Destination(await asyncio.start_server(counted, HOST, 0))
    holder.append(destination)
    return destination


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()


def named(name: bytes) -> Handler:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        await writer.drain()

    return reply


@pytest.fixture(scope="module")
def server_identity() -> Identity:
    return generate_identity(SERVER_NAME, sans=[HOST])


@pytest.fixture(scope="module")
def client_identity() -> Identity:
    return generate_identity("consumer.test")


@pytest.fixture
async def echo_dest() -> AsyncIterator[Destination]:
    destination = await start_destination(echo)
    yield destination
    await destination.close()


@dataclass
class Pair:
    server: RelayServer
    client: RelayClient

    async def tcp_entry(self, dest_index: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = await self.client.add_tcp_entry(HOST, 0, dest_index)
        return await asyncio.open_connection(host, port)


async def start_server(
    identity: Identity, destinations: list[tuple[str, int]], port: int = 0, config: RelayConfig = CONFIG
) -> RelayServer:
    return await RelayServer.start(
        host=HOST,
        port=port,
        identity=identity,
        server_name=SERVER_NAME,
        destinations=destinations,
        config=config,
    )


async def start_client(
    server: RelayServer, identity: Identity, server_cert_pem: bytes, config: RelayConfig = CONFIG
) -> RelayClient:
    return await RelayClient.start(
        server=server.local_address,
        server_name=SERVER_NAME,
        identity=identity,
        server_cert_pem=server_cert_pem,
        config=config,
    )


@pytest.fixture
async def make_pair(
    server_identity: Identity, client_identity: Identity
) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    pairs: list[Pair] = []

    async def make(destinations: list[tuple[str, int]], config: RelayConfig = CONFIG) -> Pair:
        server = await start_server(server_identity, destinations, config=config)
        server.authorize(client_identity.cert_pem)
        client = await start_client(server, client_identity, server_identity.cert_pem, config)
        pairs.append(Pair(server, client))
        return pairs[-1]

    yield make
    for pair in pairs:
        await pair.client.close()
        await pair.server.close()


async def wait_for_condition(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# TCP


async def test_tcp_echo_carries_several_mib_intact(make_pair, echo_dest) -> None:
    pair = await make_pair([echo_dest.address])
    reader, writer = await pair.tcp_entry()
    payload = os.urandom(4 * 1024 * 1024)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 20)
    await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    writer.close()
    await wait_for_condition(lambda: pair.client.counters.active == 0 and pair.server.counters.active == 0)
    assert pair.client.counters.bytes_in == pair.client.counters.bytes_out == len(payload)
    assert pair.server.counters.connections == 1


async def test_half_close_still_delivers_the_reply(make_pair) -> None:
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()

    destination = await start_destination(count_until_eof)
    pair = await make_pair([destination.address])
    reader, writer = await pair.tcp_entry()
    writer.write(b"x" * 1000)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"got 1000 bytes"
    writer.close()
    await destination.close()


async def test_dest_index_routes_to_the_matching_destination(make_pair) -> None:
    first, second = await start_destination(named(b"first")), await start_destination(named(b"second"))
    pair = await make_pair([first.address, second.address])
    for index, expected in ((1, b"second"), (0, b"first")):
        reader, writer = await pair.tcp_entry(index)
        assert await asyncio.wait_for(reader.read(-1), 5) == expected
        writer.close()
    assert (first.connections, second.connections) == (1, 1)
    await first.close()
    await second.close()


async def test_refused_destination_fails_only_that_stream(make_pair, echo_dest) -> None:
    closed = socket.socket()
    closed.bind((HOST, 0))
    refusing = closed.getsockname()
    closed.close()
    pair = await make_pair([refusing, echo_dest.address])
    reader, writer = await pair.tcp_entry(0)
    writer.write(b"hello")
    with pytest.raises(ConnectionResetError):
        data = await asyncio.wait_for(reader.read(-1), 5)
        assert data == b""
        raise ConnectionResetError  # an orderly close without data also counts as refused
    writer.close()
    reader, writer = await pair.tcp_entry(1)
    writer.write(b"still works")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"still works"
    writer.close()


async def test_unknown_dest_index_fails_only_that_stream(make_pair, echo_dest) -> None:
    pair = await make_pair([echo_dest.address])
    reader, writer = await pair.tcp_entry(7)
    with pytest.raises(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        raise ConnectionResetError
    writer.close()
    reader, writer = await pair.tcp_entry(0)
    writer.write(b"ok")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"ok"
    writer.close()
    assert echo_dest.connections == 1


# UDP


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


class UdpApp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)


async def udp_echo_round_trip(pair: Pair, udp_dest: tuple[str, int], messages: list[bytes]) -> list[bytes]:
    entry = await pair.client.add_udp_entry(HOST, 0, 0)
    loop = asyncio.get_running_loop()
    transport, app = await loop.create_datagram_endpoint(UdpApp, remote_addr=entry)
    replies = []
    try:
        for message in messages:
            for _ in range(20):  # UDP may drop; retry
                transport.sendto(message)
                try:
                    replies.append(await asyncio.wait_for(app.received.get(), 0.5))
                    break
                except TimeoutError:
                    continue
    finally:
        transport.close()
    return replies


@pytest.fixture
async def udp_dest() -> AsyncIterator[tuple[str, int]]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=(HOST, 0))
    yield transport.get_extra_info("sockname")
    transport.close()


async def test_udp_echo_round_trip(make_pair, udp_dest) -> None:
    pair = await make_pair([udp_dest])
    replies = await udp_echo_round_trip(pair, udp_dest, [b"one", b"two" * 300])
    assert replies == [b"echo:one", b"echo:" + b"two" * 300]
    assert pair.client.counters.connections == 1
    assert pair.server.counters.connections == 1


async def test_garbage_datagram_frames_are_dropped_and_counted(make_pair, udp_dest) -> None:
    pair = await make_pair([udp_dest])
    protocol = pair.client._protocol
    assert protocol is not None
    protocol.send_datagrams([b"\xff"])  # truncated varint
    protocol.send_datagrams([encode_datagram(2, 63, b"no such destination")])
    await wait_for_condition(lambda: pair.server.counters.dropped_datagrams == 2)
    assert await udp_echo_round_trip(pair, udp_dest, [b"after"]) == [b"echo:after"]


@pytest.mark.parametrize("size", [1460, 8000, 65000])
async def test_udp_datagrams_larger_than_a_quic_packet_cross_intact_both_ways(
    make_pair, udp_dest, size
) -> None:
    pair = await make_pair([udp_dest])
    messages = [os.urandom(size) for _ in range(3)]
    replies = await udp_echo_round_trip(pair, udp_dest, messages)
    assert replies == [b"echo:" + message for message in messages]
    assert pair.client.counters.bytes_in >= 3 * size


async def test_incomplete_fragmented_datagram_is_dropped_and_counted(make_pair, udp_dest) -> None:
    pair = await make_pair([udp_dest])
    protocol = pair.client._protocol
    assert protocol is not None
    frames = encode_datagram_frames(0, 0, os.urandom(5000), max_frame=1200, seq=0)
    protocol.send_datagrams(frames[:-1])
    await asyncio.sleep(REASSEMBLY_TIMEOUT)
    assert await udp_echo_round_trip(pair, udp_dest, [b"after"]) == [b"echo:after"]
    assert pair.server.counters.dropped_datagrams == 1  # noticed when the next frame arrived


async def test_udp_flows_expire_when_idle(make_pair, udp_dest) -> None:
    config = RelayConfig(idle_timeout=5.0, handshake_timeout=3.0, udp_flow_idle_timeout=0.3)
    pair = await make_pair([udp_dest], config)
    assert await udp_echo_round_trip(pair, udp_dest, [b"x"]) == [b"echo:x"]
    await wait_for_condition(lambda: pair.server.counters.active == 0 and pair.client.counters.active == 0)


# authentication


async def test_unauthorized_client_certificate_is_refused(server_identity, echo_dest) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(generate_identity("someone-else").cert_pem)
    intruder = generate_identity("consumer.test")
    with pytest.raises(RelayError, match="not authorized"):
        await start_client(server, intruder, server_identity.cert_pem)
    await server.close()
    assert echo_dest.connections == 0
    assert server.counters.connections == 0


async def test_every_client_is_refused_until_authorize(server_identity, client_identity, echo_dest) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    with pytest.raises(RelayError):
        await start_client(server, client_identity, server_identity.cert_pem)
    server.authorize(client_identity.cert_pem)
    client = await start_client(server, client_identity, server_identity.cert_pem)
    assert client.connected
    await client.close()
    await server.close()
    assert echo_dest.connections == 0


async def test_authorize_again_closes_connections_of_the_old_certificate(make_pair, echo_dest) -> None:
    pair = await make_pair([echo_dest.address])
    assert pair.client.connected
    pair.server.authorize(generate_identity("replacement").cert_pem)
    await wait_for_condition(lambda: not pair.client.connected)


async def test_wrong_server_pin_fails_start(server_identity, client_identity, echo_dest) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(client_identity.cert_pem)
    impostor_pin = generate_identity(SERVER_NAME).cert_pem
    with pytest.raises(RelayError, match=r"handshake.*TLS alert"):
        await start_client(server, client_identity, impostor_pin)
    await server.close()


async def test_unreachable_server_times_out_with_relay_error(client_identity, server_identity) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((HOST, 0))
    config = RelayConfig(handshake_timeout=0.5)
    with pytest.raises(RelayError, match="timed out"):
        await RelayClient.start(
            server=silent.getsockname(),
            server_name=SERVER_NAME,
            identity=client_identity,
            server_cert_pem=server_identity.cert_pem,
            config=config,
        )
    silent.close()


# robustness and lifecycle


async def test_garbage_at_the_udp_port_does_not_disturb_the_server(
    server_identity, client_identity, echo_dest
) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(client_identity.cert_pem)
    noise = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rng = __import__("random").Random(1)
    for size in [0, 1, 5, 40, 1200, 1300, 1400] * 30:
        first = rng.choice([b"\xc0\x00\x00\x00\x01", b"\xc3\x00\x00\x00\x01\x08", b"\x40", b""])
        noise.sendto((first + os.urandom(size))[: max(size, 1)], server.local_address)
    noise.close()
    await asyncio.sleep(0.1)
    client = await start_client(server, client_identity, server_identity.cert_pem)
    host, port = await client.add_tcp_entry(HOST, 0, 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"ping")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"ping"
    writer.close()
    await client.close()
    await server.close()


def port_is_free(kind: int, address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


async def test_close_frees_every_port_and_is_idempotent(make_pair, echo_dest, udp_dest) -> None:
    pair = await make_pair([echo_dest.address, udp_dest])
    tcp_entry = await pair.client.add_tcp_entry(HOST, 0, 0)
    udp_entry = await pair.client.add_udp_entry(HOST, 0, 1)
    reader, writer = await asyncio.open_connection(*tcp_entry)
    writer.write(b"open")
    assert await reader.readexactly(4) == b"open"
    server_port = pair.server.local_address
    await pair.client.close()
    await pair.server.close()
    await pair.client.close()
    await pair.server.close()
    assert port_is_free(socket.SOCK_STREAM, tcp_entry)
    assert port_is_free(socket.SOCK_DGRAM, udp_entry)
    assert port_is_free(socket.SOCK_DGRAM, server_port)
    assert await asyncio.wait_for(reader.read(-1), 2) == b""
    writer.close()
    await wait_for_condition(lambda: pair.server.counters.active == 0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memory_stays_bounded_when_the_destination_stops_reading(make_pair) -> None:
    resume = asyncio.Event()
    received = 0

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await resume.wait()
        while data := await reader.read(1024 * 1024):
            received += len(data)

    destination = await start_destination(slow_reader)
    config = RelayConfig(idle_timeout=5.0, max_stream_buffer=1024 * 1024)
    pair = await make_pair([destination.address], config)
    _reader, writer = await pair.tcp_entry()
    chunk = os.urandom(1024 * 1024)
    total = 48 * 1024 * 1024
    rss_before = rss_bytes()

    async def write_all() -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(write_all())
    # Let the pipeline fill until it stalls: relay buffers are bounded, so is what it accepts.
    stalled_at = -1
    while stalled_at != pair.client.counters.bytes_in:
        stalled_at = pair.client.counters.bytes_in
        await asyncio.sleep(0.5)
    assert 0 < stalled_at < 24 * 1024 * 1024
    assert rss_bytes() - rss_before < 64 * 1024 * 1024
    in_relay = pair.client.counters.bytes_in - pair.server.counters.bytes_out
    assert in_relay < 8 * 1024 * 1024

    resume.set()
    await asyncio.wait_for(sender, 30)
    await wait_for_condition(lambda: received == total, timeout=30)
    writer.close()
    await destination.close()


async def test_client_reconnects_after_server_restart(server_identity, client_identity, echo_dest) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(client_identity.cert_pem)
    client = await start_client(server, client_identity, server_identity.cert_pem)
    entry = await client.add_tcp_entry(HOST, 0, 0)
    reader, writer = await asyncio.open_connection(*entry)
    writer.write(b"before")
    assert await reader.readexactly(6) == b"before"

    address = server.local_address
    await server.close()
    await wait_for_condition(lambda: not client.connected)
    with pytest.raises(ConnectionResetError):  # in-flight streams of the dead connection are closed
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        raise ConnectionResetError
    writer.close()

    server = await start_server(server_identity, [echo_dest.address], port=address[1])
    server.authorize(client_identity.cert_pem)
    reader, writer = await asyncio.open_connection(*entry)
    writer.write(b"after")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"after"
    assert client.connected
    writer.close()
    await client.close()
    await server.close()


async def test_server_reports_since_when_its_client_is_absent(
    server_identity, client_identity, echo_dest
) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(client_identity.cert_pem)
    assert server.peer_absent_since is not None  # nobody connected yet
    client = await start_client(server, client_identity, server_identity.cert_pem)
    await wait_for_condition(lambda: server.peer_absent_since is None)
    await client.close()
    await wait_for_condition(lambda: server.peer_absent_since is not None)
    await server.close()


async def test_client_reconnects_in_the_background_after_server_restart(
    server_identity, client_identity, echo_dest
) -> None:
    server = await start_server(server_identity, [echo_dest.address])
    server.authorize(client_identity.cert_pem)
    client = await start_client(server, client_identity, server_identity.cert_pem)
    address = server.local_address
    await server.close()
    await wait_for_condition(lambda: client.peer_absent_since is not None)
    server = await start_server(server_identity, [echo_dest.address], port=address[1])
    server.authorize(client_identity.cert_pem)
    # No TCP connection or datagram arrives: the client comes back on its own.
    await wait_for_condition(lambda: client.connected and server.peer_absent_since is None, timeout=10)
    assert client.peer_absent_since is None
    await client.close()
    await server.close()


async def _server_process(
    tmp: Path, identity: Identity, client_identity: Identity, port: int, dest: tuple[str, int]
) -> asyncio.subprocess.Process:
    """`python -m quic_relay server` in a process of its own, which the test can kill like a crash."""
    files = {"cert": identity.cert_pem, "key": identity.key_pem, "peer": client_identity.cert_pem}
    for name, pem in files.items():
        (tmp / f"{name}.pem").write_bytes(pem)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quic_relay", "--log-level", "WARNING", "server",
        "--listen", f"{HOST}:{port}", "--dest", f"{dest[0]}:{dest[1]}",
        "--peer-cert", str(tmp / "peer.pem"), "--server-name", SERVER_NAME,
        "--cert", str(tmp / "cert.pem"), "--key", str(tmp / "key.pem"),
    )  # fmt: skip
    return process


async def test_a_crashed_server_restarted_resets_the_client_which_reconnects_at_once(
    server_identity, client_identity, echo_dest, tmp_path
) -> None:
    """A server killed without a word and started again (a restored session) answers the old
    connection's packets with a stateless reset: the client reconnects within seconds, not after its
    30 s idle timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    config = RelayConfig(idle_timeout=30.0, handshake_timeout=3.0, connect_timeout=2.0)
    first = await _server_process(tmp_path, server_identity, client_identity, port, echo_dest.address)
    client = None
    second = None
    try:
        for _ in range(100):  # until the server process listens
            try:
                client = await RelayClient.start(
                    server=(HOST, port),
                    server_name=SERVER_NAME,
                    identity=client_identity,
                    server_cert_pem=server_identity.cert_pem,
                    config=config,
                )
                break
            except RelayError:
                await asyncio.sleep(0.1)
        assert client is not None and client.connected
        entry = await client.add_tcp_entry(HOST, 0, 0)

        first.kill()  # no CONNECTION_CLOSE: the client still believes in its connection
        await first.wait()
        second = await _server_process(tmp_path, server_identity, client_identity, port, echo_dest.address)
        await asyncio.sleep(1.0)  # the new process is listening
        started = asyncio.get_running_loop().time()
        # A new connection at the entry point sends on the old QUIC connection: the new server process
        # answers with a stateless reset, the client reconnects, and a later connection gets through.
        reply = b""
        while reply != b"after" and asyncio.get_running_loop().time() - started < 15:
            try:
                reader, writer = await asyncio.open_connection(*entry)
                writer.write(b"after")
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(-1), 3)
                writer.close()
            except (TimeoutError, ConnectionError):
                pass
            if reply != b"after":
                await asyncio.sleep(0.2)
        assert reply == b"after", "no connection got through within 15 s of the restart"
        assert asyncio.get_running_loop().time() - started < 15 < config.idle_timeout
    finally:
        if client is not None:
            await client.close()
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


def test_server_reset_tokens_are_the_same_after_a_restart(server_identity) -> None:
    """The tokens a server hands out depend only on its identity and the connection id, so a new
    process with the same identity can reset connections of the old one."""
    key = reset_key_of(server_identity)
    assert key == reset_key_of(server_identity) and key != reset_key_of(generate_identity("other"))
    conn = RelayQuicConnection(
        configuration=make_configuration(is_client=False, identity=server_identity, config=CONFIG),
        original_destination_connection_id=os.urandom(8),
        reset_key=key,
    )
    first = conn._host_cids[0]
    assert first.stateless_reset_token == reset_token(key, first.cid)
    reset = stateless_reset(key, first.cid, 1200)
    assert reset is not None and len(reset) < 1200 and reset.endswith(reset_token(key, first.cid))
    assert reset[0] & 0xC0 == 0x40  # a short header
    assert stateless_reset(key, first.cid, 21) is None  # too small to answer with a smaller packet


# packet I/O and packet size


@pytest.mark.parametrize(("gso", "gro"), [(False, False), (True, False), (False, True)])
async def test_streams_are_intact_with_gso_and_gro_off(make_pair, echo_dest, gso, gro) -> None:
    config = RelayConfig(idle_timeout=5.0, handshake_timeout=3.0, gso=gso, gro=gro)
    pair = await make_pair([echo_dest.address], config)
    reader, writer = await pair.tcp_entry()
    payload = os.urandom(2 * 1024 * 1024)
    writer.write(payload)
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(-1), 20)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    writer.close()


@pytest.mark.parametrize(("cap", "expected"), [(8952, 8952), (4000, 4000), (1200, 1200)])
async def test_both_sides_raise_the_packet_size_to_what_the_path_and_the_cap_allow(
    make_pair, echo_dest, cap, expected
) -> None:
    # loopback's MTU (65536) is no limit here: the configured cap is
    config = RelayConfig(idle_timeout=5.0, handshake_timeout=3.0, max_datagram_size=cap)
    pair = await make_pair([echo_dest.address], config)
    reader, writer = await pair.tcp_entry()
    writer.write(b"x" * 100_000)  # traffic both ways carries the probes and their ACKs
    await reader.readexactly(100_000)
    await wait_for_condition(
        lambda: pair.client.packet_size == expected and pair.server.packet_size == expected
    )
    writer.close()


async def test_udp_datagrams_use_the_larger_packets_once_discovered(make_pair, udp_dest) -> None:
    pair = await make_pair([udp_dest])
    await udp_echo_round_trip(pair, udp_dest, [b"warm-up"])
    await wait_for_condition(lambda: pair.client.packet_size == CONFIG.max_datagram_size)
    protocol = pair.client._protocol
    assert protocol is not None
    assert pair.client.flows.codec.max_frame > 8000  # a 8 KB datagram now needs one frame, not seven
