"""WireGuard mode: one WireGuard device per session side, traffic forwarded by the kernel (nftables NAT).

The producer side's device listens on a data endpoint (a UDP port of the data port range); the consumer
side's device reaches it. Entry points are nftables DNAT rules onto the producer side's tunnel address,
whose own DNAT rules lead to the destinations (see rules.py). No payload byte passes through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import socket

import structlog

from appliance.dataplane.base import ConsumerPlan, Driver, ProducerPlan, Tunnel, WireGuardPeer
from appliance.dataplane.quic import _entry_port, public  # same entry-port rules as QUIC mode
from appliance.dataplane.wireguard import keys, links, rules
from appliance.dataplane.wireguard.backend import Backend
from appliance.dataplane.wireguard.pool import CONSUMER, AddressPool, Network, host_address
from appliance.dataplane.wireguard.tunnel import WireGuardState, WireGuardTunnel, blocks_of
from appliance.errors import FailedPrecondition, InvalidArgument, Unavailable
from appliance.sessions.model import Address, Mode, Protocol
from appliance.sessions.ports import TCP, UDP, PortAllocator

log = structlog.get_logger(__name__)

PREFIX = (
    "ssw"  # every interface (and nftables table) we make: ssw + 4 hex of the appliance + 8 of the session
)


def appliance_tag(state_dir: str) -> str:
    """4 hex digits naming this appliance's devices (several appliances may share a host)."""
    return hashlib.sha256(state_dir.encode()).hexdigest()[:4]


class WireGuardDriver(Driver):
    mode = Mode.WIREGUARD

    def __init__(self, backend: Backend, pool: AddressPool, tag: str) -> None:
        self.backend = backend
        self._pool = pool
        self._prefix = f"{PREFIX}{tag}"
        self._pending: dict[str, tuple[bytes, tuple[Network, ...], int]] = {}
        # `auto` picks WireGuard only where the kernel carries it (DESIGN.md §2).
        self.auto_eligible = backend.name == "kernel"
        self._forwarding_checked = False

    def ifname(self, session_id: str) -> str:
        return self._prefix + hashlib.sha256(session_id.encode()).hexdigest()[:8]

    # ---- producer side -------------------------------------------------------------------------

    async def open_producer(self, plan: ProducerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        destinations = tuple([await _resolve(d) for d in plan.destinations])
        if plan.saved_state:
            state = WireGuardState.decode(plan.saved_state)
            port = ports.claim(plan.session_id, state.listen_port, UDP)
        else:
            port = ports.allocate(plan.session_id, UDP)
            private_key = keys.generate_private_key().hex()
            state = WireGuardState(self.ifname(plan.session_id), "producer", private_key, port)
        template = rules.ProducerRules(state.ifname, plan.protocol.value, (), destinations)
        tunnel = WireGuardTunnel(
            plan.session_id,
            state,
            self.backend,
            self._pool,
            plan.credentials.preshared_key,
            (public(ports.bind_host, port, advertise_host),),
            producer_rules=template,
        )
        try:
            if plan.saved_state:
                await self._reclaim(plan.session_id, state)
            self._check_forwarding()
            await tunnel.start()
        except BaseException:
            self._pool.release(plan.session_id)
            ports.release(plan.session_id)
            raise
        return tunnel

    # ---- consumer side -------------------------------------------------------------------------

    def prepare_consumer(self, session_id: str, ports: PortAllocator, advertise_host: str) -> WireGuardPeer:
        """A key pair, a block of tunnel addresses and a listen port for the consumer side's device.

        The port is an ephemeral one, not from the data port range: entry points need both TCP and
        UDP numbers of the range (iperf3 does), and only the producer side ever sends to this port.
        """
        private_key = keys.generate_private_key()
        blocks = self._pool.allocate(session_id)
        port = _ephemeral_udp_port(ports.bind_host)
        self._pending[session_id] = (private_key, blocks, port)
        addresses = tuple(host_address(b, CONSUMER) for b in blocks)
        endpoint = str(public(ports.bind_host, port, advertise_host))
        return WireGuardPeer(keys.public_key(private_key), addresses, endpoint)

    def abandon(self, session_id: str) -> None:
        pending = self._pending.pop(session_id, None)
        if pending is not None:
            self._pool.release(session_id)

    async def open_consumer(self, plan: ConsumerPlan, ports: PortAllocator, advertise_host: str) -> Tunnel:
        kind = UDP if plan.protocol is Protocol.UDP else TCP
        host = plan.bind_host or ports.bind_host
        reservations: list[socket.socket] = []
        entry_points: list[Address] = []
        try:
            if plan.saved_state:
                state = WireGuardState.decode(plan.saved_state)
                await self._reclaim(plan.session_id, state)
            else:
                state = self._new_consumer_state(plan)
                state.peer_endpoint = list(await _resolve(plan.data_endpoints[0]))
            for index in range(plan.num_conn):
                port = _entry_port(plan, ports, index, kind)
                reservations.append(_reserve(host, port, kind))
                entry_points.append(public(host, port, advertise_host))
            state.ruleset = rules.ConsumerRules(
                ifname=state.ifname,
                protocol=plan.protocol.value,
                bind_ip=host,
                entry_ports=tuple(a.port for a in entry_points),
                peer_tunnel_ips=tuple(a.split("/")[0] for a in state.peer_addresses),
                destination_count=plan.destination_count,
            ).render()
            self._check_forwarding()
            tunnel = WireGuardTunnel(
                plan.session_id,
                state,
                self.backend,
                self._pool,
                plan.credentials.preshared_key,
                tuple(entry_points),
                reservations=reservations,
            )
            await tunnel.start()
        except BaseException:
            for sock in reservations:
                sock.close()
            self._pool.release(plan.session_id)
            ports.release(plan.session_id)
            raise
        return tunnel

    def _new_consumer_state(self, plan: ConsumerPlan) -> WireGuardState:
        pending = self._pending.pop(plan.session_id, None)
        if pending is None:
            raise FailedPrecondition("WireGuard keys for this join were not prepared")
        private_key, blocks, port = pending
        offer = plan.peer_wireguard
        if offer is None:
            raise FailedPrecondition("the producer appliance sent no WireGuard public key")
        keys.check_public_key(offer.public_key)
        if set(blocks_of(offer.tunnel_addresses, consumer=False)) != set(blocks):
            raise InvalidArgument("the producer appliance answered with other tunnel addresses")
        return WireGuardState(
            ifname=self.ifname(plan.session_id),
            side="consumer",
            private_key=private_key.hex(),
            listen_port=port,
            addresses=[host_address(b, CONSUMER) for b in blocks],
            peer_public_key=offer.public_key.hex(),
            peer_addresses=list(offer.tunnel_addresses),
        )

    # ---- host state ----------------------------------------------------------------------------

    async def _reclaim(self, session_id: str, state: WireGuardState) -> None:
        """Restoring: removes what an earlier process left of this session, then holds its tunnel
        blocks. (A new session's device name is new: nothing to remove.)"""
        with contextlib.suppress(Unavailable):
            rules.delete(state.ifname)
        await self.backend.destroy(state.ifname)
        if state.addresses:
            consumer = state.side == "consumer"
            self._pool.claim(session_id, blocks_of(tuple(state.addresses), consumer=consumer))

    async def sweep(self, live: set[str]) -> None:
        keep = {self.ifname(s) for s in live}
        removed = set(await self.backend.sweep(self._prefix, keep))
        for name in rules.tables(self._prefix):
            if name not in keep:
                with contextlib.suppress(Unavailable):
                    rules.delete(name)
                removed.add(name)
        if removed:
            log.info("removed WireGuard leftovers of ended sessions", interfaces=sorted(removed))

    def _check_forwarding(self) -> None:
        """Apps on other hosts reach entry points, and destinations on other hosts are reached, only
        when this host forwards; enabled once, and said so."""
        if self._forwarding_checked:
            return
        self._forwarding_checked = True
        if links.read_sysctl("net/ipv4/ip_forward") != "1":
            try:
                links.sysctl("net/ipv4/ip_forward", "1")
                log.warning("enabled net.ipv4.ip_forward for WireGuard mode")
            except OSError as exc:
                log.warning(
                    "net.ipv4.ip_forward is off; only local apps reach WireGuard sessions", error=str(exc)
                )


async def _resolve(address: Address) -> tuple[str, int]:
    """(IP, port): nftables and WireGuard need addresses, not names."""
    try:
        return str(ipaddress.ip_address(address.host)), address.port
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidArgument(f"cannot resolve {address.host}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first: the tunnel always has it
    return str(infos[0][4][0]), address.port


def _ephemeral_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _reserve(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A bound (not listening) socket holding an entry port: DNAT takes the traffic before any socket
    would, and nothing else on the host can bind the port while the session lives."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot hold entry port {port}: {exc.strerror}") from None
    return sock
