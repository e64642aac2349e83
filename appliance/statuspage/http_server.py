"""A small HTTP/1.1 server: h11 parses, asyncio carries the bytes, a handler answers each request.

Only what a read-only page needs: GET and HEAD, no request bodies, keep-alive, bounded request heads,
a bounded number of connections and an idle timeout. Requests are never logged with their headers
or query string (a token must not reach a log, even when someone puts it in a URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import structlog

log = structlog.get_logger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers
MAX_BODY = 16 * 1024  # read and dropped: no request here has a body, but a client may send one
MAX_CONNECTIONS = 64
# A client has this long to send a whole request (or, between requests, the next one) and to take a
# response: one that trickles bytes cannot hold a connection slot for longer.
IDLE_TIMEOUT = 30.0
_READ = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message + "\n").encode(), headers=headers)


class HttpServer:
    """Serves `handler` on one listening socket until `stop()`."""

    def __init__(self, handler: Handler, *, base_headers: dict[str, str] | None = None) -> None:
        self._handler = handler
        self._base_headers = base_headers or {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(
        self, host: str | None, port: int, *, ssl_context: ssl.SSLContext | None, sock: socket.socket | None
    ) -> None:
        """Listens on `sock` if given, else on host:port; OSError if it cannot."""
        if sock is not None:
            self._server = await asyncio.start_server(self._accept, sock=sock, ssl=ssl_context)
        else:
            self._server = await asyncio.start_server(
                self._accept, host, port, ssl=ssl_context, reuse_address=True
            )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()  # busy: the client retries; no request was read, so nothing is lost
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, TimeoutError, ssl.SSLError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                request = await asyncio.wait_for(self._read_request(conn, reader), IDLE_TIMEOUT)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(conn, writer, "GET", text(status, HTTPStatus(status).phrase), close=True)
                return
            if request is None:
                return
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("status page: the request failed", method=request.method)
                response = text(500, "internal error (see the appliance log)")
            await self._send(conn, writer, request.method, response, close=False)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        """The next request with its (empty) body read; None when the client closed."""
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                target = request.target.decode("ascii", "replace")
                return Request(
                    method=request.method.decode("ascii", "replace"),
                    path=target.split("?", 1)[0],
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers},
                )

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        method: str,
        response: Response,
        *,
        close: bool,
    ) -> None:
        headers = {
            **self._base_headers,
            **response.headers,
            "content-type": response.content_type,
            "content-length": str(len(response.body)),
        }
        if close:
            headers["connection"] = "close"
        head = h11.Response(
            status_code=response.status,
            headers=list(headers.items()),
            reason=HTTPStatus(response.status).phrase.encode(),
        )
        writer.write(conn.send(head))
        if method != "HEAD":
            writer.write(conn.send(h11.Data(data=response.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
        log.debug("status page request", method=method, status=response.status)
