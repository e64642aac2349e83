"""`--auth introspection` against a real OAuth2 authorization server (tests/authserver.py: Authlib's
Flask integration on 127.0.0.1): tokens are issued with the client-credentials grant and introspected
over HTTP(S), through real appliances where the behaviour is the appliance's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.api.scistream import v1 as api
from appliance.auth import ADMIN_ROLE, Principal
from appliance.auth.introspection import IntrospectionAuth
from appliance.auth.introspection_rules import IntrospectionConfig
from appliance.cli.client import ApplianceClient, Target, connect
from appliance.control.channel import Trust
from appliance.errors import NotFound, PermissionDenied, Unauthenticated
from tests.authserver import AuthServer, AuthServerTls, make_test_ca

from .conftest import Facility, echo_through, facility_pair, start_facility

SCOPE = "https://auth.test.invalid/scopes/appliance/scistream"
RESOURCE = "appliance"  # the appliance's client id at the authorization server, and the audience


@pytest.fixture
def tls(tmp_path: Path) -> AuthServerTls:
    return make_test_ca(tmp_path)


def _register_clients(server: AuthServer) -> None:
    server.register(RESOURCE, resource_server=True)
    for subject in ("alice", "bob"):
        server.register(f"{subject}-app", scope=SCOPE, subject=subject, audience=RESOURCE)
    server.register("expired-app", scope=SCOPE, subject="carol", audience=RESOURCE, expires_in=-60)
    server.register("other-scope-app", scope="other", subject="dave", audience=RESOURCE)
    server.register("other-audience-app", scope=SCOPE, subject="erin", audience="another-service")


@pytest.fixture
def auth_server(tls: AuthServerTls) -> Iterator[AuthServer]:
    """The authorization server over HTTPS (its CA in `tls.ca_file`)."""
    server = AuthServer(tls=tls)
    _register_clients(server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def plain_auth_server() -> Iterator[AuthServer]:
    """The authorization server over plain HTTP on 127.0.0.1 (allowed: loopback)."""
    server = AuthServer()
    _register_clients(server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _secret_file(tmp_path: Path, secret: str, name: str = "client-secret") -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n")
    os.chmod(path, 0o600)
    return path


def appliance_settings(server: AuthServer, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """Settings overrides for an appliance that checks tokens at `server`."""
    fields: dict[str, Any] = {
        "auth": "introspection",
        "introspection_endpoint": server.introspection_endpoint,
        "introspection_client_id": RESOURCE,
        "introspection_client_secret_file": _secret_file(tmp_path, server.clients[RESOURCE].client_secret),
        "introspection_scope": SCOPE,
        "introspection_ca": server.tls.ca_file if server.tls else None,
        "introspection_timeout": 5.0,
    }
    fields.update(changes)
    return fields


def _config(server: AuthServer, **changes: Any) -> IntrospectionConfig:
    config = IntrospectionConfig(
        endpoint=server.introspection_endpoint,
        client_id=RESOURCE,
        client_secret=server.clients[RESOURCE].client_secret,
        scope=SCOPE,
        audience=RESOURCE,
        ca_file=server.tls.ca_file if server.tls else None,
    )
    return replace(config, **changes)


@contextlib.asynccontextmanager
async def client_of(facility: Facility, token: str | None) -> AsyncIterator[ApplianceClient]:
    async with connect(Target(facility.address, Trust(ca_file=facility.ca_file), token, timeout=15)) as c:
        yield c


@contextlib.asynccontextmanager
async def introspecting(server: AuthServer, tmp_path: Path, **changes: Any) -> AsyncIterator[Facility]:
    facility = await start_facility(tmp_path, "f", **appliance_settings(server, tmp_path, **changes))
    try:
        yield facility
    finally:
        await facility.appliance.stop()


async def _refusal(facility: Facility, token: str | None) -> str:
    """The message of the UNAUTHENTICATED status a list call with `token` gets."""
    async with client_of(facility, token) as client:
        with pytest.raises(Unauthenticated) as caught:
            await client.list()
    return caught.value.message


class Clock:
    """Wall and monotonic clocks that tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


# --- through real appliances ----------------------------------------------------------------------


async def test_a_valid_token_carries_a_session_end_to_end_and_its_subject_owns_it(
    auth_server: AuthServer, tmp_path: Path, echo_server: str
) -> None:
    alice, bob = auth_server.issue("alice-app", SCOPE), auth_server.issue("bob-app", SCOPE)
    async with facility_pair(tmp_path, **appliance_settings(auth_server, tmp_path)) as (a, b):
        async with client_of(a, alice) as producer, client_of(b, alice) as consumer:
            created = await producer.create(api.CreateSessionRequest(destinations=[echo_server]))
            joined = await consumer.join(api.JoinSessionRequest(ticket=created.ticket))
        assert (
            await echo_through(joined.session.entry_points[0], b"via introspection") == b"via introspection"
        )
        assert a.appliance.manager is not None
        admin = Principal("operator", frozenset({ADMIN_ROLE}))
        assert a.appliance.manager.get(admin, created.session.session_id).owner == "alice"
        async with client_of(a, bob) as other:
            assert await other.list() == []
            with pytest.raises((NotFound, PermissionDenied)):
                await other.get(created.session.session_id)


async def test_a_call_without_a_token_is_refused(plain_auth_server: AuthServer, tmp_path: Path) -> None:
    async with introspecting(plain_auth_server, tmp_path) as facility:
        assert await _refusal(facility, None) == "missing bearer token"
    assert plain_auth_server.introspections == 0


async def test_an_expired_token_is_refused(plain_auth_server: AuthServer, tmp_path: Path) -> None:
    token = plain_auth_server.issue("expired-app", SCOPE)
    async with introspecting(plain_auth_server, tmp_path) as facility:
        assert "not active" in await _refusal(facility, token)


async def test_a_revoked_token_is_refused_at_once_without_a_cache(
    plain_auth_server: AuthServer, tmp_path: Path
) -> None:
    token = plain_auth_server.issue("alice-app", SCOPE)
    async with introspecting(plain_auth_server, tmp_path, introspection_cache_ttl=0) as facility:
        async with client_of(facility, token) as client:
            assert await client.list() == []
        plain_auth_server.revoke("alice-app", token)
        assert "not active" in await _refusal(facility, token)


async def test_a_token_without_the_required_scope_is_refused(
    plain_auth_server: AuthServer, tmp_path: Path
) -> None:
    token = plain_auth_server.issue("other-scope-app", "other")
    async with introspecting(plain_auth_server, tmp_path) as facility:
        assert await _refusal(facility, token) == "token lacks the required scope"


async def test_a_token_for_another_audience_is_refused(plain_auth_server: AuthServer, tmp_path: Path) -> None:
    token = plain_auth_server.issue("other-audience-app", SCOPE)
    async with introspecting(plain_auth_server, tmp_path) as facility:
        assert await _refusal(facility, token) == "token is for another audience"


async def test_an_unreachable_authorization_server_is_unauthenticated_never_open(
    plain_auth_server: AuthServer, tmp_path: Path
) -> None:
    token = plain_auth_server.issue("alice-app", SCOPE)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/introspect"
    async with introspecting(plain_auth_server, tmp_path, introspection_endpoint=closed) as facility:
        assert await _refusal(facility, token) == "authorization server unreachable"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (500, "authorization server error (HTTP 500)"),
        (503, "authorization server error (HTTP 503)"),
        (200, "authorization server sent an invalid answer"),  # a 200 that is not JSON
    ],
)
async def test_an_authorization_server_error_is_unauthenticated(
    plain_auth_server: AuthServer, tmp_path: Path, status: int, reason: str
) -> None:
    token = plain_auth_server.issue("alice-app", SCOPE)
    plain_auth_server.fail_status = status
    async with introspecting(plain_auth_server, tmp_path) as facility:
        assert await _refusal(facility, token) == reason


async def test_a_wrong_client_secret_is_unauthenticated_for_every_token(
    plain_auth_server: AuthServer, tmp_path: Path
) -> None:
    token = plain_auth_server.issue("alice-app", SCOPE)
    wrong = _secret_file(tmp_path, "not-the-secret", "wrong-secret")
    async with introspecting(plain_auth_server, tmp_path, introspection_client_secret_file=wrong) as facility:
        assert "refused this appliance" in await _refusal(facility, token)


async def test_a_server_that_never_answers_is_unauthenticated_after_the_timeout(
    plain_auth_server: AuthServer, tmp_path: Path
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read the request, never answer

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/introspect"
    token = plain_auth_server.issue("alice-app", SCOPE)
    try:
        async with introspecting(
            plain_auth_server, tmp_path, introspection_endpoint=endpoint, introspection_timeout=0.5
        ) as facility:
            assert await _refusal(facility, token) == "authorization server did not answer in time"
        assert held, "the appliance never reached the silent server"
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


# --- the authenticator against the real server ------------------------------------------------------


async def test_an_https_endpoint_is_verified_against_the_configured_ca(auth_server: AuthServer) -> None:
    token = auth_server.issue("alice-app", SCOPE)
    trusted = IntrospectionAuth(_config(auth_server))
    untrusted = IntrospectionAuth(_config(auth_server, ca_file=None))  # the system's CAs only
    try:
        assert (await trusted.authenticate(f"Bearer {token}")).subject == "alice"
        with pytest.raises(Unauthenticated, match="unreachable"):
            await untrusted.authenticate(f"Bearer {token}")
    finally:
        await trusted.close()
        await untrusted.close()


async def test_a_revoked_token_works_until_the_cache_ttl_runs_out_then_is_refused(
    plain_auth_server: AuthServer,
) -> None:
    clock = Clock()
    auth = IntrospectionAuth(
        _config(plain_auth_server, cache_ttl=30), wall_clock=clock.wall, monotonic=clock.monotonic
    )
    token = plain_auth_server.issue("alice-app", SCOPE)
    try:
        assert (await auth.authenticate(token)).subject == "alice"
        plain_auth_server.revoke("alice-app", token)
        clock.offset = 29  # within the TTL: the cached answer still holds (the documented window)
        assert (await auth.authenticate(token)).subject == "alice"
        assert plain_auth_server.introspections == 1
        clock.offset = 30.5
        with pytest.raises(Unauthenticated, match="not active"):
            await auth.authenticate(token)
        assert plain_auth_server.introspections == 2
    finally:
        await auth.close()


async def test_a_cached_answer_never_outlives_the_token(plain_auth_server: AuthServer) -> None:
    plain_auth_server.register("short-app", scope=SCOPE, subject="frank", audience=RESOURCE, expires_in=20)
    clock = Clock()
    auth = IntrospectionAuth(
        _config(plain_auth_server, cache_ttl=600), wall_clock=clock.wall, monotonic=clock.monotonic
    )
    token = plain_auth_server.issue("short-app", SCOPE)
    try:
        assert (await auth.authenticate(token)).subject == "frank"
        clock.offset = 25  # past the token's exp, well within the cache TTL
        with pytest.raises(Unauthenticated, match="expired"):
            await auth.authenticate(token)
    finally:
        await auth.close()


async def test_the_cache_holds_at_most_its_size(plain_auth_server: AuthServer) -> None:
    auth = IntrospectionAuth(_config(plain_auth_server, cache_size=2))
    tokens = [plain_auth_server.issue("alice-app", SCOPE) for _ in range(3)]
    try:
        for token in tokens:
            await auth.authenticate(token)
        assert plain_auth_server.introspections == 3
        await auth.authenticate(tokens[2])
        await auth.authenticate(tokens[1])
        assert plain_auth_server.introspections == 3  # both still cached
        await auth.authenticate(tokens[0])
        assert plain_auth_server.introspections == 4  # evicted to keep the cache at 2
    finally:
        await auth.close()


async def test_concurrent_calls_with_one_token_are_introspected_once(plain_auth_server: AuthServer) -> None:
    auth = IntrospectionAuth(_config(plain_auth_server))
    token = plain_auth_server.issue("alice-app", SCOPE)
    try:
        principals = await asyncio.gather(*(auth.authenticate(token) for _ in range(8)))
        assert {p.subject for p in principals} == {"alice"}
        assert plain_auth_server.introspections == 1
    finally:
        await auth.close()


async def test_a_failed_introspection_is_not_cached(plain_auth_server: AuthServer) -> None:
    auth = IntrospectionAuth(_config(plain_auth_server))
    token = plain_auth_server.issue("alice-app", SCOPE)
    try:
        plain_auth_server.fail_status = 503
        with pytest.raises(Unauthenticated, match="HTTP 503"):
            await auth.authenticate(token)
        plain_auth_server.fail_status = None  # the server is back: the next call asks again
        assert (await auth.authenticate(token)).subject == "alice"
    finally:
        await auth.close()


async def test_a_refusal_is_cached_like_an_acceptance(plain_auth_server: AuthServer) -> None:
    auth = IntrospectionAuth(_config(plain_auth_server))
    try:
        for _ in range(3):
            with pytest.raises(Unauthenticated, match="not active"):
                await auth.authenticate("no-such-token")
        assert plain_auth_server.introspections == 1
    finally:
        await auth.close()
