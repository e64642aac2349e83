"""The kernel backend: a `kind=wireguard` link and pyroute2's WireGuard generic-netlink client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from appliance.dataplane.wireguard import links
from appliance.dataplane.wireguard.backend import Backend, BackendError, DeviceConfig
from appliance.dataplane.wireguard.uapi import PeerStats


@links.netlink
def kernel_supported() -> str | None:
    """None if this namespace can make kernel WireGuard links, else why not."""
    probe = f"sswprobe{os.getpid() % 10000:04d}"
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=probe, kind="wireguard")
    except NetlinkError as exc:
        return f"`ip link add … type wireguard` fails: {exc.args[-1]} (no wireguard kernel module)"
    links.delete(probe)
    return None


def _add_link(ifname: str) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=ifname, kind="wireguard")


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def peer_attrs(config: DeviceConfig) -> dict[str, object] | None:
    """pyroute2's peer dict for `config` (base64 keys), or None without a peer."""
    peer = config.peer
    if peer is None:
        return None
    attrs: dict[str, object] = {
        "public_key": _b64(peer.public_key),
        "preshared_key": _b64(peer.preshared_key),
        "persistent_keepalive": peer.keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
    }
    if peer.endpoint is not None:
        attrs["endpoint_addr"], attrs["endpoint_port"] = peer.endpoint
    return attrs


class KernelBackend(Backend):
    name = "kernel"

    async def create(self, ifname: str) -> None:
        links.delete(ifname)
        try:
            links.netlink(_add_link)(ifname)
        except NetlinkError as exc:
            raise BackendError(f"cannot create WireGuard link {ifname}: {exc.args[-1]}") from None

    def configure(self, ifname: str, config: DeviceConfig) -> None:
        links.netlink(self._configure)(ifname, config)

    def _configure(self, ifname: str, config: DeviceConfig) -> None:
        try:
            with WireGuard() as wg:
                wg.set(ifname, private_key=_b64(config.private_key), listen_port=config.listen_port)
                peer = peer_attrs(config)
                if peer is not None:
                    wg.set(ifname, peer=peer)
        except NetlinkError as exc:
            raise BackendError(f"cannot configure {ifname}: {exc.args[-1]}") from None

    def stats(self, ifname: str) -> PeerStats:
        return links.netlink(self._stats)(ifname)

    def _stats(self, ifname: str) -> PeerStats:
        rx = tx = 0
        handshake = 0.0
        try:
            with WireGuard() as wg:
                for msg in wg.info(ifname):
                    for peer in msg.get("WGDEVICE_A_PEERS") or []:
                        rx += int(peer.get("WGPEER_A_RX_BYTES") or 0)
                        tx += int(peer.get("WGPEER_A_TX_BYTES") or 0)
                        stamp = peer.get("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                        with contextlib.suppress(AttributeError, TypeError, KeyError):
                            handshake = max(handshake, stamp["tv_sec"] + stamp["tv_nsec"] / 1e9)
        except NetlinkError as exc:
            raise BackendError(f"cannot read {ifname}: {exc.args[-1]}") from None
        return PeerStats(rx, tx, handshake)

    async def destroy(self, ifname: str) -> None:
        links.delete(ifname)

    async def sweep(self, prefix: str, keep: set[str]) -> list[str]:
        stale = [n for n in links.names(prefix) if n not in keep]
        for name in stale:
            await self.destroy(name)
        await asyncio.sleep(0)
        return stale
