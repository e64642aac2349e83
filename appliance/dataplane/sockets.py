"""Sockets the control process binds for a relay process: errors surface here, synchronously, and the
control process keeps a copy to hand to a relay process that is restarted."""

from __future__ import annotations

import socket

BACKLOG = 4096  # pending TCP connections an entry point or data endpoint holds


def bind_socket(host: str, port: int, kind: socket.SocketKind, *, shared: bool = False) -> socket.socket:
    """A bound (and, for TCP, listening) socket; `shared` ones may be bound again to the same port, by
    this user only, and the kernel spreads new connections or datagrams across them (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bind_group(host: str, port: int, kind: socket.SocketKind, size: int) -> list[socket.socket]:
    """`size` sockets bound to one port (SO_REUSEPORT), in the order they joined the kernel's group."""
    socks: list[socket.socket] = []
    try:
        for _ in range(size):
            socks.append(bind_socket(host, port, kind, shared=True))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
