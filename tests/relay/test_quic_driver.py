"""QUIC mode's driver on loopback: its relay processes, lanes, TCP, UDP, and a process that dies."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
from collections.abc import AsyncIterator

import pytest

from appliance.dataplane.base import ConsumerPlan, ProducerPlan
from appliance.dataplane.quic import QuicDriver
from appliance.sessions.model import Protocol
from appliance.sessions.ports import PortAllocator, PortRange
from quic_relay import RelayConfig
from tests.tlsrelay.test_tls_driver import HOST, Echo, Session, credentials, exchange, open_session

CONFIG = RelayConfig(idle_timeout=5.0, handshake_timeout=3.0)


@pytest.fixture
async def driver() -> AsyncIterator[QuicDriver]:
    d = QuicDriver(CONFIG, workers=2)
    yield d
    await d.close()


async def _stream(session: Session, seed: int) -> None:
    data = os.urandom(4 * 1024 * 1024)
    reader, writer = await asyncio.open_connection(session.entry.host, session.entry.port)

    async def send() -> None:
        writer.write(data)
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


async def test_one_data_endpoint_and_one_entry_point_however_many_relay_processes(driver: QuicDriver) -> None:
    session = await open_session(driver)
    assert len(session.producer.addresses) == 1
    assert len(session.consumer.addresses) == 1
    assert await exchange(session.entry, b"hello") == b"olleh"


async def test_a_sessions_connections_spread_over_the_relay_processes_on_both_sides(
    driver: QuicDriver,
) -> None:
    """Each relay process runs its own QUIC connection: the consumer side's TCP connections land on
    every process (the kernel spreads them), and lane steering sends each QUIC connection to its own
    process on the producer side."""
    session = await open_session(driver, destination=Echo())
    for _ in range(4):  # each round: 8 connections; the kernel's hash may put a round on one process
        await asyncio.wait_for(asyncio.gather(*(_stream(session, i) for i in range(8))), 120)
        await asyncio.sleep(1.0)  # relay processes report every 0.5 s
        consumer = driver.pool.counters_by_process("c")
        producer = driver.pool.counters_by_process("p")
        if len([v for v in consumer.values() if v[0] > 0]) == 2:
            break
    assert sorted(i for i, v in consumer.items() if v[0] > 0) == [0, 1], consumer
    # Lane N's connection reaches relay process N of the producer side: both carry bytes.
    assert sorted(i for i, v in producer.items() if v[1] > 0) == [0, 1], producer
    assert session.consumer.counters().bytes_in == sum(v[0] for v in consumer.values())


async def test_udp_entry_points_are_shared_out_over_the_relay_processes(driver: QuicDriver) -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((HOST, 0))
    echo.setblocking(False)
    loop = asyncio.get_running_loop()

    def reflect() -> None:
        while True:
            try:
                data, addr = echo.recvfrom(65535)
            except BlockingIOError:
                return
            echo.sendto(data[::-1], addr)

    loop.add_reader(echo.fileno(), reflect)
    try:
        dest = echo.getsockname()
        ports = PortAllocator(PortRange(21000, 21999), HOST)
        pc, cc = credentials("producer"), credentials("consumer")
        from appliance.sessions.model import Address

        producer = await driver.open_producer(
            ProducerPlan("p", Protocol.UDP, (Address(HOST, dest[1]),), pc), ports, HOST
        )
        producer.authorize(cc.cert_pem)
        plan = ConsumerPlan("c", Protocol.UDP, cc, pc.cert_pem, pc.server_name, producer.addresses, 1, 3)
        consumer = await driver.open_consumer(plan, ports, HOST)
        for entry in consumer.addresses:
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            app.settimeout(1.0)
            try:
                for _ in range(20):  # the first datagrams may arrive before the flow is open
                    app.sendto(f"to {entry.port}".encode(), (entry.host, entry.port))
                    try:
                        reply = await asyncio.to_thread(app.recv, 1000)
                    except TimeoutError:
                        continue
                    assert reply == f"to {entry.port}".encode()[::-1]
                    break
                else:
                    raise AssertionError(f"no reply through entry point {entry}")
            finally:
                app.close()
        await asyncio.sleep(1.0)
        assert sorted(driver.pool.counters_by_process("c")) == [0, 1]  # entries 0, 2 → 0; entry 1 → 1
        await consumer.close()
        await producer.close()
    finally:
        loop.remove_reader(echo.fileno())
        echo.close()


async def test_status_shows_the_packet_size_from_the_relay_processes(driver: QuicDriver) -> None:
    session = await open_session(driver)
    assert await exchange(session.entry, b"x") == b"x"
    for _ in range(40):
        if session.consumer.counters().packet_size and session.producer.counters().packet_size:
            break
        await asyncio.sleep(0.1)
    assert session.consumer.counters().packet_size >= 1200
    assert session.producer.counters().packet_size >= 1200


async def test_a_consumer_side_that_cannot_reach_the_producer_side_is_refused_and_frees_its_ports(
    driver: QuicDriver,
) -> None:
    from appliance.errors import Unavailable
    from appliance.sessions.model import Address

    ports = PortAllocator(PortRange(21000, 21999), HOST)
    pc, cc = credentials("producer"), credentials("consumer")
    nobody = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    nobody.bind((HOST, 0))  # a UDP port where no QUIC server answers
    try:
        endpoint = (Address(HOST, nobody.getsockname()[1]),)
        plan = ConsumerPlan("c", Protocol.TCP, cc, pc.cert_pem, pc.server_name, endpoint, 1, 2)
        with pytest.raises(Unavailable, match="cannot reach"):
            await driver.open_consumer(plan, ports, HOST)
    finally:
        nobody.close()
    assert ports.release("c") == []  # nothing was left reserved


async def test_closing_a_session_frees_its_ports(driver: QuicDriver) -> None:
    session = await open_session(driver)
    await session.consumer.close()
    await session.producer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(session.entry.host, session.entry.port)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((HOST, session.endpoint.port))  # nobody holds the data endpoint any more
    finally:
        probe.close()


async def test_a_relay_process_that_dies_is_restarted_and_the_session_works_again(driver: QuicDriver) -> None:
    session = await open_session(driver)
    assert await exchange(session.entry, b"before") == b"erofeb"
    pids = driver.pool.pids
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if len(driver.pool.pids) == 2 and not set(driver.pool.pids) & set(pids):
            break
        await asyncio.sleep(0.05)
    assert len(driver.pool.pids) == 2 and not set(driver.pool.pids) & set(pids)
    for _ in range(200):  # the consumer side reconnects in the background
        try:
            assert await exchange(session.entry, b"after") == b"retfa"
            return
        except (AssertionError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError("the session did not work again after its relay processes were restarted")
