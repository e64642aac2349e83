"""One TLS connection of the relay, with OpenSSL reading and writing the socket itself: a non-blocking
`ssl.SSLSocket` driven by the event loop's readiness callbacks.

Why not asyncio's TLS transports: they run OpenSSL on memory BIOs, so every byte is copied into and out
of a BIO and each read becomes a new bytes object. Here OpenSSL decrypts straight into a reusable buffer
and encrypts straight into the socket: one stream went from 0.65x to 0.88x stunnel's TLS 1.3 throughput
in the same harness runs (bench/results/tls-mode.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from . import contexts
from .wire import ALPN

READ_SIZE = 256 * 1024  # one read: up to 16 TLS records, or one plain recv


class BufferPool:
    """Buffers lent for one read and its delivery: connections that wait hold none, so memory follows
    the data in flight rather than the number of connections."""

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._keep = keep

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


POOL = BufferPool(READ_SIZE)


class ChannelProtocol(Protocol):
    def data_received(self, data: memoryview) -> None:
        """`data` lives in a lent buffer: valid until this returns or, if the protocol paused the
        channel during the call, until it resumes it."""

    def eof_received(self) -> None:
        """The peer closed its side of the TLS connection."""

    def write_drained(self) -> None:
        """Everything written has been taken by OpenSSL (and the buffers handed to `write` are free)."""

    def connection_lost(self, exc: BaseException | None) -> None: ...


class TlsChannel:
    """A handshaken TLS connection. Reads only while a protocol is attached and not paused; `write`
    keeps what OpenSSL could not take yet, without copying it."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.protocol: ChannelProtocol | None = None
        self.peer_fingerprint = contexts.peer_fingerprint(sock)
        self._writes: deque[bytes | memoryview] = deque()
        self._write_size = 0
        self._writer = False
        self._read_wants_write = False  # OpenSSL must send something before it can read on
        self._reading = False
        self._lent: bytearray | None = None  # the buffer the paused protocol still reads from
        self._holding = True
        self._closing = False
        self._closed = False

    # ---- reading ---------------------------------------------------------------------------

    def start(self, protocol: ChannelProtocol) -> None:
        """Attaches `protocol` and reads for it (OpenSSL may already hold records that came with the
        handshake, which the socket's readiness would not announce)."""
        self.protocol = protocol
        self.resume_reading()

    def pause_reading(self, holding: bool = True) -> None:
        """Stops reading. `holding=False` from inside `data_received` says the protocol keeps no view
        of the data, so the buffer goes back to the pool now rather than at `resume_reading`."""
        if self._reading:
            self._reading = False
            self._holding = holding
            self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if self._reading or self._closed or self.protocol is None:
            return
        if self._lent is not None:
            POOL.give(self._lent)
            self._lent = None
        self._reading = True
        self.loop.add_reader(self.fd, self._readable)
        self.loop.call_soon(self._readable)

    def _readable(self) -> None:
        if not self._reading or self.protocol is None:
            return
        buffer = POOL.take()
        view = memoryview(buffer)
        filled, eof = 0, False
        # SSLSocket.read rather than recv_into: one record per call (16 KiB at most), and recv_into's
        # extra layer measured 7 % more CPU for this loop. Given a buffer it returns the count
        # (typeshed says bytes).
        read = cast("Callable[[int, memoryview], int]", self.sock.read)
        try:
            while filled < READ_SIZE:
                n = read(READ_SIZE - filled, view[filled:])
                if n == 0:
                    eof = True
                    break
                filled += n
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:
            self._read_wants_write = True  # read again once the socket is writable
            self._want_writable()
        except (OSError, ValueError) as exc:
            POOL.give(buffer)
            self._lost(exc)
            return
        if filled:
            self.protocol.data_received(view[:filled])
            if not self._reading:
                if self._holding:
                    self._lent = buffer  # paused during the call: the protocol still holds views of it
                else:
                    POOL.give(buffer)
                return
            if filled == READ_SIZE:
                self.loop.call_soon(self._readable)  # more records may be waiting inside OpenSSL
        POOL.give(buffer)
        if eof and not self._closed:
            self.pause_reading()
            self.protocol.eof_received()

    # ---- writing ---------------------------------------------------------------------------

    @property
    def write_buffer_size(self) -> int:
        return self._write_size

    def write(self, data: bytes | memoryview) -> None:
        """Encrypts and sends `data`; what the socket cannot take now waits (the caller keeps `data`
        unchanged until `write_drained`)."""
        if self._closed or not data:
            return
        self._writes.append(data)
        self._write_size += len(data)
        if len(self._writes) == 1 and not self._flush():
            self._want_writable()

    def _flush(self) -> bool:
        """Writes what is queued; False while the socket is full."""
        writes = self._writes
        while writes:
            data = writes[0]
            try:
                # Without partial writes OpenSSL takes all of `data` or asks to be called again
                # with the same bytes once writable, remembering the records already sent.
                self.sock.send(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except (OSError, ValueError) as exc:
                self._lost(exc)
                return False
            writes.popleft()
            self._write_size -= len(data)
        return True

    def _want_writable(self) -> None:
        if not self._writer and not self._closed:
            self._writer = True
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            self.loop.call_soon(self._readable)
        if not self._flush():
            return
        self._writer = False
        self.loop.remove_writer(self.fd)
        if self._closing:
            self._finish_close()
        elif self.protocol is not None:
            self.protocol.write_drained()

    # ---- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes once what was written has been sent, with a TLS close_notify."""
        if self._closed or self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._writes:
            self._finish_close()

    def _finish_close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.sock.unwrap()  # sends close_notify; does not wait for the peer's
        self._lost(None)

    def abort(self) -> None:
        self._lost(None)

    def _lost(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._reading = False
        self.loop.remove_reader(self.fd)
        if self._writer:
            self.loop.remove_writer(self.fd)
        self._writes.clear()
        self._write_size = 0
        if self._lent is not None:
            self._lent = None  # not back to the pool: the protocol may still hold views of it
        self.sock.close()
        if self.protocol is not None:
            self.protocol.connection_lost(exc)

    @property
    def closed(self) -> bool:
        return self._closed


# ---- establishing ------------------------------------------------------------------------------


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    future: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    add(fd, ready)
    try:
        await future
    finally:
        remove(fd)


async def handshake(sock: ssl.SSLSocket, timeout: float) -> TlsChannel:
    """Completes the TLS handshake of a non-blocking SSLSocket; the peer must speak our ALPN."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _ready(loop, sock.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, sock.fileno(), write=True)
    if sock.selected_alpn_protocol() != ALPN:
        raise ssl.SSLError(f"the peer does not speak {ALPN}")
    return TlsChannel(sock)


KEEPALIVE = (20, 5, 4)  # idle seconds, seconds between probes, probes: a dead peer is noticed in 40 s


def tune(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (interactive traffic; bulk data goes in full records anyway), and
    TCP keepalives: an idle connection whose peer host vanished (no RST ever comes) is closed by the
    kernel, so it cannot keep a session's peer looking present (see `peer_absent_for` in TLS mode).

    TCP socket buffers are left to the kernel's autotuning, which grows them up to net.ipv4.tcp_rmem and
    tcp_wmem: setting SO_RCVBUF would fix the size (capped by net.core.rmem_max) and turn autotuning
    off, which measured slower.
    """
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A connected, tuned TCP socket to (host, port)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        family, type_, proto, _, address = infos[0]
        raw = socket.socket(family, type_, proto)
        try:
            tune(raw)
            await loop.sock_connect(raw, address)
        except BaseException:
            raw.close()
            raise
    return raw


async def connect(ctx: ssl.SSLContext, host: str, port: int, server_name: str, timeout: float) -> TlsChannel:
    """A TLS connection to the peer's data endpoint (connect and handshake within `timeout` each)."""
    raw = await connect_tcp(host, port, timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        return await handshake(sock, timeout)
    except BaseException:
        sock.close()
        raise


class Acceptor:
    """Accepts connections on a listening socket the control process handed over; `accepted` gets
    each new socket (non-blocking, tuned)."""

    RETRY_AFTER = 0.1  # seconds without accepting after running out of descriptors

    def __init__(self, sock: socket.socket, accepted: Callable[[socket.socket], None]) -> None:
        self.sock = sock
        self._accepted = accepted
        self.loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):  # a burst of connections, without starving established ones
            try:
                raw, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and the like: the connection stays queued; stop polling a socket that
                # stays readable until descriptors are free again.
                self.loop.remove_reader(self.sock.fileno())
                self._retry = self.loop.call_later(self.RETRY_AFTER, self._resume)
                return
            tune(raw)
            self._accepted(raw)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
