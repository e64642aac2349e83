"""Both directions of SciStream 1.2.1 interop: our `s2uc` against 1.2.1's s2cs (a stand-in that behaves
as it does), and 1.2.1's s2uc flow (grpcio, same call order and metadata) against our appliances."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from appliance.cli.client import Target, connect
from appliance.cli.legacy import LEGACY_CLIENT_ID, LEGACY_SCOPE, server_flags
from appliance.config import load_settings
from appliance.control.channel import Trust
from appliance.control.server import Appliance
from appliance.errors import ApplianceError, Unavailable
from appliance.sessions.legacy import session_id_for
from appliance.sessions.manager import SYSTEM
from appliance.sessions.model import Side, State
from quic_relay import generate_identity
from tests import legacy121
from tests.authserver import AuthServer

from .conftest import Facility, echo_through, free_port_block, start_facility

S2UC = Path(sys.executable).parent / "s2uc"
S2CS = Path(sys.executable).parent / "s2cs"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    identity = generate_identity("s2cs-1.2.1", sans=["127.0.0.1", "localhost"])
    path = tmp_path / "server.crt"
    path.write_bytes(identity.cert_pem)
    return path, identity.cert_pem, identity.key_pem


@pytest.fixture
def slow_s2cs(cert: tuple[Path, bytes, bytes]) -> Iterator[tuple[legacy121.StandIn, str]]:
    """1.2.1's s2cs whose req registers its uid 0.5 s after it arrives (e.g. its Globus token check)."""
    server = legacy121.StandIn(register_delay=0.5)
    port = server.start(cert[1], cert[2])
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop()


async def s2uc(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(S2UC), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_our_s2uc_inbound_request_sends_hello_only_once_the_1_2_1_req_is_registered(
    slow_s2cs: tuple[legacy121.StandIn, str], cert: tuple[Path, bytes, bytes]
) -> None:
    server, address = slow_s2cs
    args = ["--s2cs", address, "--server_cert", str(cert[0]), "--remote_ip", "10.0.0.5"]
    status, out, err = await s2uc("inbound_request", *args, "--receiver_ports", "5001", "--num_conn", "1")
    assert status == 0, err
    uid = out.splitlines()[1].split()[0]
    assert "Listeners: ['127.0.0.1:5100']" in out
    accepted = [e for e in server.events if not e.startswith("hello refused")]
    assert accepted == [f"req registered {uid}", f"hello {uid}", f"update {uid}"]
    assert server.entries[uid].prod_listeners == ["10.0.0.5:5001"]


async def test_our_s2uc_outbound_request_sends_hello_only_once_the_1_2_1_req_is_registered(
    slow_s2cs: tuple[legacy121.StandIn, str], cert: tuple[Path, bytes, bytes]
) -> None:
    server, address = slow_s2cs
    args = ["--s2cs", address, "--server_cert", str(cert[0]), "--num_conn", "1", "--receiver_ports", "6000"]
    status, out, err = await s2uc("outbound_request", *args, "u-1", "10.0.0.1:5100")
    assert status == 0, err
    assert "Listeners: ['127.0.0.1:5100']" in out
    accepted = [e for e in server.events if not e.startswith("hello refused")]
    assert accepted == ["req registered u-1", "hello u-1", "update u-1"]


async def test_our_s2uc_gives_up_on_hello_within_its_timeout_with_one_line(
    cert: tuple[Path, bytes, bytes],
) -> None:
    server = legacy121.StandIn(register_delay=30)  # its req never registers in time
    port = server.start(cert[1], cert[2])
    try:
        args = ["--s2cs", f"127.0.0.1:{port}", "--server_cert", str(cert[0]), "--timeout", "2"]
        started = time.monotonic()
        status, _, err = await s2uc("inbound_request", *args, "--receiver_ports", "5001")
    finally:
        server.stop()
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("Error: "), err
    assert "entry not found" in err or "did not answer" in err
    assert time.monotonic() - started < 25  # bounded: well before the req's own 30 s


@pytest.fixture
async def no_auth_pair(tmp_path: Path) -> AsyncIterator[tuple[Facility, Facility]]:
    """Two appliances as 1.2.1 users run s2cs: no --client_secret, so no token is checked."""
    a = await start_facility(tmp_path, "a", auth="none")
    peer_port = int(a.address.rsplit(":", 1)[1])
    b = await start_facility(tmp_path, "b", auth="none", legacy_peer_port=peer_port)
    try:
        yield a, b
    finally:
        await b.appliance.stop()
        await a.appliance.stop()


async def test_the_1_2_1_client_flow_carries_tcp_through_our_appliances(
    no_auth_pair: tuple[Facility, Facility], echo_server: str
) -> None:
    a, b = no_auth_pair
    host, port = echo_server.split(":")
    uid = "0e4a1c6a-9b5e-11ef-8a3b-0242ac120002"  # a uuid1, as 1.2.1 makes them
    listeners = await asyncio.to_thread(legacy121.inbound_request, a.address, a.ca_file, uid, host, port, 1)
    entry_port = free_port_block(1)
    entry_points = await asyncio.to_thread(
        legacy121.outbound_request, b.address, b.ca_file, uid, ",".join(listeners), host, str(entry_port), 1
    )
    assert entry_points == [f"127.0.0.1:{entry_port}"]
    assert await echo_through(entry_points[0], b"from 1.2.1") == b"from 1.2.1"
    assert b.appliance.manager is not None
    assert b.appliance.manager.get(SYSTEM, session_id_for(uid, Side.CONSUMER)).state is State.ACTIVE


async def test_s2cs_listens_on_every_address_and_its_certificate_names_listener_ip(tmp_path: Path) -> None:
    base = free_port_block(3)
    flags = server_flags(
        listener_ip="127.0.0.2",
        port=base,
        port_range=f"{base + 1}-{base + 2}",
        server_type="Haproxy",
        mode=None,
        server_crt=None,
        server_key=None,
        client_secret="",
        auth=None,
        ssl=True,
        verbose=False,
        advertise=None,
        state_dir=tmp_path / "s2cs",
    )
    appliance = Appliance(load_settings(**flags))
    await appliance.start()
    try:
        cert = tmp_path / "s2cs" / "tls" / "control.crt"
        hosts = ["127.0.0.2", "127.0.0.1", "localhost"]
        if socket.has_ipv6 and Path("/proc/net/if_inet6").read_text().strip():
            hosts.append("[::1]")
        for host in hosts:  # each one verified by name against the certificate
            async with connect(Target(f"{host}:{base}", Trust(ca_file=cert), None, timeout=5)) as client:
                assert await client.serving(), host
    finally:
        await appliance.stop()


async def test_a_start_that_fails_releases_the_state_dir(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(Unavailable, match="cannot listen"):
            await start_facility(tmp_path, "f", listen=address)
    facility = await start_facility(tmp_path, "f")  # the same state directory: free again
    await facility.appliance.stop()


@pytest.fixture
def globus_like_server() -> Iterator[AuthServer]:
    """A real authorization server standing in for Globus Auth: the s2cs's client (1.2.1's default
    id) introspects; alice's app gets tokens with 1.2.1's scope for that client."""
    server = AuthServer()
    server.register(LEGACY_CLIENT_ID, resource_server=True)
    scope = LEGACY_SCOPE.format(client_id=LEGACY_CLIENT_ID)
    server.register("alice-app", scope=scope, subject="alice", audience=LEGACY_CLIENT_ID)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_s2cs_client_secret_checks_the_bare_tokens_of_the_1_2_1_client_by_introspection(
    tmp_path: Path, globus_like_server: AuthServer
) -> None:
    """`s2cs --client_secret S` as 1.2.1 users run it (its default --client_id), pointed at a local
    authorization server: the 1.2.1 client's bare token works, no token or a revoked one is
    UNAUTHENTICATED, and the secret is not in the log."""
    server = globus_like_server
    secret = server.clients[LEGACY_CLIENT_ID].client_secret
    token = server.issue("alice-app", LEGACY_SCOPE.format(client_id=LEGACY_CLIENT_ID))
    base = free_port_block(3)
    log_file = tmp_path / "s2cs.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    with log_file.open("wb") as out:
        s2cs = subprocess.Popen(
            [S2CS, "--listener_ip", "127.0.0.1", "--port", str(base),
             "--port_range", f"{base + 1}-{base + 2}", "--state-dir", tmp_path / "state",
             "--client_secret", secret,
             "--introspection-endpoint", server.introspection_endpoint],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    address, cert = f"127.0.0.1:{base}", tmp_path / "state" / "tls" / "control.crt"
    try:
        deadline = time.monotonic() + 30
        while not await _serving(address, cert):
            assert s2cs.poll() is None, log_file.read_text(errors="replace")
            assert time.monotonic() < deadline, log_file.read_text(errors="replace")
            await asyncio.sleep(0.2)
        uid = "0e4a1c6a-9b5e-11ef-8a3b-0242ac120003"
        listeners = await asyncio.to_thread(
            legacy121.inbound_request, address, cert, uid, "127.0.0.1", "5001", 1, token
        )
        assert listeners == [f"127.0.0.1:{base + 1}"]
        assert server.introspections >= 1
        for refused in (None, "Bearer " + "x" * 20):
            with pytest.raises(grpc.RpcError) as caught:
                await asyncio.to_thread(legacy121.Client(address, cert, refused).release, uid)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        await asyncio.to_thread(legacy121.Client(address, cert, token).release, uid)
    finally:
        os.killpg(s2cs.pid, signal.SIGTERM)
        s2cs.wait(timeout=15)
    text = log_file.read_text(errors="replace")
    assert "--client_secret on the command line is visible" in text
    assert secret not in text and token not in text


async def _serving(address: str, cert: Path) -> bool:
    if not cert.is_file():
        return False
    try:
        async with connect(Target(address, Trust(ca_file=cert), None, timeout=2)) as client:
            return await client.serving()
    except ApplianceError:
        return False
