"""One relayed TCP connection: the app's socket (plain) pumped to and from a TLS channel carrying
frames (wire.py), with flow control in both directions and in-band end-of-stream.

Flow control without queues: plain → tunnel, one buffer is read and handed to the channel; the plain
socket is read again only once OpenSSL has taken it all. Tunnel → plain, the payload of one channel read
is written to the plain socket; the channel stays paused until it is. So a slow side stops the other
with at most one read in flight per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from .channel import POOL, TlsChannel
from .wire import END_OF_STREAM, FRAME_HEADER_SIZE, StreamDecoder, WireError, put_frame_header

IOV_MAX = 1024  # pieces per sendmsg


@dataclass
class Counters:
    """What one session's relay did in one process."""

    bytes_in: int = 0  # received from local apps
    bytes_out: int = 0  # delivered to local apps
    connections: int = 0  # TCP connections and UDP flows opened
    active: int = 0
    rejected: int = 0  # tunnel connections closed as not ours (bad header, unknown index, wrong peer)
    dropped_datagrams: int = 0


class TcpPump:
    """Each direction ends with end-of-stream (FIN on the plain socket, an empty frame on the tunnel);
    the connection closes once both have ended, or at once when either side fails."""

    def __init__(self, plain: socket.socket, counters: Counters, tracked: set[TcpPump]) -> None:
        self.loop = asyncio.get_running_loop()
        self.plain = plain
        self.fd = plain.fileno()
        self.channel: TlsChannel | None = None
        self._counters = counters
        self._tracked = tracked
        self._decoder = StreamDecoder()
        self._up: bytearray | None = None  # lent to the channel until it drains
        self._down: list[bytes | memoryview] = []  # payload not yet written to the plain socket
        self._reading = False
        self._writing = False
        self._plain_ended = False  # the app half-closed: end-of-stream written to the channel
        self._shut = False  # end-of-stream from the tunnel passed on as FIN
        self._done = False
        tracked.add(self)
        counters.connections += 1
        counters.active += 1

    def attach(self, channel: TlsChannel, header: bytes = b"", early: bytes = b"") -> None:
        """Starts relaying over `channel`: `header` is sent first (consumer side), `early` is tunnel
        data that came with the connection header (producer side)."""
        if self._done:
            channel.abort()
            return
        self.channel = channel
        channel.write(header)
        channel.start(self)
        if early:
            self.data_received(memoryview(early))
        self._read_plain()

    # ---- plain → tunnel --------------------------------------------------------------------

    def _read_plain(self) -> None:
        if not self._reading and not self._done and not self._plain_ended:
            self._reading = True
            self.loop.add_reader(self.fd, self._plain_readable)

    def _stop_plain(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.fd)

    def _plain_readable(self) -> None:
        channel = self.channel
        if channel is None or self._done:
            return
        buffer = POOL.take()
        view = memoryview(buffer)
        try:
            n = self.plain.recv_into(view[FRAME_HEADER_SIZE:])
        except (BlockingIOError, InterruptedError):
            POOL.give(buffer)
            return
        except OSError:
            POOL.give(buffer)
            self.abort()
            return
        if n == 0:
            POOL.give(buffer)
            self._stop_plain()
            self._plain_ended = True
            channel.write(END_OF_STREAM)
            self._finish_if_done()
            return
        self._counters.bytes_in += n
        put_frame_header(buffer, n)  # READ_SIZE is below MAX_FRAME: never raises here
        channel.write(view[: FRAME_HEADER_SIZE + n])
        if channel.write_buffer_size:
            self._up = buffer  # OpenSSL still reads from it: no more plain data until it drains
            self._stop_plain()
        else:
            POOL.give(buffer)

    def write_drained(self) -> None:
        if self._up is not None:
            POOL.give(self._up)
            self._up = None
        self._read_plain()
        self._finish_if_done()

    # ---- tunnel → plain --------------------------------------------------------------------

    def data_received(self, data: memoryview) -> None:
        if self._done:
            return
        try:
            self._down = self._decoder.feed(data)
        except WireError:
            self.abort()
            return
        self._write_plain()

    def _write_plain(self) -> None:
        pieces = self._down
        while pieces:
            try:
                sent = self.plain.sendmsg(pieces[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.abort()
                return
            self._counters.bytes_out += sent
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces.pop(0))
            if sent:
                pieces[0] = pieces[0][sent:]
            elif pieces:
                # The app reads slower than the tunnel delivers: hold the channel until it catches up.
                assert self.channel is not None
                self.channel.pause_reading()
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.fd, self._plain_writable)
                return
        if self._decoder.ended and not self._shut:
            self._shut = True
            with contextlib.suppress(OSError):
                self.plain.shutdown(socket.SHUT_WR)
        self._finish_if_done()

    def _plain_writable(self) -> None:
        self._write_plain()
        if not self._down and self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
            if not self._done and self.channel is not None:
                self.channel.resume_reading()

    # ---- ending ----------------------------------------------------------------------------

    def eof_received(self) -> None:
        if not self._decoder.ended:
            self.abort()  # the tunnel ended without end-of-stream: the other side failed

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._done:
            clean = exc is None and self._plain_ended and self._decoder.ended and not self._down
            self._end(abort=not clean)

    def _finish_if_done(self) -> None:
        channel = self.channel
        if (
            self._plain_ended
            and self._shut
            and not self._down
            and channel is not None
            and not channel.write_buffer_size
            and not self._done
        ):
            self._end(abort=False)

    def abort(self) -> None:
        self._end(abort=True)

    def _end(self, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        self._counters.active -= 1
        self._tracked.discard(self)
        self._stop_plain()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
        self._down = []
        if abort:
            # RST rather than FIN: the app must not take a truncated stream for a complete one.
            with contextlib.suppress(OSError):
                self.plain.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.plain.close()
        if self.channel is not None:
            if abort:
                self.channel.abort()
            else:
                self.channel.close()
