"""The WireGuard backend interface: one device per session, made and configured by the kernel or
by wireguard-go. Addresses, MTU and link state are common to both (see links.py)."""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass

from appliance.dataplane.wireguard.uapi import PeerStats


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes
    allowed_ips: tuple[str, ...]  # CIDRs whose packets this peer may send and receive
    endpoint: tuple[str, int] | None = None  # (IP, port); None: learnt from the peer's first packet
    keepalive: int = 0


@dataclass(frozen=True)
class DeviceConfig:
    private_key: bytes
    listen_port: int = 0  # 0: any free port (the consumer side)
    peer: PeerConfig | None = None


class BackendError(Exception):
    """A device could not be made or configured; the message names what failed."""


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    async def create(self, ifname: str) -> None:
        """Makes the device `ifname` (down, no addresses)."""

    @abc.abstractmethod
    def configure(self, ifname: str, config: DeviceConfig) -> None:
        """Sets the private key, listen port and (replacing any) the peer."""

    @abc.abstractmethod
    def stats(self, ifname: str) -> PeerStats:
        """Counters of the device's peer; BackendError if the device does not answer."""

    @abc.abstractmethod
    async def destroy(self, ifname: str) -> None:
        """Removes the device and anything that runs it; idempotent."""

    async def wait_failed(self, ifname: str) -> str:
        """Returns (with a reason) when the device stops working by itself; never for kernel devices."""
        await asyncio.Event().wait()
        return ""

    @abc.abstractmethod
    async def sweep(self, prefix: str, keep: set[str]) -> list[str]:
        """Removes every device named `prefix…` that is not in `keep`; returns their names."""
