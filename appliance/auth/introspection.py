"""`--auth introspection`: opaque bearer tokens checked by an OAuth2 authorization server (RFC 7662).

Each token is sent, with the appliance's own client id and secret (HTTP basic auth), to the
configured introspection endpoint, e.g. Globus Auth's
https://auth.globus.org/v2/oauth2/token/introspect. The answer must say `active`, carry the required
scope, name this appliance in `aud`, and have an `exp` in the future; the caller is its `sub` (or its
`username`). Answers are cached for a short, bounded time, so a revoked token keeps working for at
most `cache_ttl` seconds. When the authorization server cannot be reached, times out or errors, the
call is refused (UNAUTHENTICATED): this never fails open.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import structlog
from authlib.integrations.httpx_client import AsyncOAuth2Client

from appliance.auth.introspection_rules import IntrospectionConfig, principal_from
from appliance.auth.principal import Principal, parse_authorization
from appliance.auth.ttlcache import TtlCache
from appliance.errors import InvalidArgument, Unauthenticated

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Verdict:
    """A cached answer: the principal, or the reason the token was refused."""

    principal: Principal | None
    refusal: str = ""


class IntrospectionAuth:
    """Checks bearer tokens with an RFC 7662 introspection endpoint, caching answers briefly."""

    kind = "introspection"

    def __init__(
        self,
        config: IntrospectionConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._wall, self._monotonic = wall_clock, monotonic
        self._cache: TtlCache[bytes, _Verdict] = TtlCache(config.cache_size)
        self._in_flight: dict[bytes, asyncio.Task[_Verdict]] = {}
        self._client: AsyncOAuth2Client | None = None
        self._verify: ssl.SSLContext | bool = True  # the system's trust store
        if config.ca_file is not None:
            try:
                self._verify = ssl.create_default_context(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"cannot load the CA file {config.ca_file}: {exc}") from None

    async def authenticate(self, authorization: str | None) -> Principal:
        token = parse_authorization(authorization)
        if token is None:
            raise Unauthenticated("missing bearer token")
        # The cache is keyed by a hash: no token stays in memory longer than its call.
        key = hashlib.sha256(token.encode()).digest()
        verdict = self._cache.get(key, self._monotonic())
        if verdict is None:
            task = self._in_flight.get(key)
            if task is None:  # one introspection per token, however many calls wait for it
                task = asyncio.create_task(self._introspect(key, token))
                self._in_flight[key] = task
                task.add_done_callback(self._forget)
            verdict = await asyncio.shield(task)
        if verdict.principal is None:
            raise Unauthenticated(verdict.refusal)
        return verdict.principal

    def _forget(self, task: asyncio.Task[_Verdict]) -> None:
        for key, value in list(self._in_flight.items()):
            if value is task:
                del self._in_flight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a refusal nobody waited for is no "never retrieved" error

    async def close(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _introspect(self, key: bytes, token: str) -> _Verdict:
        """Asks the authorization server and caches its answer; Unauthenticated if it cannot answer
        (nothing is cached then, so the next call asks again)."""
        claims = await self._ask(token)
        wall, mono = self._wall(), self._monotonic()
        try:
            verdict = _Verdict(principal_from(claims, self.config, wall))
        except Unauthenticated as exc:
            verdict = _Verdict(None, exc.message)
        expires_at = mono + self.config.cache_ttl
        if verdict.principal is not None:  # never past the token's own expiry
            expires_at = min(expires_at, mono + (float(claims["exp"]) - wall))
        self._cache.put(key, verdict, expires_at, mono)
        log.debug(
            "token introspected",
            subject=verdict.principal.subject if verdict.principal else None,
            refusal=verdict.refusal or None,
        )
        return verdict

    async def _ask(self, token: str) -> Mapping[str, Any]:
        """The introspection answer for `token` (a JSON object), or Unauthenticated."""
        endpoint = self.config.endpoint
        try:
            async with asyncio.timeout(self.config.timeout):  # in all, however slowly it answers
                response: httpx2.Response = await self._session().introspect_token(
                    endpoint, token=token, token_type_hint="access_token"
                )
        except (TimeoutError, httpx2.TimeoutException):
            log.error("authorization server timed out", endpoint=endpoint, timeout=self.config.timeout)
            raise Unauthenticated("authorization server did not answer in time") from None
        except httpx2.HTTPError as exc:
            log.error("authorization server unreachable", endpoint=endpoint, error=type(exc).__name__)
            raise Unauthenticated("authorization server unreachable") from None
        except Exception as exc:  # whatever else goes wrong, the call is refused: never fail open
            log.error("token introspection failed", endpoint=endpoint, error=type(exc).__name__)
            raise Unauthenticated("token introspection failed (see the appliance log)") from None
        if response.status_code in (401, 403):
            log.error(
                "authorization server refused this appliance's client credentials",
                endpoint=endpoint,
                client_id=self.config.client_id,
                status=response.status_code,
            )
            raise Unauthenticated("authorization server refused this appliance (see its log)")
        if response.status_code != 200:
            log.error("authorization server error", endpoint=endpoint, status=response.status_code)
            raise Unauthenticated(f"authorization server error (HTTP {response.status_code})")
        try:
            claims = response.json()
        except ValueError:
            claims = None
        if not isinstance(claims, dict):
            log.error("authorization server sent no JSON object", endpoint=endpoint)
            raise Unauthenticated("authorization server sent an invalid answer")
        return claims

    def _session(self) -> AsyncOAuth2Client:
        # Made on first use, inside the event loop that serves the calls; kept for its connection pool.
        if self._client is None:
            self._client = AsyncOAuth2Client(
                client_id=self.config.client_id,
                client_secret=self.config.client_secret,
                token_endpoint_auth_method="client_secret_basic",
                timeout=self.config.timeout,
                verify=self._verify,
                follow_redirects=False,
            )
        return self._client
