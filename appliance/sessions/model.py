"""The session record and its lifecycle, as one explicit transition table."""

from __future__ import annotations

import enum
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
        """Parses `host:port` or `[v6]:port`; raises InvalidArgument with a message naming `what`."""
        text = text.strip()
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9._-]+):(\d{1,5})", text)
        if not match:
            raise InvalidArgument(f"{what} {text!r} is not HOST:PORT")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{what} {text!r} has port {port}, outside 1-65535")
        return cls(host, port)


def parse_destinations(values: list[str]) -> list[Address]:
    """Destinations from a list whose items may themselves be comma-separated."""
    items = [part for value in values for part in value.split(",") if part.strip()]
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
