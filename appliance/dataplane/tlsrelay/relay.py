"""asyncio protocols of one relayed TCP connection: a plain leg (the app's socket) spliced to a
framed TLS leg (the tunnel), with explicit flow control and in-band end-of-stream.

Flow control: when one leg's write buffer passes its high-water mark, the other leg stops reading
until it drains. uvloop delivers data right after `connection_made` even when reading is paused, so
data that arrives before the other leg exists is kept and written once it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any, cast

from .wire import END_OF_STREAM, StreamDecoder, WireError, frame_chunks

WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024


@dataclass
class Counters:
    """What one session's relay did in one process."""

    bytes_in: int = 0  # received from local apps
    bytes_out: int = 0  # delivered to local apps
    connections: int = 0  # TCP connections and UDP flows opened
    active: int = 0
    rejected: int = 0  # tunnel connections closed as not ours (bad header, unknown index, wrong peer)
    dropped_datagrams: int = 0


def tune(transport: asyncio.BaseTransport) -> None:
    """Larger buffers and write limits; no Nagle delay for interactive traffic.

    TCP socket buffers are left to the kernel's autotuning, which grows them up to net.ipv4.tcp_rmem and
    tcp_wmem (32 and 4 MiB on our hosts): setting SO_RCVBUF would fix the size (capped by
    net.core.rmem_max) and turn autotuning off, which measured slower. UDP has no autotuning: raised.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            if sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if hasattr(transport, "set_write_buffer_limits"):
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)


class Leg(asyncio.Protocol):
    """One socket of a Splice; forwards every event to it."""

    def __init__(self, splice: Splice | None = None) -> None:
        self.splice = splice
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.tls = transport.get_extra_info("ssl_object") is not None
        tune(transport)
        if self.splice is not None:
            self.splice.made(self)

    def data_received(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(self, data)

    def eof_received(self) -> bool:
        if self.splice is not None:
            self.splice.eof(self)
        # Keep a plain socket's write side open: the other direction may still be flowing. (A TLS
        # transport cannot stay half-open; end-of-stream travels in band there.)
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        if self.splice is not None:
            self.splice.lost(self, exc)

    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice.other(self).pause()

    def resume_writing(self) -> None:
        if self.splice is not None:
            self.splice.other(self).resume()

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            with contextlib.suppress(RuntimeError, AttributeError):
                self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            with contextlib.suppress(RuntimeError, AttributeError):
                self.transport.resume_reading()

    def close(self, abort: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


class Splice:
    """One relayed TCP connection: `plain` carries raw bytes, `tunnel` carries frames (wire.py).

    Each direction ends with end-of-stream (FIN on the plain leg, an empty frame on the tunnel); the
    connection closes once both have ended, or at once when either leg fails.
    """

    def __init__(self, counters: Counters, tracked: set[Splice], tunnel: Leg | None = None) -> None:
        self.plain = Leg(self)
        self.tunnel = tunnel or Leg(self)
        self.tunnel.splice = self
        self._counters = counters
        self._tracked = tracked
        self._decoder = StreamDecoder()
        self._to_tunnel: list[bytes | memoryview] = []  # before the tunnel leg is ready
        self._to_plain: list[bytes | memoryview] = []  # before the plain leg is ready
        self._tunnel_ready = False
        self._plain_ended = False  # the app half-closed: end-of-stream sent (or queued) to the tunnel
        self._done = False
        tracked.add(self)
        counters.connections += 1
        counters.active += 1

    # ---- wiring ----------------------------------------------------------------------------

    def other(self, leg: Leg) -> Leg:
        return self.tunnel if leg is self.plain else self.plain

    def made(self, leg: Leg) -> None:
        if self._done:
            leg.close(abort=True)  # the other leg failed before this one was connected
        elif leg is self.plain:
            if self._to_plain:
                self._deliver(self._to_plain)
                self._to_plain = []
            self.tunnel.resume()
            self._finish_if_done()

    def tunnel_ready(self, header: bytes = b"") -> None:
        """The tunnel leg may now carry frames (after the header, on the consumer side)."""
        transport = self.tunnel.transport
        assert transport is not None
        self._tunnel_ready = True
        transport.writelines([header, *self._to_tunnel] if header else self._to_tunnel)
        self._to_tunnel = []
        self.plain.resume()
        self._finish_if_done()

    # ---- events ----------------------------------------------------------------------------

    def received(self, leg: Leg, data: bytes) -> None:
        if self._done:
            return  # the other leg is gone: nothing can be relayed any more
        if leg is self.plain:
            self._counters.bytes_in += len(data)
            if self._tunnel_ready and self.tunnel.transport is not None:
                self.tunnel.transport.writelines(frame_chunks(data))
            else:
                self._to_tunnel += frame_chunks(data)
                self.plain.pause()
        else:
            self.from_tunnel(data)

    def from_tunnel(self, data: bytes) -> None:
        try:
            pieces = self._decoder.feed(data)
        except WireError:
            self.abort()
            return
        if self.plain.transport is None:
            self._to_plain += pieces
            self.tunnel.pause()
        else:
            self._deliver(pieces)
        self._finish_if_done()

    def _deliver(self, pieces: list[bytes | memoryview]) -> None:
        transport = self.plain.transport
        assert transport is not None
        for piece in pieces:
            self._counters.bytes_out += len(piece)
            transport.write(piece)
        if self._decoder.ended and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()

    def eof(self, leg: Leg) -> None:
        if self._done:
            return
        if leg is self.plain:
            self._plain_ended = True
            if self._tunnel_ready and self.tunnel.transport is not None:
                self.tunnel.transport.write(END_OF_STREAM)
            else:
                self._to_tunnel.append(END_OF_STREAM)
            self._finish_if_done()
        elif not self._decoder.ended:
            self.abort()  # the tunnel ended without end-of-stream: the other side failed

    def lost(self, leg: Leg, exc: Exception | None) -> None:
        clean = exc is None and self._plain_ended and self._decoder.ended
        self._end()
        self.other(leg).close(abort=not clean)

    # ---- ending ----------------------------------------------------------------------------

    def _finish_if_done(self) -> None:
        if self._plain_ended and self._decoder.ended and self._tunnel_ready and not self._to_plain:
            self._end()
            self.plain.close()
            self.tunnel.close()

    def abort(self) -> None:
        self._end()
        self.plain.close(abort=True)
        self.tunnel.close(abort=True)

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._counters.active -= 1
            self._tracked.discard(self)


def peer_of(transport: asyncio.BaseTransport) -> Any:
    return transport.get_extra_info("ssl_object")
