"""Lanes: several QUIC connections of one session, each served by its own process, on one UDP port.

A server process each binds the data endpoint's port with SO_REUSEPORT. The kernel would pick the
socket for a packet by a hash of its addresses, and two connections could well land in the same
process. Instead a classic BPF program on the group picks socket `(source port % LANES) % sockets`,
and the client of lane k sends from a port with `port % LANES == k`. The client needs no knowledge
of how many processes the server runs: lanes 0..n-1 land on n different ones whenever the server has
at least n, and spread evenly over fewer. A path that rewrites source ports (NAT) still works; its
connections are merely spread by chance, each staying on one socket as long as its mapping holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import random
import socket
import struct
from collections.abc import Sequence

LANES = 256  # lanes a client can ask for; also the most server processes that steering tells apart

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; Python's socket module does not name it
_SKF_NET_OFF = -0x100000  # classic BPF: load relative to the network header

# Classic BPF opcodes (<linux/filter.h>)
_LD, _LDX, _ALU, _JMP, _RET = 0x00, 0x01, 0x04, 0x05, 0x06
_H, _B = 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_K, _A = 0x00, 0x10
_RSH, _MOD = 0x70, 0x90
_JA, _JEQ = 0x00, 0x10

_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range
_BIND_TRIES = 64


def steering_program(sockets: int) -> bytes:
    """The BPF program (struct sock_filter[]) returning `(source port % LANES) % sockets`.

    The UDP header follows the IP header: at 40 bytes for IPv6 (a QUIC datagram carries no
    extension headers), after IHL words for IPv4 (including IPv4-mapped on a dual-stack socket)."""
    if not 1 <= sockets <= LANES:
        raise ValueError(f"steering tells 1-{LANES} sockets apart, not {sockets}")

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)

    return b"".join(
        (
            op(_LD | _B | _ABS, _SKF_NET_OFF),  # A = first byte of the IP header
            op(_ALU | _RSH | _K, 4),  # A = IP version
            op(_JMP | _JEQ | _K, 6, 0, 2),  # IPv6: next; IPv4: skip two
            op(_LD | _H | _ABS, _SKF_NET_OFF + 40),  # A = source port (IPv6)
            op(_JMP | _JA | _K, 2),
            op(_LDX | _B | _MSH, _SKF_NET_OFF),  # X = IPv4 header length
            op(_LD | _H | _IND, _SKF_NET_OFF),  # A = source port (IPv4)
            op(_ALU | _MOD | _K, LANES),
            op(_ALU | _MOD | _K, sockets),
            op(_RET | _A, 0),
        )
    )


def steer(group: Sequence[socket.socket]) -> None:
    """Attaches steering to a SO_REUSEPORT group; `group` in the order its sockets were bound, which
    is the kernel's order as long as none of them is closed before the others."""
    program = steering_program(len(group))
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
    group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)  # the kernel copies it


def lane_of(port: int, sockets: int) -> int:
    """Which socket of a steered group of `sockets` a datagram from source `port` reaches."""
    return (port % LANES) % sockets


def bind_lane(sock: socket.socket, host: str, lane: int) -> None:
    """Binds `sock` to an ephemeral-range port in lane `lane` (port % LANES == lane)."""
    if not 0 <= lane < LANES:
        raise ValueError(f"lane {lane} is outside 0-{LANES - 1}")
    low, high = _EPHEMERAL
    with contextlib.suppress(OSError), open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(v) for v in f.read().split())
    first, last = (low + LANES - 1) // LANES, high // LANES - 1
    if last < first:
        raise OSError(errno.EADDRNOTAVAIL, f"the ephemeral port range {low}-{high} holds no lane ports")
    for _ in range(_BIND_TRIES):
        port = random.randint(first, last) * LANES + lane
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return
    raise OSError(errno.EADDRINUSE, f"no free port in lane {lane} after {_BIND_TRIES} tries")
