"""One TCP connection spliced onto one QUIC stream, on either side of the relay."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .counters import Counters

if TYPE_CHECKING:
    from .protocol import RelayProtocol

logger = logging.getLogger("quic_relay")

# Application error codes carried in RESET_STREAM / STOP_SENDING.
STREAM_ABORTED = 0x101  # the TCP connection on the other side failed or was reset
DESTINATION_UNREACHABLE = 0x102  # producer side could not connect to the destination
BAD_STREAM_HEADER = 0x103  # the stream did not start with a valid header


class StreamBridge(asyncio.Protocol):
    """Relays bytes between a TCP transport and a QUIC stream, both ways, with half-close.

    TCP EOF from the app becomes a stream FIN; a FIN from the peer becomes `write_eof()` once the
    transport's buffer is flushed (asyncio does that). The TCP socket is closed when both directions
    have ended; a reset or error on either side aborts the other.
    """

    def __init__(
        self,
        counters: Counters,
        high_water: int,
        *,
        link: RelayProtocol | None = None,
        stream_id: int | None = None,
        on_connected: Callable[[StreamBridge], None] | None = None,
    ) -> None:
        self.counters = counters
        self.high_water = high_water
        self.link = link
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._early: list[bytes] = []  # stream data that arrived before the TCP socket was up
        self._out: list[bytes] = []  # stream data of this batch of packets, written once after it
        self._early_fin = False
        self._app_eof = False  # EOF read from the TCP app, FIN sent on the stream
        self._peer_fin = False  # FIN received on the stream, EOF written to the TCP app
        self._writing_paused = False
        self._aborted = False  # aborted before the TCP socket was connected
        self._done = False

    # asyncio.Protocol: the TCP side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.high_water, low=self.high_water // 2)
        self.counters.opened()
        if self._aborted:
            transport.abort()
            return
        if self._on_connected is not None:
            self._on_connected(self)
        early, self._early = self._early, []
        for data in early:
            self._write_to_app(data)
        if self._early_fin:
            self._end_to_app()
        if self.link is not None and self.stream_id is not None and not self._writing_paused:
            self.link.set_receive_paused(self.stream_id, False)

    def data_received(self, data: bytes) -> None:
        if self.link is None or self.stream_id is None:
            return  # reading stays paused until attached; nothing can arrive here
        self.counters.bytes_in += len(data)
        self.link.stream_send(self.stream_id, data)
        if self.link.stream_buffered(self.stream_id) > self.high_water and self.transport is not None:
            self.transport.pause_reading()
            self.link.watch_send_buffer(self.stream_id, self)

    def eof_received(self) -> bool:
        if self.link is None or self.stream_id is None:
            return False
        self._app_eof = True
        self.link.stream_send(self.stream_id, b"", end_stream=True)
        self._close_if_finished()
        return True  # keep the socket open: the reply direction may still be running

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        self.counters.closed()
        if self.link is not None and self.stream_id is not None:
            if not (self._app_eof and self._peer_fin):
                logger.debug("stream %d: TCP side lost (%s), resetting", self.stream_id, exc)
                self.link.stream_abort(self.stream_id, STREAM_ABORTED)
            self.link.forget_stream(self.stream_id)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.link is not None and self.stream_id is not None:
            self.link.set_receive_paused(self.stream_id, True)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.link is not None and self.stream_id is not None:
            self.link.set_receive_paused(self.stream_id, False)

    # called by the QUIC side

    def attach(self, link: RelayProtocol, stream_id: int, header: bytes) -> None:
        """Bind an accepted TCP connection to a new stream and start reading from the app."""
        self.link = link
        self.stream_id = stream_id
        link.register_stream(stream_id, self)
        link.stream_send(stream_id, header)
        if self.transport is not None:
            self.transport.resume_reading()

    def resume_reading(self) -> None:
        """The stream's send buffer drained below half the high watermark."""
        if self.transport is not None and not self._done:
            self.transport.resume_reading()

    def stream_data(self, data: bytes, end_stream: bool) -> None:
        """Bytes (and maybe FIN) received on the QUIC stream."""
        if self.transport is None:
            self._early.append(data)
            self._early_fin = self._early_fin or end_stream
            return
        if data and not self._done:
            # One TCP send per batch of QUIC packets, not one per packet: the link calls
            # flush_to_app() when the batch is done.
            if not self._out and self.link is not None:
                self.link.flush_later(self)
            self._out.append(data)
        if end_stream:
            self._end_to_app()

    def flush_to_app(self) -> None:
        """Write what the last batch of packets carried to the TCP app."""
        out, self._out = self._out, []
        if out:
            self._write_to_app(out[0] if len(out) == 1 else b"".join(out))

    def abort(self) -> None:
        """The stream was reset, the peer sent STOP_SENDING, or the QUIC connection ended."""
        self._aborted = True
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()

    @property
    def done(self) -> bool:
        return self._done

    def _write_to_app(self, data: bytes) -> None:
        assert self.transport is not None
        if self._done:
            return
        self.transport.write(data)
        self.counters.bytes_out += len(data)

    def _end_to_app(self) -> None:
        assert self.transport is not None
        if self._done or self._peer_fin:
            return
        self.flush_to_app()
        self._peer_fin = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # asyncio shuts down writing once its buffer is flushed
        self._close_if_finished()

    def _close_if_finished(self) -> None:
        if self._app_eof and self._peer_fin and self.transport is not None:
            self.transport.close()
