"""The status page's server against real appliances in this process: off by default, TLS with the
control certificate, the API's authenticator and ownership rule, live sessions with their throughput.

The browser side (the page renders, updates, shows refusals) is tests/integration/test_status_page.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.auth import add_token
from appliance.config import load_settings
from appliance.control.server import Appliance
from appliance.errors import Unavailable

from .conftest import Facility, echo_through, free_port_block, open_session, start_facility

SCISTREAM = Path(sys.executable).parent / "scistream"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _request(
    port: int, path: str, *, token: str | None, ca_file: Path | None, method: str = "GET", body: bytes = b""
) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ca_file is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        context = ssl.create_default_context(cafile=str(ca_file))  # hostname 127.0.0.1 checked too
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


async def fetch(
    facility: Facility, path: str = "/api/sessions", *, token: str | None = None, **kw: Any
) -> Reply:
    """A request to the facility's status page, over TLS checked against its control CA."""
    page = facility.appliance.status_page
    assert page is not None, "the status page is not running"
    kw.setdefault("ca_file", facility.ca_file)
    return await asyncio.to_thread(_request, page.port, path, token=token, **kw)


async def sessions_seen(facility: Facility, subject: str) -> list[dict[str, Any]]:
    reply = await fetch(facility, token=facility.tokens[subject])
    assert reply.status == 200, reply.body
    sessions: list[dict[str, Any]] = reply.json()["sessions"]
    return sessions


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    """Producer side "a" and consumer side "b", both serving a status page."""
    a = await start_facility(tmp_path, "a", status_port=free_port_block(1))
    try:
        b = await start_facility(tmp_path, "b", status_port=free_port_block(1))
        try:
            yield a, b
        finally:
            await b.appliance.stop()
    finally:
        await a.appliance.stop()


async def test_the_status_page_is_off_unless_a_port_is_set(tmp_path: Path) -> None:
    facility = await start_facility(tmp_path, "plain")
    try:
        assert facility.appliance.settings.status_port == 0
        assert facility.appliance.status_page is None
    finally:
        await facility.appliance.stop()


async def test_the_data_endpoint_refuses_a_request_without_a_token(pair: tuple[Facility, Facility]) -> None:
    a, _ = pair
    await open_session(pair, "127.0.0.1:9")

    reply = await fetch(a)

    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert reply.json() == {"error": "missing bearer token"}


async def test_the_data_endpoint_refuses_a_wrong_token_without_quoting_it(
    pair: tuple[Facility, Facility],
) -> None:
    a, _ = pair
    wrong = a.tokens["alice"][:-4] + "AAAA"

    reply = await fetch(a, token=wrong)

    assert reply.status == 401
    assert "sessions" not in reply.json()
    assert wrong.encode() not in reply.body


async def test_a_token_in_the_url_is_not_accepted(pair: tuple[Facility, Facility]) -> None:
    a, _ = pair
    reply = await fetch(a, f"/api/sessions?token={a.tokens['alice']}")
    assert reply.status == 401


async def test_each_user_sees_their_own_live_sessions_and_an_admin_sees_all(
    pair: tuple[Facility, Facility],
) -> None:
    a, b = pair
    created, joined = await open_session(pair, "127.0.0.1:9")  # alice's

    alice_b = await sessions_seen(b, "alice")
    assert [s["session_id"] for s in alice_b] == [joined.session_id]
    row = alice_b[0]
    assert row["state"] == "ACTIVE"
    assert row["side"] == "consumer"
    assert row["mode"] == "quic"
    assert row["entry_points"] == list(joined.entry_points)
    assert row["destinations"] == ["127.0.0.1:9"]
    assert row["expires_at"] > row["created_at"]
    assert [s["session_id"] for s in await sessions_seen(a, "alice")] == [created.session.session_id]
    assert await sessions_seen(b, "bob") == []
    assert [s["session_id"] for s in await sessions_seen(b, "root")] == [joined.session_id]


async def test_a_released_session_leaves_the_page(pair: tuple[Facility, Facility]) -> None:
    _, b = pair
    _, joined = await open_session(pair, "127.0.0.1:9")
    assert len(await sessions_seen(b, "alice")) == 1

    async with b.client() as client:
        await client.release(joined.session_id)

    assert await sessions_seen(b, "alice") == []
    # `scistream ls` still lists it (a record for the retention period); the page shows live ones.
    async with b.client() as client:
        listed = await client.list()
    assert [s.session_id for s in listed] == [joined.session_id]


async def test_traffic_through_a_session_shows_as_throughput(
    pair: tuple[Facility, Facility], echo_server: str
) -> None:
    _, b = pair
    _, joined = await open_session(pair, echo_server)
    payload = os.urandom(1 << 20)
    assert await echo_through(joined.entry_points[0], payload) == payload

    async def moved() -> dict[str, Any] | None:
        (row,) = await sessions_seen(b, "alice")
        return row if any(p[1] > 0 and p[2] > 0 for p in row["throughput"]) else None

    deadline = time.monotonic() + 15
    while (row := await moved()) is None:
        assert time.monotonic() < deadline, f"no traffic sample: {await sessions_seen(b, 'alice')}"
        await asyncio.sleep(0.2)
    assert row["bytes_in"] >= len(payload)
    assert row["bytes_out"] >= len(payload)
    # Each point: [time, bits/s in, bits/s out], oldest first.
    times = [p[0] for p in row["throughput"]]
    assert times == sorted(times)


async def test_the_page_is_served_over_tls_with_the_control_certificate(
    pair: tuple[Facility, Facility],
) -> None:
    a, _ = pair
    assert a.appliance.status_page is not None
    port = a.appliance.status_page.port

    reply = await fetch(a, "/")  # verified against the control CA, hostname included

    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    with pytest.raises(http.client.RemoteDisconnected):
        await asyncio.to_thread(_request, port, "/", token=None, ca_file=None)


async def test_the_page_forbids_other_scripts_and_form_submission(pair: tuple[Facility, Facility]) -> None:
    a, _ = pair
    reply = await fetch(a, "/")

    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy
    assert "'unsafe-inline'" not in policy
    assert "form-action 'none'" in policy
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert a.tokens["alice"].encode() not in reply.body


async def test_the_page_takes_only_get_and_head_on_known_paths(pair: tuple[Facility, Facility]) -> None:
    a, _ = pair
    token = a.tokens["alice"]
    assert (await fetch(a, "/api/sessions", token=token, method="POST", body=b"{}")).status == 405
    assert (await fetch(a, "/nothing-here", token=token)).status == 404
    head = await fetch(a, "/api/sessions", token=token, method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert (await fetch(a, "/", method="POST", body=b"x" * 100_000)).status == 413


async def test_an_insecure_appliance_serves_the_page_over_plain_http(tmp_path: Path) -> None:
    facility = await start_facility(tmp_path, "dev", insecure=True, status_port=free_port_block(1))
    try:
        reply = await fetch(facility, token=facility.tokens["alice"], ca_file=None)
        assert reply.status == 200
        assert reply.json()["subject"] == "alice"
    finally:
        await facility.appliance.stop()


async def test_a_status_port_in_use_stops_the_start_and_frees_the_control_port(tmp_path: Path) -> None:
    base = free_port_block(3)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    settings = load_settings(
        listen=f"127.0.0.1:{base}",
        port_range=f"{base + 1}-{base + 2}",
        state_dir=tmp_path / "clash",
        auth="none",
        status_port=busy.getsockname()[1],
    )
    try:
        with pytest.raises(Unavailable, match="status page"):
            await Appliance(settings).start()
    finally:
        busy.close()
    with socket.socket() as control:  # nothing half-started holds the control port
        control.bind(("127.0.0.1", base))
    again = Appliance(settings.model_copy(update={"status_port": free_port_block(1)}))
    await again.start()  # nor the state directory
    await again.stop()


def test_tokens_sent_to_the_page_never_reach_the_debug_log(tmp_path: Path) -> None:
    base = free_port_block(4)
    tokens_file = tmp_path / "tokens.yaml"
    token = add_token(tokens_file, "alice", ["admin"])
    wrong = token[:-4] + "AAAA"
    log_file = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    with log_file.open("wb") as out:
        server = subprocess.Popen(
            [SCISTREAM, "server", "--listen", f"127.0.0.1:{base}", "--state-dir", tmp_path / "state",
             "--auth", "tokens", "--tokens-file", tokens_file, "--port-range", f"{base + 1}-{base + 2}",
             "--status-port", str(base + 3), "--log-level", "debug", "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        ca = tmp_path / "state" / "tls" / "control.crt"
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log_file.read_text(errors="replace")
            try:
                if _request(base + 3, "/api/sessions", token=token, ca_file=ca).status == 200:
                    break
            except (OSError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, log_file.read_text(errors="replace")
            time.sleep(0.2)
        assert _request(base + 3, "/api/sessions", token=wrong, ca_file=ca).status == 401
        assert _request(base + 3, f"/api/sessions?token={token}", token=None, ca_file=ca).status == 401
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    text = log_file.read_text(errors="replace")
    assert "status page request" in text, "the appliance did not log the page's requests at debug level"
    for needle in (token, token.split("_", 1)[-1], wrong, wrong.split("_", 1)[-1]):
        assert needle not in text, "a bearer token is in the appliance's log"
