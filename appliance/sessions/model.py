"""The session record and its lifecycle, as one explicit transition table."""

from __future__ import annotations

import enum
import ipaddress
import re
import time
from dataclasses import dataclass, field, replace

from appliance.errors import FailedPrecondition, InvalidArgument


class State(enum.StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    FAILED = "FAILED"


class Side(enum.StrEnum):
    PRODUCER = "producer"
    CONSUMER = "consumer"


class Mode(enum.StrEnum):
    QUIC = "quic"
    WIREGUARD = "wireguard"
    TLS = "tls"
    AUTO = "auto"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


ENDED = frozenset({State.RELEASED, State.FAILED})

# Every legal transition. Anything else is a bug or a race and is refused.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.ACTIVE, State.RELEASED, State.FAILED}),
    State.ACTIVE: frozenset({State.RELEASED, State.FAILED}),
    State.RELEASED: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(FailedPrecondition):
    def __init__(self, current: State, target: State) -> None:
        super().__init__(f"session is {current}, it cannot become {target}")
        self.current = current
        self.target = target


def check_transition(current: State, target: State) -> None:
    """Raises IllegalTransition unless `current → target` is in TRANSITIONS."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)


@dataclass(frozen=True)
class Address:
    """A `host:port` pair; IPv6 hosts print in brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, what: str = "address") -> Address:
        """Parses `host:port` or `[v6]:port`; raises InvalidArgument with a message naming `what`.

        The host is an IPv4 or IPv6 literal or an RFC 1123 hostname; the port is 1-65535 written in
        canonical decimal (no sign, no leading zero). The message quotes at most 80 characters of `text`.
        """
        text = text.strip()
        shown = text if len(text) <= 80 else text[:80] + "…"
        match = _HOST_PORT.fullmatch(text) if len(text) <= _MAX_ADDRESS else None
        if not match:
            raise InvalidArgument(f"{what} {shown!r} is not HOST:PORT")
        host, port_text = match.group(1) or match.group(3), match.group(2) or match.group(4)
        if not _valid_port(port_text):
            raise InvalidArgument(f"{what} {shown!r} has port {port_text}, not a number in 1-65535")
        if not _valid_host(host, bracketed=match.group(1) is not None):
            raise InvalidArgument(f"{what} {shown!r} has no valid IP address or hostname")
        return cls(host, int(port_text))


MAX_DESTINATIONS = 256
"""Destinations one session may have (a larger list is refused, not truncated)."""

_MAX_ADDRESS = 300  # a 253-character hostname, brackets, colon and port
_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9.-]+):(\d+)")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _valid_port(text: str) -> bool:
    return text.isdigit() and not text.startswith("0") and len(text) <= 5 and int(text) <= 65535


def _valid_host(host: str, *, bracketed: bool) -> bool:
    if bracketed:
        try:
            return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            return False
    if re.fullmatch(r"[0-9.]+", host):  # only digits and dots: meant as IPv4, so it must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def parse_destinations(values: list[str]) -> list[Address]:
    """Destinations from a list whose items may themselves be comma-separated; at most MAX_DESTINATIONS."""
    items: list[str] = []
    for value in values:
        items += [part for part in value.split(",") if part.strip()]
        if len(items) > MAX_DESTINATIONS:
            raise InvalidArgument(f"a session has at most {MAX_DESTINATIONS} destinations")
    if not items:
        raise InvalidArgument("at least one destination HOST:PORT is required")
    return [Address.parse(item, what="destination") for item in items]


@dataclass(frozen=True)
class Session:
    """One appliance's half of a session. Immutable: changes produce a new record."""

    session_id: str
    side: Side
    mode: Mode
    protocol: Protocol
    owner: str
    state: State = State.PENDING
    destinations: tuple[Address, ...] = ()
    entry_points: tuple[Address, ...] = ()
    data_endpoints: tuple[Address, ...] = ()
    num_conn: int = 1
    rate_bps: int = 0
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    ended_at: float = 0.0
    reason: str = ""
    # The other appliance: its control address, its certificate fingerprint and its session id.
    peer_address: str = ""
    peer_fingerprint: str = ""
    peer_session_id: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    packet_size: int = 0  # QUIC mode, shown not stored: see Counters.packet_size

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def transition(self, target: State, reason: str = "") -> Session:
        """The record in state `target`; raises IllegalTransition if the table forbids it."""
        check_transition(self.state, target)
        ended_at = time.time() if target in ENDED else self.ended_at
        return replace(self, state=target, reason=reason or self.reason, ended_at=ended_at)
