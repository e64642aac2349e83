"""TLS mode end to end on loopback: the driver, its relay processes, TCP, UDP and what it refuses."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from appliance.dataplane.base import ConsumerPlan, Credentials, Driver, ProducerPlan, Tunnel
from appliance.dataplane.tls import TlsDriver
from appliance.dataplane.tlsrelay import contexts
from appliance.dataplane.tlsrelay.wire import Kind, encode_header, frame_chunks
from appliance.sessions.model import Address, Protocol
from appliance.sessions.ports import PortAllocator, PortRange
from quic_relay import generate_identity

HOST = "127.0.0.1"


def credentials(session_id: str) -> Credentials:
    name = f"{session_id}.session.scistream"
    identity = generate_identity(name)
    return Credentials(identity.cert_pem, identity.key_pem, name)


class Destination:
    """The producer app: reverses what it reads until EOF (so it sees half-close), counts connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> Address:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            data = await reader.read()
            writer.write(data[::-1])
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, HOST, 0)
        return Address(HOST, self.server.sockets[0].getsockname()[1])


@dataclass
class Session:
    producer: Tunnel
    consumer: Tunnel
    producer_creds: Credentials
    consumer_creds: Credentials
    destination: Destination

    @property
    def entry(self) -> Address:
        return self.consumer.addresses[0]

    @property
    def endpoint(self) -> Address:
        return self.producer.addresses[0]


@pytest.fixture
async def driver() -> AsyncIterator[TlsDriver]:
    d = TlsDriver(workers=1, udp_idle=1.0)
    yield d
    await d.close()


class Echo(Destination):
    """Writes back what it reads as it reads it (both directions busy at once), then half-closes.
    It pauses now and then, so the relay's writes towards it back up while the replies flow."""

    async def start(self) -> Address:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            while chunk := await reader.read(64 * 1024):
                writer.write(chunk)
                await writer.drain()
                if len(chunk) % 3 == 0:
                    await asyncio.sleep(0.002)
            writer.write_eof()
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, HOST, 0)
        return Address(HOST, self.server.sockets[0].getsockname()[1])


class Resetting(Destination):
    """Reads a little, then resets the connection (a producer app that crashes mid-stream)."""

    async def start(self) -> Address:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            await reader.read(1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        self.server = await asyncio.start_server(handle, HOST, 0)
        return Address(HOST, self.server.sockets[0].getsockname()[1])


class Firehose(Destination):
    """Writes as fast as it is allowed to and counts what the kernel took."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    async def start(self) -> Address:
        chunk = bytes(256 * 1024)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            try:
                while True:
                    writer.write(chunk)
                    await writer.drain()
                    self.written += len(chunk)
            except ConnectionError:
                writer.close()

        self.server = await asyncio.start_server(handle, HOST, 0)
        return Address(HOST, self.server.sockets[0].getsockname()[1])


async def open_session(
    driver: Driver,
    protocol: Protocol = Protocol.TCP,
    num_conn: int = 1,
    destination: Destination | None = None,
) -> Session:
    destination = destination or Destination()
    dest = await destination.start()
    ports = PortAllocator(PortRange(20000, 20999), HOST)
    pc, cc = credentials("producer"), credentials("consumer")
    producer = await driver.open_producer(ProducerPlan("p", protocol, (dest,), pc), ports, HOST)
    producer.authorize(cc.cert_pem)
    plan = ConsumerPlan("c", protocol, cc, pc.cert_pem, pc.server_name, producer.addresses, 1, num_conn)
    consumer = await driver.open_consumer(plan, ports, HOST)
    return Session(producer, consumer, pc, cc, destination)


async def exchange(address: Address, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(data)
    writer.write_eof()  # the destination answers only after our half-close arrives
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return reply


async def test_tcp_connection_is_relayed_both_ways_with_half_close(driver: TlsDriver) -> None:
    session = await open_session(driver)
    data = bytes(range(256)) * 20000
    assert await exchange(session.entry, data) == data[::-1]


async def test_large_streams_are_relayed_intact_both_ways_at_once(driver: TlsDriver) -> None:
    """Several connections with reads and writes in flight in both directions, sharing one relay
    process: reusing a buffer that is still being sent would corrupt a stream."""
    session = await open_session(driver, destination=Echo())

    async def stream(seed: int) -> None:
        data = os.urandom(8 * 1024 * 1024)
        reader, writer = await asyncio.open_connection(session.entry.host, session.entry.port)

        async def send() -> None:
            view, step = memoryview(data), 65_000 + seed * 7_001  # frames straddle records and reads
            for start in range(0, len(data), step):
                writer.write(view[start : start + step])
                await writer.drain()
            writer.write_eof()

        async def receive() -> bytes:
            digest = hashlib.sha256()
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
            return digest.digest()

        _, received = await asyncio.gather(send(), receive())
        writer.close()
        assert received == hashlib.sha256(data).digest(), f"stream {seed} corrupted"

    await asyncio.wait_for(asyncio.gather(*(stream(seed) for seed in range(4))), 90)


async def test_a_destination_reset_reaches_the_app_as_a_reset_not_as_the_end_of_the_stream(
    driver: TlsDriver,
) -> None:
    session = await open_session(driver, destination=Resetting())
    reader, writer = await asyncio.open_connection(session.entry.host, session.entry.port)
    writer.write(b"hello")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 10)
    writer.close()


async def test_an_app_that_does_not_read_stops_the_sender_without_the_relay_buffering(
    driver: TlsDriver,
) -> None:
    destination = Firehose()
    session = await open_session(driver, destination=destination)
    reader, writer = await asyncio.open_connection(session.entry.host, session.entry.port)
    writer.write(b"go")

    async def stalled() -> int:
        last = -1
        while destination.written != last:  # until the whole chain is full
            last = destination.written
            await asyncio.sleep(0.5)
        return last

    held = await asyncio.wait_for(stalled(), 30)
    # Kernel socket buffers of three TCP hops (autotuned up to tcp_rmem/tcp_wmem) hold it all; the relay
    # processes hold at most a read per direction and connection.
    assert held > 0
    rss = sum(_rss_kib(pid) for pid in driver.pool.pids)
    assert rss < 120 * 1024, rss
    got = 0
    while got < held:  # and it all flows again once the app reads
        chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert chunk
        got += len(chunk)
    writer.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_parallel_connections_are_relayed_independently(driver: TlsDriver) -> None:
    session = await open_session(driver)
    payloads = [str(i).encode() * 5000 for i in range(20)]
    replies = await asyncio.gather(*(exchange(session.entry, p) for p in payloads))
    assert replies == [p[::-1] for p in payloads]


async def test_hundreds_of_entry_points_reach_the_relay_process(driver: TlsDriver) -> None:
    """More sockets than one message can pass (Linux: 253) are handed over in several."""
    session = await open_session(driver, num_conn=300)
    assert len(session.consumer.addresses) == 300
    assert await exchange(session.consumer.addresses[299], b"last") == b"tsal"


async def test_counters_report_the_bytes_relayed(driver: TlsDriver) -> None:
    session = await open_session(driver)
    await exchange(session.entry, b"x" * 1000)
    for _ in range(50):
        if session.consumer.counters().bytes_out == 1000 and session.producer.counters().bytes_in == 1000:
            break
        await asyncio.sleep(0.1)
    assert session.consumer.counters().bytes_in == 1000
    assert session.producer.counters().bytes_out == 1000


async def test_udp_datagrams_are_relayed_per_flow(driver: TlsDriver) -> None:
    destination = await asyncio.get_running_loop().create_datagram_endpoint(_UdpEcho, local_addr=(HOST, 0))
    dest = Address(HOST, destination[0].get_extra_info("sockname")[1])
    ports = PortAllocator(PortRange(21000, 21999), HOST)
    pc, cc = credentials("producer"), credentials("consumer")
    producer = await driver.open_producer(ProducerPlan("p", Protocol.UDP, (dest,), pc), ports, HOST)
    producer.authorize(cc.cert_pem)
    plan = ConsumerPlan("c", Protocol.UDP, cc, pc.cert_pem, pc.server_name, producer.addresses, 1, 1)
    consumer = await driver.open_consumer(plan, ports, HOST)
    entry = consumer.addresses[0]
    clients = [await _udp_client() for _ in range(3)]
    for i, (transport, _) in enumerate(clients):
        transport.sendto(f"datagram {i}".encode(), (entry.host, entry.port))
    replies = [await asyncio.wait_for(queue.get(), 10) for _, queue in clients]
    assert replies == [f"datagram {i}".encode()[::-1] for i in range(3)]
    destination[0].close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data[::-1], addr)  # type: ignore[attr-defined]


async def _udp_client() -> tuple[asyncio.DatagramTransport, asyncio.Queue[bytes]]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            queue.put_nowait(data)

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Client, local_addr=(HOST, 0))
    return transport, queue


# ---- what the data endpoint refuses -----------------------------------------------------------


async def _probe(endpoint: Address, ctx: ssl.SSLContext | None, payload: bytes) -> bytes:
    """Connects to the data endpoint, sends `payload`, returns what comes back before the close."""
    try:
        reader, writer = await asyncio.open_connection(
            endpoint.host,
            endpoint.port,
            ssl=ctx,
            server_hostname="producer.session.scistream" if ctx else None,
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(), 10)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def _tcp_frames(data: bytes) -> bytes:
    return b"".join(bytes(p) for p in frame_chunks(data))


async def test_plaintext_connection_is_closed_without_touching_the_destination(driver: TlsDriver) -> None:
    session = await open_session(driver)
    payload = encode_header(Kind.TCP, 0) + _tcp_frames(b"hello")
    assert await _probe(session.endpoint, None, payload) == b""
    assert session.destination.accepted == 0


async def test_a_certificate_that_is_not_the_sessions_is_refused(driver: TlsDriver) -> None:
    session = await open_session(driver)
    stranger = credentials("stranger")
    ctx = contexts.client_context(stranger.cert_pem, stranger.key_pem, session.producer_creds.cert_pem)
    assert await _probe(session.endpoint, ctx, encode_header(Kind.TCP, 0) + _tcp_frames(b"x")) == b""
    assert session.destination.accepted == 0


async def test_another_sessions_certificate_is_refused(driver: TlsDriver) -> None:
    session = await open_session(driver)
    other = await open_session(driver)
    theirs = other.consumer_creds  # admitted by the other session's producer side, not by this one
    ctx = contexts.client_context(theirs.cert_pem, theirs.key_pem, session.producer_creds.cert_pem)
    assert await _probe(session.endpoint, ctx, encode_header(Kind.TCP, 0) + _tcp_frames(b"x")) == b""
    assert session.destination.accepted == 0


async def test_an_unknown_destination_index_is_refused(driver: TlsDriver) -> None:
    session = await open_session(driver)
    ours = session.consumer_creds
    ctx = contexts.client_context(ours.cert_pem, ours.key_pem, session.producer_creds.cert_pem)
    assert await _probe(session.endpoint, ctx, encode_header(Kind.TCP, 5) + _tcp_frames(b"x")) == b""
    assert session.destination.accepted == 0


async def test_a_bad_header_is_refused(driver: TlsDriver) -> None:
    session = await open_session(driver)
    ours = session.consumer_creds
    ctx = contexts.client_context(ours.cert_pem, ours.key_pem, session.producer_creds.cert_pem)
    assert await _probe(session.endpoint, ctx, b"GET / HTTP/1.1\r\n\r\n") == b""
    assert session.destination.accepted == 0


async def test_the_sessions_own_consumer_certificate_is_accepted(driver: TlsDriver) -> None:
    """The control for the refusals above: the same probe with the right certificate gets through."""
    session = await open_session(driver)
    ours = session.consumer_creds
    ctx = contexts.client_context(ours.cert_pem, ours.key_pem, session.producer_creds.cert_pem)
    reply = await _probe(session.endpoint, ctx, encode_header(Kind.TCP, 0) + _tcp_frames(b"abc") + bytes(4))
    assert reply == _tcp_frames(b"cba") + bytes(4)
    assert session.destination.accepted == 1


async def test_closing_a_session_frees_its_ports(driver: TlsDriver) -> None:
    session = await open_session(driver)
    await session.consumer.close()
    await session.producer.close()
    for address in (session.entry, session.endpoint):
        with pytest.raises(OSError):
            await asyncio.open_connection(address.host, address.port)


async def test_a_relay_process_that_dies_is_restarted_with_its_sessions(driver: TlsDriver) -> None:
    session = await open_session(driver)
    assert await exchange(session.entry, b"before") == b"erofeb"
    (pid,) = driver.pool.pids

    os.kill(pid, signal.SIGKILL)

    for _ in range(100):
        if driver.pool.pids and driver.pool.pids != [pid]:
            break
        await asyncio.sleep(0.05)
    assert driver.pool.pids and driver.pool.pids != [pid]
    for _ in range(100):  # the new process is being given the session's sockets again
        try:
            assert await exchange(session.entry, b"after") == b"retfa"
            return
        except (AssertionError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.05)
    raise AssertionError("the session did not work again after its relay process was restarted")
