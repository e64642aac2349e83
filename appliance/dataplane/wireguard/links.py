"""Interface plumbing shared by both backends, through pyroute2: addresses, MTU, link state, sysctls."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ParamSpec, TypeVar

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.dataplane.wireguard.pool import Network

P = ParamSpec("P")
T = TypeVar("T")

MTU = 1420  # what wg-quick and wireguard-go use over a 1500-byte path


def netlink(func: Callable[P, T]) -> Callable[P, T]:
    """Runs `func` in a worker thread: pyroute2's synchronous sockets run an event loop of their own
    and fail inside a running one ("This event loop is already running"). Netlink calls take
    milliseconds, so the caller simply waits."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        box: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                box.append(func(*args, **kwargs))
            except BaseException as exc:
                error.append(exc)

        worker = threading.Thread(target=target, name="netlink")
        worker.start()
        worker.join()
        if error:
            raise error[0]
        return box[0]

    wrapper.__doc__ = func.__doc__
    return wrapper


@netlink
def exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


@netlink
def names(prefix: str) -> list[str]:
    """Names of the links in this namespace that start with `prefix`."""
    with IPRoute() as ipr:
        return [str(n) for link in ipr.get_links() if str(n := link.get("ifname", "")).startswith(prefix)]


@netlink
def bring_up(ifname: str, addresses: Iterable[str]) -> None:
    """Sets the MTU, adds `addresses` (CIDR; the block's route comes with each), link up."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetlinkError(errno.ENODEV, f"no interface {ifname}")
        index = found[0]
        ipr.link("set", index=index, mtu=MTU)
        for cidr in addresses:
            iface = ipaddress.ip_interface(cidr)
            try:
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    continue
                if iface.version == 6:
                    # IPv6 disabled here (Docker's default): the session runs over IPv4 alone.
                    warn_once("ipv6", f"no IPv6 tunnel address on {ifname} ({exc.args[-1]}); IPv4 only")
                    continue
                raise
        ipr.link("set", index=index, state="up")
    # Packets of the session arrive on this interface for a destination that may be 127.0.0.1 (DNAT),
    # and replies leave through it from 127.0.0.1: both need route_localnet on this interface only.
    for key in ("route_localnet", "forwarding"):
        try:
            sysctl(f"net/ipv4/conf/{ifname}/{key}", "1")
        except OSError as exc:
            # A host-networked container has a read-only /proc/sys: the host must set conf.all.* then.
            warn_once(
                key,
                f"cannot set net.ipv4.conf.{ifname}.{key} ({exc.strerror}); set net.ipv4.conf.all.{key}=1",
            )


@netlink
def delete(ifname: str) -> None:
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)


@netlink
def host_networks() -> list[Network]:
    """Every network this namespace has an address in or a route to (default routes aside)."""
    found: list[Network] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            with contextlib.suppress(ValueError, TypeError):
                found.append(ipaddress.ip_network(f"{msg.get('address')}/{msg['prefixlen']}", strict=False))
        for family in (2, 10):  # AF_INET, AF_INET6
            for msg in ipr.get_routes(family=family):
                dst, length = msg.get("dst"), msg["dst_len"]
                if dst and length:
                    with contextlib.suppress(ValueError, TypeError):
                        found.append(ipaddress.ip_network(f"{dst}/{length}", strict=False))
    return found


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Logs `message` as a warning the first time `key` comes up in this process."""
    if key not in _warned:
        _warned.add(key)
        structlog.get_logger(__name__).warning(message)


def sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name).write_text(value)


def read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return ""
