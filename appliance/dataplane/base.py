"""The interface every data plane implements, chosen per session by its mode."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import PortAllocator


@dataclass(frozen=True)
class Credentials:
    """This side's per-session data-plane identity."""

    cert_pem: bytes
    key_pem: bytes
    server_name: str
    preshared_key: bytes = b""  # WireGuard: derived from the session secret on both sides


@dataclass(frozen=True)
class WireGuardPeer:
    """One side's WireGuard parameters, exchanged through Peer.Join (never a private key)."""

    public_key: bytes  # raw X25519, 32 bytes
    tunnel_addresses: tuple[str, ...]  # this side's tunnel addresses, CIDR, one per address family
    endpoint: str = ""  # HOST:PORT this side's device listens at (the consumer side's; for restarts)


@dataclass(frozen=True)
class PeerIdentity:
    """What the other side presented at Join: its data-plane certificate and, in WireGuard mode, keys."""

    cert_pem: bytes
    wireguard: WireGuardPeer | None = None


@dataclass(frozen=True)
class ProducerPlan:
    """What a producer-side tunnel needs to start."""

    session_id: str
    protocol: Protocol
    destinations: tuple[Address, ...]
    credentials: Credentials
    data_endpoints: tuple[Address, ...] = ()  # set when restoring: bind the same ports again
    saved_state: bytes = b""  # set when restoring: what the tunnel's saved_state() returned


@dataclass(frozen=True)
class ConsumerPlan:
    """What a consumer-side tunnel needs to start: ours, and what the producer side told us at Join."""

    session_id: str
    protocol: Protocol
    credentials: Credentials
    peer_cert_pem: bytes
    peer_server_name: str
    data_endpoints: tuple[Address, ...]
    destination_count: int
    num_conn: int
    entry_ports: tuple[int, ...] = ()  # explicit ports, in order; missing ones come from the range
    bind_host: str = ""
    peer_wireguard: WireGuardPeer | None = None
    saved_state: bytes = b""  # set when restoring: what the tunnel's saved_state() returned
    # Restoring after a restart: bind the entry points and return at once; a peer that is not there
    # yet is reached in the background (the manager ends the session after `peer_grace`).
    restoring: bool = False


@dataclass(frozen=True)
class Counters:
    bytes_in: int = 0
    bytes_out: int = 0
    packet_size: int = 0  # QUIC mode: bytes per packet sent now; 0 where it does not apply


class Tunnel(abc.ABC):
    """One side of one session's data plane; owns every socket, process or rule it made."""

    @property
    @abc.abstractmethod
    def addresses(self) -> tuple[Address, ...]:
        """Data endpoints (producer side) or entry points (consumer side), as bound."""

    @abc.abstractmethod
    def counters(self) -> Counters: ...

    def authorize(self, peer_cert_pem: bytes) -> None:  # noqa: B027 - only producer tunnels need it
        """Producer side: admit exactly this consumer side (called once Join is verified)."""

    def peer_absent_for(self) -> float | None:
        """Seconds this side's data plane has had no authenticated connection with the peer appliance;
        None while it has one, or when the data plane cannot tell. The manager fails a session whose
        peer stays absent longer than `peer_grace`."""
        return None

    def admit(self, peer: PeerIdentity) -> None:
        """Producer side: admit exactly this consumer side, as it presented itself at Join.

        Certificate-based tunnels need only `authorize`; WireGuard tunnels override this.
        """
        self.authorize(peer.cert_pem)

    @property
    def wireguard(self) -> WireGuardPeer | None:
        """This side's WireGuard parameters, for the peer (WireGuard tunnels only)."""
        return None

    def saved_state(self) -> bytes:
        """Secret state to keep with the session's secrets and hand back when restoring (may be empty)."""
        return b""

    def mode_choice(self) -> tuple[Mode, str] | None:
        """Auto mode: the mode this tunnel runs in and why (status shows both); None for the others."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Frees everything; idempotent."""


class Driver(abc.ABC):
    mode: Mode
    auto_eligible: bool = True  # whether `--mode auto` may pick this driver

    def prepare_consumer(
        self, session_id: str, ports: PortAllocator, advertise_host: str
    ) -> WireGuardPeer | None:
        """Consumer side, before Join: what to offer the producer side (WireGuard keys and addresses)."""
        return None

    def abandon(self, session_id: str) -> None:  # noqa: B027 - only drivers that prepare need it
        """Frees what prepare_consumer reserved when the Join does not go through."""

    async def sweep(self, live: set[str]) -> None:  # noqa: B027 - only drivers with host state need it
        """Removes what earlier processes of this appliance left on the host (processes, devices,
        rules) for sessions not in `live`. At start it runs before any restore, with `live` empty: a
        killed process's leftovers hold the very ports its sessions are restored on."""

    @abc.abstractmethod
    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        """Reserves the data endpoint(s) and starts accepting the (future) consumer side."""

    @abc.abstractmethod
    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        """Reaches the producer side's data endpoint and binds the entry points."""

    async def start(self) -> None:  # noqa: B027 - only drivers with processes of their own need it
        """Starts what the driver runs for all sessions, before any session opens or is restored."""

    async def close(self) -> None:  # noqa: B027 - only drivers with processes of their own need it
        """Stops what the driver runs for all sessions (after every tunnel is closed)."""
