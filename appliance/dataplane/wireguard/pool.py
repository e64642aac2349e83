"""Tunnel addresses: small blocks from a configurable pool, one per session, never on the host's networks.

A session's two tunnel ends share one block per address family (a /30 in IPv4, a /126 in IPv6): the
producer side takes the first host address, the consumer side the second. The consumer side proposes the
block at Join and the producer side claims the same one, so both hosts route it to the session's interface.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from appliance.errors import AlreadyExists, InvalidArgument, ResourceExhausted

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_POOL = "100.64.0.0/10,fd5c:5157:7e00::/48"  # CGNAT (RFC 6598) and a ULA (RFC 4193) prefix
BLOCK_PREFIX = {4: 30, 6: 126}
PRODUCER, CONSUMER = 1, 2  # host offsets inside a block


def parse_pool(text: str) -> tuple[Network, ...]:
    """Networks from "CIDR[,CIDR…]"; at most one per address family, each large enough for a block."""
    networks: list[Network] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"tunnel address pool {item!r}: {exc}") from None
        if net.prefixlen > BLOCK_PREFIX[net.version]:
            raise InvalidArgument(
                f"tunnel address pool {item} is smaller than one /{BLOCK_PREFIX[net.version]}"
            )
        if any(n.version == net.version for n in networks):
            raise InvalidArgument(f"tunnel address pool has two IPv{net.version} networks")
        networks.append(net)
    if not any(n.version == 4 for n in networks):
        raise InvalidArgument("tunnel address pool needs an IPv4 network")
    return tuple(networks)


def host_address(block: Network, offset: int) -> str:
    """The interface address (CIDR) at `offset` in `block`, e.g. 100.64.0.1/30."""
    return f"{block.network_address + offset}/{block.prefixlen}"


@dataclass
class AddressPool:
    """Hands out blocks of `networks` to sessions, skipping blocks that overlap `host_networks()`."""

    networks: tuple[Network, ...]
    host_networks: Callable[[], Iterable[Network]] = tuple
    _owners: dict[Network, str] = field(default_factory=dict)

    def allocate(self, owner: str) -> tuple[Network, ...]:
        """One free block per family for `owner`; ResourceExhausted when a family has none left."""
        taken = list(self.host_networks())
        blocks = tuple(self._free_block(net, taken) for net in self.networks)
        for block in blocks:
            self._owners[block] = owner
        return blocks

    def claim(self, owner: str, blocks: Iterable[Network]) -> tuple[Network, ...]:
        """Reserves blocks the peer appliance proposed; they must be ours to give and free here."""
        blocks = tuple(blocks)
        taken = list(self.host_networks())
        for block in blocks:
            if not any(block.version == n.version and block.subnet_of(n) for n in self.networks):  # type: ignore[arg-type]
                raise InvalidArgument(f"tunnel block {block} is outside this appliance's pool")
            if block.prefixlen != BLOCK_PREFIX[block.version]:
                raise InvalidArgument(f"tunnel block {block} is not a /{BLOCK_PREFIX[block.version]}")
            holder = self._owners.get(block)
            if (holder is not None and holder != owner) or (holder is None and _overlaps(block, taken)):
                raise AlreadyExists(f"tunnel block {block} is already in use on the producer side")
        for block in blocks:
            self._owners[block] = owner
        return blocks

    def release(self, owner: str) -> None:
        for block in [b for b, who in self._owners.items() if who == owner]:
            del self._owners[block]

    def owned_by(self, owner: str) -> list[Network]:
        return [b for b, who in self._owners.items() if who == owner]

    def _free_block(self, net: Network, taken: list[Network]) -> Network:
        prefix = BLOCK_PREFIX[net.version]
        count = 1 << (prefix - net.prefixlen)
        size = 1 << (net.max_prefixlen - prefix)
        # A random starting point: two appliances rarely propose the same block to a third one.
        start = random.randrange(count)
        for i in range(min(count, 1 << 22)):
            index = (start + i) % count
            block = ipaddress.ip_network((int(net.network_address) + index * size, prefix))
            if block not in self._owners and not _overlaps(block, taken):
                return block
        raise ResourceExhausted(f"no free tunnel address block left in the pool {net}")


def _overlaps(block: Network, taken: list[Network]) -> bool:
    return any(block.version == t.version and block.overlaps(t) for t in taken)
