"""Port allocator over the data port range: bind-tested, reused after release, never shared by sessions."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from appliance.errors import AlreadyExists, InvalidArgument, ResourceExhausted

TCP = socket.SOCK_STREAM
UDP = socket.SOCK_DGRAM


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> PortRange:
        try:
            first_text, last_text = text.split("-", 1)
            first, last = int(first_text), int(last_text)
        except ValueError:
            raise InvalidArgument(f"port range {text!r} is not FIRST-LAST") from None
        if not 1 <= first <= last <= 65535:
            raise InvalidArgument(f"port range {text!r} must satisfy 1 <= FIRST <= LAST <= 65535")
        return cls(first, last)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def bind_test(host: str, port: int, kind: socket.SocketKind) -> bool:
    """True if `port` can be bound now on `host` for `kind` (SO_REUSEADDR, as listeners use it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


@dataclass
class PortAllocator:
    """Hands out ports of `port_range` to sessions; lowest free port first, so ports are reused.

    TCP and UDP ports are separate spaces: a session may use TCP 5100 while another uses UDP 5100.
    """

    port_range: PortRange
    bind_host: str = "0.0.0.0"
    _owners: dict[tuple[socket.SocketKind, int], str] = field(default_factory=dict)

    def allocate(self, owner: str, kind: socket.SocketKind) -> int:
        """A free, bind-tested port for `owner`; ResourceExhausted when none is left."""
        for port in range(self.port_range.first, self.port_range.last + 1):
            if (kind, port) not in self._owners and bind_test(self.bind_host, port, kind):
                self._owners[kind, port] = owner
                return port
        raise ResourceExhausted(f"no free port left in the data port range {self.port_range}")

    def claim(self, owner: str, port: int, kind: socket.SocketKind, *, in_range: bool = False) -> int:
        """Reserves a specific port (an explicit `--entry-port`, or a restored session's port)."""
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port {port} is outside 1-65535")
        if in_range and port not in self.port_range:
            raise InvalidArgument(f"port {port} is outside the data port range {self.port_range}")
        current = self._owners.get((kind, port))
        if current is not None and current != owner:
            raise AlreadyExists(f"port {port} belongs to another session")
        if current is None and not bind_test(self.bind_host, port, kind):
            raise AlreadyExists(f"port {port} is already in use on this host")
        self._owners[kind, port] = owner
        return port

    def release(self, owner: str) -> list[int]:
        """Frees every port of `owner`; returns them."""
        freed = [key for key, who in self._owners.items() if who == owner]
        for key in freed:
            del self._owners[key]
        return sorted(port for _, port in freed)

    def owned_by(self, owner: str) -> list[int]:
        return sorted(port for (_, port), who in self._owners.items() if who == owner)

    @property
    def in_use(self) -> int:
        return len(self._owners)
