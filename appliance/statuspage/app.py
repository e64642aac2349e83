"""The status page: a static HTML page, and the JSON it polls, behind the API's authenticator.

`GET /` is the page itself. It holds no data and no secret, so it is served to anyone; it asks the
user for a token, keeps it in the tab's sessionStorage and sends it as `Authorization: Bearer` to
`GET /api/sessions`, which refuses a call without a valid one (401) exactly as the gRPC API does.
The token is never part of a URL, and requests are never logged with their headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import ssl
import time
from importlib import resources

import structlog

from appliance.auth import Authenticator
from appliance.control.tls import ControlCertificate
from appliance.errors import ApplianceError, PermissionDenied, Unauthenticated, Unavailable
from appliance.sessions.manager import SYSTEM, SessionManager
from appliance.statuspage.history import ThroughputHistory
from appliance.statuspage.http_server import HttpServer, Request, Response, text
from appliance.statuspage.view import snapshot

log = structlog.get_logger(__name__)

SAMPLE_INTERVAL = 1.0  # seconds between throughput samples; the page polls as often
PAGE_PATH = "/"
DATA_PATH = "/api/sessions"


def load_page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy, which allows exactly its own inline script and
    style (by hash) and requests to this origin: injected markup could run nothing."""
    html = resources.files("appliance.statuspage").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
        return " ".join(f"'sha256-{d}'" for d in digests)

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html.encode(), policy


_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def http_context(cert: ControlCertificate) -> ssl.SSLContext:
    """TLS for the page with the control certificate; HTTP/1.1 only (the control port's ALPN
    offers h2, which this server does not speak)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _status_of(exc: ApplianceError) -> int:
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, Unavailable):
        return 503
    return 500


class StatusPage:
    """Serves the page and samples the sessions' throughput while it runs."""

    def __init__(
        self, manager: SessionManager, authenticator: Authenticator, interval: float = SAMPLE_INTERVAL
    ) -> None:
        self._manager = manager
        self._authenticator = authenticator
        self._interval = interval
        self._history = ThroughputHistory()
        self._html, policy = load_page()
        self._page_headers = {"content-security-policy": policy}
        self._http = HttpServer(self._handle, base_headers=_SECURITY_HEADERS)
        self._sampler: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._http.port

    async def start(
        self,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """Listens (on `sock` if given, else host:port); Unavailable if it cannot."""
        self._sample()
        try:
            await self._http.start(host, port, ssl_context=ssl_context, sock=sock)
        except OSError as exc:
            raise Unavailable(f"cannot serve the status page on port {port}: {exc.strerror}") from None
        self._sampler = asyncio.create_task(self._sample_forever())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        await self._http.stop()

    def _sample(self) -> None:
        self._history.observe(time.time(), self._manager.list(SYSTEM))

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self._sample()
            except Exception:  # a failed sample leaves a gap in the chart, never a dead page
                log.exception("status page: sampling the sessions failed")

    async def _handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text(405, "method not allowed", allow="GET, HEAD")
        if request.path == PAGE_PATH:
            return Response(200, self._html, "text/html; charset=utf-8", self._page_headers)
        if request.path == DATA_PATH:
            return await self._sessions(request)
        return text(404, "not found")

    async def _sessions(self, request: Request) -> Response:
        try:
            principal = await self._authenticator.authenticate(request.headers.get("authorization"))
        except ApplianceError as exc:
            status = _status_of(exc)
            challenge = {"www-authenticate": 'Bearer realm="scistream"'} if status == 401 else {}
            return _json(status, {"error": exc.message}, challenge)
        data = snapshot(principal, self._manager.list(principal), self._history, time.time())
        return _json(200, data, {})


def _json(status: int, data: object, headers: dict[str, str]) -> Response:
    return Response(status, json.dumps(data).encode(), "application/json", headers)
