"""Messages between the control process and relay processes: JSON over a SOCK_SEQPACKET pair, with
the session's sockets passed as file descriptors (SCM_RIGHTS)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any, TypeVar

from .sessions import ConsumerSpec, ProducerSpec
from .wire import Kind

MAX_MESSAGE = 256 * 1024
MAX_FDS = 250  # per message: Linux passes at most 253 (SCM_MAX_FD)

_S = TypeVar("_S", ProducerSpec, ConsumerSpec)


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Sends `message` with `fds`; beyond MAX_FDS, the first ones go ahead in "fds" messages, which the
    receiver keeps for the next other message (a socket pair keeps messages in order)."""
    fds = list(fds)
    while len(fds) > MAX_FDS:
        socket.send_fds(sock, [json.dumps({"op": "fds"}).encode()], fds[:MAX_FDS])
        fds = fds[MAX_FDS:]
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its descriptors; None at end of stream. BlockingIOError if none is waiting."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    message: dict[str, Any] = json.loads(data)
    return message, fds


def spec_to_json(spec: ProducerSpec | ConsumerSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in asdict(spec).items():
        out[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return out


def spec_from_json(kind: type[_S], data: dict[str, Any]) -> _S:
    values: dict[str, Any] = {}
    for f in fields(kind):
        value = data[f.name]
        if f.type == "bytes":
            value = base64.b64decode(value)
        elif f.name in ("destinations",):
            value = tuple(tuple(d) for d in value)
        elif f.name in ("endpoint", "dest_indexes"):
            value = tuple(value)
        elif f.name == "kind":
            value = Kind(value)
        values[f.name] = value
    return kind(**values)
