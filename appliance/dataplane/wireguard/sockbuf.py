"""Wider UDP buffers for wireguard-go's sockets, set from outside the process.

wireguard-go 0.0.20220316 (Debian's) leaves its UDP sockets at net.core.rmem_default (208 KiB). At a few
hundred Mbit/s the receiving side's buffer overflows whenever wireguard-go falls a moment behind: every
datagram dropped there is a TCP segment lost inside the tunnel, and TCP backs off (in the bench, 20,000
retransmissions in 4 s and the producer side's UdpRcvbufErrors growing by the same). Newer wireguard-go
asks for 7 MiB itself (SO_RCVBUFFORCE, conn/controlfns_linux.go); for the older one we take a duplicate of
each of its UDP sockets with pidfd_getfd(2) and set the buffers on that: both descriptors name the same
socket. wireguard-go binds new sockets whenever its listen port is set, so this follows every `set=1`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

from quic_relay.udp import SO_RCVBUFFORCE, SO_SNDBUFFORCE

SOCKET_BUFFER = 7 << 20  # what newer wireguard-go sets (socketBufferSize)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (syscalls added since Linux 5.1 are)
_libc = ctypes.CDLL(None, use_errno=True)


def widen(pid: int, size: int = SOCKET_BUFFER) -> int:
    """Sets the send and receive buffers of every UDP socket of process `pid` to `size`; returns how many
    sockets it set. OSError when the process's sockets cannot be reached or changed (pidfd_getfd(2) needs
    Linux 5.6 and ptrace access to the process; the forced sizes need CAP_NET_ADMIN)."""
    pidfd = os.pidfd_open(pid)
    try:
        return sum(_widen_one(pidfd, fd, size) for fd in _socket_fds(pid))
    finally:
        os.close(pidfd)


def _socket_fds(pid: int) -> list[int]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                found.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return found


def _widen_one(pidfd: int, target_fd: int, size: int) -> bool:
    dup = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if dup < 0:
        code = ctypes.get_errno()
        if code == errno.EBADF:
            return False  # closed meanwhile
        raise OSError(code, f"pidfd_getfd: {os.strerror(code)}")
    with socket.socket(fileno=dup) as sock:  # closes the duplicate only
        if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    return True
