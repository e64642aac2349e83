"""The appliance around the services: health, reflection, metrics, restart, NO_AUTH mode."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from appliance.api.scistream import v1 as api
from appliance.cli.client import Target, connect
from appliance.config import load_settings
from appliance.control.channel import Trust, open_channel
from appliance.control.server import Appliance
from appliance.sessions.manager import SYSTEM
from appliance.sessions.model import Address, Mode, Protocol

from .conftest import Facility, echo_through, free_port_block, open_session, start_facility

Pair = tuple[Facility, Facility]


async def test_health_is_serving(facilities: Pair) -> None:
    async with facilities[0].client() as client:
        assert await client.serving()


async def test_reflection_lists_every_service(facilities: Pair) -> None:
    channel = await open_channel(facilities[0].address, Trust(ca_file=facilities[0].ca_file))
    try:
        stub = ServerReflectionStub(channel)
        async with stub.ServerReflectionInfo.open() as stream:
            await stream.send_message(ServerReflectionRequest(list_services=""), end=True)
            reply = await stream.recv_message()
            assert reply is not None
            names = {s.name for s in reply.list_services_response.service}
    finally:
        channel.close()
    assert {"scistream.v1.Control", "scistream.v1.Peer", "grpc.health.v1.Health"} <= names


async def test_file_descriptor_of_the_control_service_is_served(facilities: Pair) -> None:
    channel = await open_channel(facilities[0].address, Trust(ca_file=facilities[0].ca_file))
    try:
        stub = ServerReflectionStub(channel)
        async with stub.ServerReflectionInfo.open() as stream:
            request = ServerReflectionRequest(file_containing_symbol="scistream.v1.Control")
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
    finally:
        channel.close()
    assert reply is not None and reply.file_descriptor_response.file_descriptor_proto


async def test_sessions_come_back_after_a_restart(tmp_path: Path, echo_server: str) -> None:
    a = await start_facility(tmp_path, "a")
    b = await start_facility(tmp_path, "b")
    try:
        created, joined = await open_session((a, b), echo_server)
        for facility in (b, a):
            await facility.appliance.stop()
        for facility in (a, b):
            facility.appliance = Appliance(facility.appliance.settings)
            await facility.appliance.start()
        async with b.client() as client:
            restored = await client.get(joined.session_id)
        assert restored.state == api.State.ACTIVE
        async with a.client() as client:
            assert (await client.get(created.session.session_id)).state == api.State.ACTIVE
        assert restored.entry_points == joined.entry_points
        assert await echo_through(joined.entry_points[0], b"again") == b"again"
    finally:
        await b.appliance.stop()
        await a.appliance.stop()


async def test_metrics_count_sessions_by_state(tmp_path: Path, echo_server: str) -> None:
    port = free_port_block(1)
    base = free_port_block(4)
    metered = Appliance(
        load_settings(
            listen=f"127.0.0.1:{base}",
            port_range=f"{base + 1}-{base + 3}",
            state_dir=tmp_path / "metered",
            auth="none",
            metrics_port=port,
        )
    )
    await metered.start()
    try:
        assert metered.manager is not None
        await metered.manager.create(
            SYSTEM, destinations=[Address.parse(echo_server)], mode=Mode.QUIC, protocol=Protocol.TCP
        )
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(
            None,
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(),
        )
    finally:
        await metered.stop()
    assert 'scistream_sessions{state="PENDING"} 1.0' in body
    assert 'scistream_sessions{state="ACTIVE"} 0.0' in body
    assert 'scistream_session_bytes_total{direction="in"}' in body


async def test_no_auth_mode_marks_every_session_no_auth(tmp_path: Path, echo_server: str) -> None:
    base = free_port_block(4)
    appliance = Appliance(
        load_settings(
            listen=f"127.0.0.1:{base}",
            port_range=f"{base + 1}-{base + 3}",
            state_dir=tmp_path / "open",
            auth="none",
        )
    )
    await appliance.start()
    try:
        target = Target(f"127.0.0.1:{base}", Trust(ca_file=tmp_path / "open" / "tls" / "control.crt"))
        async with connect(target) as client:
            created = await client.create(api.CreateSessionRequest(destinations=[echo_server]))
    finally:
        await appliance.stop()
    assert created.session.owner == "NO_AUTH"


async def test_a_session_that_cannot_be_restored_fails_and_releases_its_peer(
    tmp_path: Path, echo_server: str
) -> None:
    a = await start_facility(tmp_path, "a")
    b = await start_facility(tmp_path, "b")
    squatter = socket.socket()
    try:
        created, joined = await open_session((a, b), echo_server)
        await b.appliance.stop()
        # Another program takes the entry point's port while the consumer appliance is down.
        squatter.bind(("127.0.0.1", int(joined.entry_points[0].rsplit(":", 1)[1])))
        squatter.listen()
        b.appliance = Appliance(b.appliance.settings)
        await b.appliance.start()
        async with b.client() as client:
            failed = await client.get(joined.session_id)
        assert failed.state == api.State.FAILED and "not restored" in failed.reason
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            async with a.client() as client:
                producer = await client.get(created.session.session_id)
            if producer.state == api.State.RELEASED or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert producer.state == api.State.RELEASED
    finally:
        squatter.close()
        await b.appliance.stop()
        await a.appliance.stop()
