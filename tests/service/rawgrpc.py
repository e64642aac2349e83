"""Raw gRPC calls for tests of hostile input: bodies as bytes, frames with any prefix, any method."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.exceptions import StreamClosedError

from appliance.control.tls import ca_context


class RawCodec(CodecBase):
    """Sends and receives message bodies as they are, so a test can send bytes that do not decode."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


@dataclass(frozen=True)
class Answer:
    status: Status
    message: str


def frame(body: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `length` may lie about the body's size."""
    return struct.pack(">BI", int(compressed), len(body) if length is None else length) + body


def open_raw_channel(address: str, ca_file: Path | None) -> Channel:
    host, port = address.rsplit(":", 1)
    context = ca_context(ca_file) if ca_file is not None else None
    return Channel(host, int(port), ssl=context, codec=RawCodec())


async def raw_call(
    channel: Channel,
    method: str,
    data: bytes,
    *,
    token: str | None = None,
    framed: bool = False,
    streaming: bool = False,
    timeout: float = 120,
) -> Answer:
    """Calls `method` with `data` as the message body (or, with `framed`, as the whole request stream,
    prefix included) and returns the status the appliance answered. With `streaming` (a method that
    answers with a stream) the first message counts as OK and the call is cancelled there."""
    metadata = {"authorization": f"Bearer {token}"} if token else None
    try:
        async with channel.request(
            method, Cardinality.UNARY_UNARY, bytes, bytes, timeout=timeout, metadata=metadata
        ) as stream:
            if framed:
                await stream.send_request()
                # grpclib has no public way to send a body whose prefix lies: write the DATA frame.
                await stream._stream.send_data(data, end_stream=True)
                stream._end_done = True
            else:
                await stream.send_message(data, end=True)
            first = await stream.recv_message()
            if streaming and first is not None:
                with contextlib.suppress(StreamClosedError):  # the server may have ended it already
                    await stream.cancel()
                return Answer(Status.OK, "")
            await stream.recv_trailing_metadata()
    except GRPCError as exc:
        return Answer(exc.status, exc.message or "")
    except StreamTerminatedError as exc:
        return Answer(Status.UNAVAILABLE, f"stream terminated: {exc}")
    return Answer(Status.OK, "")
